"""Safe loading of StyleGAN2 checkpoints in the official formats, and our own save format.

Checkpoints are untrusted input: nothing here executes code from a file.
* rosinality `.pt` (train.py layout with `args` as argparse.Namespace, or convert_weight.py's `{g_ema, latent_avg}`):
  `torch.load(weights_only=True)`, with exactly `argparse.Namespace` allow-listed.
* NVIDIA stylegan2-ada snapshot `.pkl`: a restricted unpickler. Persistent modules are recorded as inert objects
  holding their state; the NVIDIA module source embedded in the pickle is never executed. Any global outside the
  allow-list is refused with an error naming it.
* ours: `{"format": "latentray.generator", "version": 1, "architecture": json, "state_dict", "w_avg"}`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import pickle
import re

import numpy as np
import torch

from models.stylegan2 import Generator

OUR_FORMAT = "latentray.generator"


class CheckpointError(ValueError):
    """A checkpoint that cannot be (or must not be) loaded; the message says which file and why."""


class StorageError(OSError):
    """Storage kept failing (timeouts, throttling, 403, short reads): the run stops and changes nothing it could not
    read."""


ATTEMPTS = 4  # a storage operation failing is tried this many times, backing off 0.5, 1, 2 s
BACKOFF = 0.5


def retrying(action, what: str, attempts: int | None = None):
    """Run a storage operation; any failure but a missing or existing file is retried with exponential backoff,
    then raised as StorageError. Only storage operations go through here: parsing never does."""
    import time

    attempts = attempts or ATTEMPTS
    for attempt in range(attempts):
        try:
            return action()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError):
            raise
        except Exception as exc:
            if attempt == attempts - 1:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc} (after {attempts} attempts; nothing was "
                                   "changed, rerun when the storage answers)") from exc
            time.sleep(BACKOFF * 2**attempt)


def read_bytes(path_or_uri: str) -> bytes:
    """The one byte reader: a whole file by local path or fsspec URI (s3://... uses the usual AWS
    environment/config), retried (see `retrying`)."""
    import fsspec

    def read():
        with fsspec.open(str(path_or_uri), "rb") as f:
            return f.read()

    return retrying(read, f"reading {path_or_uri}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path_or_uri: str) -> str:
    """sha256 of a checkpoint file (run.json provenance)."""
    return sha256_hex(read_bytes(path_or_uri))


# ----- rosinality and our own format (zip files written by torch.save) -------------------------------------------
def load_state(source: str | bytes, name: str | None = None, what: str = "a torch checkpoint"):
    """The one safe torch loader of every checkpoint reader: a path/URI or bytes -> the stored object, unpickled
    with weights_only (tensors, containers, and exactly argparse.Namespace allow-listed; code never runs). Any
    failure is a CheckpointError naming the file and `what` was expected."""
    name = name or (str(source) if isinstance(source, str) else "checkpoint")
    data = read_bytes(source) if isinstance(source, str) else source
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # a class or function the allow-list refuses: code it would have run
            raise CheckpointError(f"{name}: refused to load (weights_only unpickling rejected it): {exc}") from None
        raise CheckpointError(f"{name}: cannot read as {what} (not a torch file: {str(exc)[:200]})") from None
    except Exception as exc:
        raise CheckpointError(f"{name}: cannot read as {what} ({type(exc).__name__}: {exc})") from None


def infer_rosinality_architecture(sd: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of `Generator` read off a rosinality `g_ema` state dict."""
    try:
        style_dim = sd["style.1.weight"].shape[1]
        n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
        n_rgbs = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k))
        channels = {4: sd["input.input"].shape[1]}
        for k in range(n_rgbs):
            channels[8 * 2**k] = sd[f"convs.{2 * k}.conv.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"not a StyleGAN2 generator state dict: missing {exc}") from None
    arch = {"size": 4 * 2**n_rgbs, "style_dim": style_dim, "n_mlp": n_mlp, "channels": channels}
    if "convs.0.conv.blur.kernel" in sd:
        arch["blur_kernel"] = fir_taps(sd["convs.0.conv.blur.kernel"])
    return arch


def fir_taps(kernel2d: torch.Tensor) -> list[float]:
    """1-D taps of a separable FIR kernel (any overall gain), normalised to sum 1."""
    row = kernel2d.double().sum(dim=0)
    return (row / row.sum()).tolist()


def build_generator(arch: dict, sd: dict[str, torch.Tensor], w_avg, name: str) -> Generator:
    G = Generator(**arch)
    # FIR kernels are constants; NVIDIA stores them under other names and shapes, so take ours where absent.
    sd = {**{k: v for k, v in G.state_dict().items() if k.endswith("kernel")}, **sd}
    try:
        G.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: state dict does not fit the inferred architecture {arch}: {exc}") from None
    if w_avg is not None:
        G.w_avg = torch.as_tensor(w_avg, dtype=torch.float32).reshape(-1).clone()
    return G.eval().requires_grad_(False)


def _generator_from_torch_file(obj, name: str) -> tuple[Generator, str]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name}: expected a dict checkpoint, found {type(obj).__name__}")
    if obj.get("format") == OUR_FORMAT:
        arch = json.loads(obj["architecture"])
        arch["channels"] = {int(k): v for k, v in arch["channels"].items()}
        return build_generator(arch, obj["state_dict"], obj.get("w_avg"), name), "latentray"
    if "g_ema" in obj:
        sd = obj["g_ema"]
        return build_generator(infer_rosinality_architecture(sd), sd, obj.get("latent_avg"), name), "rosinality"
    raise CheckpointError(f"{name}: expected a rosinality checkpoint (key 'g_ema') or a latentray generator, "
                          f"found keys {sorted(obj)[:10]}")


# ----- NVIDIA snapshot pickles -------------------------------------------------------------------------------------
class PersistentObject:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` would have built, kept inert: the class
    name and the module `__dict__` (`state`). `meta['module_src']` is never executed."""

    def __init__(self, meta: dict):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise CheckpointError("unexpected persistent-object metadata in NVIDIA pickle")
        self.class_name = meta.get("class_name")
        self.state = meta.get("state") or {}

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flattened parameters and persistent buffers, like `nn.Module.state_dict()`."""
        out = {}
        for key, value in (self.state.get("_parameters") or {}).items():
            if value is not None:
                out[prefix + key] = value
        skip = set(self.state.get("_non_persistent_buffers_set") or ())
        for key, value in (self.state.get("_buffers") or {}).items():
            if value is not None and key not in skip:
                out[prefix + key] = value
        for key, child in (self.state.get("_modules") or {}).items():
            if isinstance(child, PersistentObject):
                out.update(child.state_dict(f"{prefix}{key}."))
        return out


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a plain dict with attribute access)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return data


def _load_storage_bytes(blob: bytes):
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype)[0] if isinstance(data, bytes) else np.asarray(data, dtype=dtype)[()]


_NVIDIA_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("builtins", "set"): set,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a real stylegan2-ada snapshot needs; anything else is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _NVIDIA_ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(f"refused pickle global '{module}.{name}': not one a StyleGAN2 snapshot needs "
                                  "(checkpoints are never allowed to run code)") from None

    def persistent_load(self, pid):
        raise CheckpointError(f"refused pickle persistent id {pid!r}")


def nvidia_to_rosinality(nv: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Rename an NVIDIA `G_ema` state dict onto rosinality names (table in reference/stylegan2/README.md §5)."""
    sd, w_avg = {}, None
    for key, value in nv.items():
        parts = key.split(".")
        if parts[0] == "mapping":
            if parts[1] == "w_avg":
                w_avg = value
            elif parts[1].startswith("fc"):
                sd[f"style.{int(parts[1][2:]) + 1}.{parts[2]}"] = value
            else:
                raise CheckpointError(f"unsupported NVIDIA mapping tensor {key} (conditional generators are not supported)")
            continue
        if parts[0] != "synthesis" or key.endswith("resample_filter"):
            continue
        log_res = int(math.log2(int(parts[1][1:])))
        if parts[2] == "const":
            sd["input.input"] = value.unsqueeze(0)
            continue
        layer, field = parts[2], ".".join(parts[3:])
        if layer == "torgb":
            name = "to_rgb1" if log_res == 2 else f"to_rgbs.{log_res - 3}"
            conv_index = None
        else:
            conv_index = -1 if log_res == 2 else 2 * log_res - 6 + (layer == "conv1")
            name = "conv1" if conv_index == -1 else f"convs.{conv_index}"
        if field == "weight":
            sd[f"{name}.conv.weight"] = value.unsqueeze(0)
        elif field.startswith("affine."):
            sd[f"{name}.conv.modulation.{field.split('.')[1]}"] = value
        elif field == "bias":
            sd[f"{name}.bias" if layer == "torgb" else f"{name}.activate.bias"] = (
                value.reshape(1, -1, 1, 1) if layer == "torgb" else value)
        elif field == "noise_strength":
            sd[f"{name}.noise.weight"] = value.reshape(1)
        elif field == "noise_const":
            sd[f"noises.noise_{conv_index + 1}"] = value.reshape(1, 1, *value.shape)
        else:
            raise CheckpointError(f"unexpected NVIDIA tensor {key}")
    return sd, w_avg


def _nvidia_architecture(g: PersistentObject, sd: dict[str, torch.Tensor], nv: dict[str, torch.Tensor]) -> dict:
    kwargs = dict(g.state.get("_init_kwargs") or {})
    mapping_kwargs = dict(kwargs.get("mapping_kwargs") or {})
    synthesis_kwargs = dict(kwargs.get("synthesis_kwargs") or {})
    if kwargs.get("c_dim", 0):
        raise CheckpointError(f"conditional NVIDIA generator (c_dim={kwargs['c_dim']}) is not supported")
    if kwargs.get("z_dim", kwargs.get("w_dim")) != kwargs.get("w_dim"):
        raise CheckpointError(f"z_dim {kwargs.get('z_dim')} != w_dim {kwargs.get('w_dim')} is not supported")
    if synthesis_kwargs.get("architecture", "skip") != "skip":
        raise CheckpointError(f"synthesis architecture {synthesis_kwargs['architecture']!r}: only 'skip' is supported")
    arch = infer_rosinality_architecture(sd)
    arch["lr_mlp"] = float(mapping_kwargs.get("lr_multiplier", 0.01))
    arch["conv_clamp"] = synthesis_kwargs.get("conv_clamp")
    filt = nv.get("synthesis.b8.conv0.resample_filter")
    if filt is not None:
        arch["blur_kernel"] = fir_taps(filt)
    return arch


def _generator_from_nvidia_pickle(data: bytes, name: str) -> Generator:
    try:
        snapshot = RestrictedUnpickler(io.BytesIO(data)).load()
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    except Exception as exc:  # truncated or garbled pickles
        raise CheckpointError(f"{name}: not a readable NVIDIA snapshot pickle: {exc}") from None
    g = snapshot.get("G_ema") if isinstance(snapshot, dict) else None
    if not isinstance(g, PersistentObject):
        found = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
        raise CheckpointError(f"{name}: expected an NVIDIA snapshot with 'G_ema', found {found}")
    nv = g.state_dict()
    sd, w_avg = nvidia_to_rosinality(nv)
    return build_generator(_nvidia_architecture(g, sd, nv), sd, w_avg, name)


LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a pre-1.6 (non-zip) torch.save file


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError("not a plain value")


def is_legacy_torch_file(data: bytes) -> bool:
    """A torch.save file in the legacy (non-zip) serialization starts with a pickled magic number; an NVIDIA
    snapshot is one pickle of a dict with globals. Reading the first object touches no global."""
    try:
        return _NoGlobals(io.BytesIO(data)).load() == LEGACY_TORCH_MAGIC
    except Exception:
        return False


# ----- public API --------------------------------------------------------------------------------------------------
def load_generator(path_or_uri: str) -> Generator:
    """Load a generator from any supported file (local path or fsspec URI), in eval mode with frozen weights.

    Sets `G.generator_id` (sha256 of the file) and `G.source_format` (rosinality | nvidia | latentray).
    """
    name = str(path_or_uri)
    try:
        data = read_bytes(name)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no such checkpoint file") from None
    if data[:4] == b"PK\x03\x04" or is_legacy_torch_file(data):
        G, fmt = _generator_from_torch_file(load_state(data, name), name)
    elif data[:1] == b"\x80":
        G, fmt = _generator_from_nvidia_pickle(data, name), "nvidia"
    else:
        raise CheckpointError(f"{name}: expected a torch zip checkpoint (.pt) or an NVIDIA pickle (.pkl), "
                              f"found neither (first bytes {data[:8]!r})")
    G.generator_id = sha256_hex(data)
    G.source_format = fmt
    return G


def save_generator(G: Generator, path: str) -> None:
    """Write `G` in our own format: loads with weights_only and no pickle path, whatever format it came from."""
    torch.save({"format": OUR_FORMAT, "version": 1, "architecture": json.dumps(G.architecture()),
                "state_dict": {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()},
                "w_avg": None if G.w_avg is None else G.w_avg.detach().cpu()}, path)


def load_direction(data: bytes, name: str) -> np.ndarray:
    """A latent direction file's contents: `.npy` (no pickles) or a `.pt` holding one tensor (weights_only)."""
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    value = load_state(data, name)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{name}: a direction file must hold a single tensor, found {type(value).__name__}")
    return value.float().numpy()
