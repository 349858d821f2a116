"""Latents saved by the tools people already use, loaded safely (weights_only; numpy without pickles):

* rosinality `projector.py`: a torch file {image name: {"img", "latent" [D] or [L, D], "noise"}} (also latentray's
  own `export` to .pt: {key: {"latent"}});
* NVIDIA `projector.py`: `projected_w.npz` with `w` [1, num_ws, D] (latentray's `export` .npz adds `keys`);
* e4e / pSp `scripts/inference.py`: `latents.pt`, a bare tensor [N, L, D] in data-loader order (names from a list);
* plain `.npy` [N, D] (w) / [N, L, D] (W+), or one w [D], and `.npz` with one array ([N, D] is always read as N
  w vectors: give one W+ latent as [1, L, D]).
"""

from __future__ import annotations

import io
from pathlib import PurePosixPath

import numpy as np

from models.checkpoints import CheckpointError, load_state, read_bytes


def load_latent_file(path: str, keys: list[str] | None = None, data: bytes | None = None
                     ) -> tuple[list[str], np.ndarray, str]:
    """(keys, latents [N, D] or [N, L, D] float32, source format) of one file (its bytes, when already read).
    `keys` names the rows of files that carry no names (e4e latents.pt, .npy); without it they are numbered."""
    data = read_bytes(path) if data is None else data
    name = PurePosixPath(str(path)).name
    if name.endswith(".npz"):
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            if "w" in arrays:
                latents = np.asarray(arrays["w"], np.float32)
                found = [str(k) for k in arrays["keys"]] if "keys" in arrays else None
                fmt = "latentray-npz" if found is not None else "nvidia-projected-w"
                names = found or ([PurePosixPath(str(path)).parent.name or name] if len(latents) == 1 else None)
            elif len(arrays.files) == 1:
                latents, names, fmt = np.asarray(arrays[arrays.files[0]], np.float32), None, "npz"
            else:
                raise CheckpointError(f"{path}: an .npz needs an array `w` (NVIDIA projector) or exactly one array, "
                                      f"found {arrays.files}")
    elif name.endswith(".npy"):
        latents, names, fmt = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32), None, "npy"
    else:
        import torch

        obj = load_state(data, str(path))
        if isinstance(obj, torch.Tensor):
            latents, names, fmt = obj.float().numpy(), None, "e4e-latents"
        elif isinstance(obj, dict) and obj and all(isinstance(v, dict) and "latent" in v for v in obj.values()):
            names = [str(k) for k in obj]
            stack = [v["latent"].float().numpy() for v in obj.values()]
            latents, fmt = np.stack(stack), "rosinality-projector"
        else:
            raise CheckpointError(f"{path}: expected a rosinality projector file ({{name: {{'latent', ...}}}}) or "
                                  f"a tensor of latents (e4e/pSp latents.pt), found {type(obj).__name__}")
    if keys is not None:
        if len(keys) != len(latents):
            raise CheckpointError(f"{path}: {len(latents)} latents but {len(keys)} keys in the key list")
        names = list(keys)
    if names is None:
        names = [f"{i:06d}" for i in range(len(latents))]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: duplicate keys among the latents")
    return names, latents, fmt


def fit_latents(latents: np.ndarray, n_latent: int, style_dim: int, path: str) -> np.ndarray:
    """Latents of any accepted shape -> W+ [N, n_latent, style_dim] of this generator (w broadcast to every row);
    a shape that does not fit is refused, naming both."""
    a = np.asarray(latents, np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim == 2 and a.shape[1] == style_dim:
        return np.repeat(a[:, None, :], n_latent, axis=1)
    if a.ndim == 2 and a.shape == (n_latent, style_dim):
        return a[None]
    if a.ndim == 3 and a.shape[1:] == (n_latent, style_dim):
        return a
    raise CheckpointError(f"{path}: latents of shape {list(a.shape)} do not fit this generator: expected w "
                          f"[N, {style_dim}] or W+ [N, {n_latent}, {style_dim}]")
