"""LPIPS perceptual distance (the `lpips` package, v0.1 linear heads) with explicit offline behaviour.

The calibrated linear heads ship inside the `lpips` wheel; the ImageNet backbone (VGG16 or AlexNet) does not.
* backbone="imagenet": the torchvision file in the torch hub cache, read by us — never through torchvision's
  loader, which unpickles with code execution allowed: the file's sha256 must start with the hash in its name, and
  its state dict is loaded with weights_only (tensors only; a file carrying code is refused and nothing runs). A
  missing file is refused naming the file and folder, unless `allow_download=True` (real users with internet).
* backbone="random": torchvision's seeded random init (`torch.manual_seed(0)` before construction, as the reference
  goldens were built). Numbers are then NOT real LPIPS; every result carries `backbone == "random"`.
Images of any size are box-downsampled to 256 first (integer factor), as rosinality's projector does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
LPIPS_SIZE = 256


class PerceptualWeightsMissing(FileNotFoundError):
    pass


def backbone_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def backbone_bytes(net: str) -> tuple[bytes, str]:
    """The ImageNet backbone file of `net` and its sha256, which must start with the hash torchvision puts in the
    name (run.json records the whole sha256)."""
    from models.checkpoints import CheckpointError, read_bytes, sha256_hex

    path = backbone_path(net)
    if not path.exists():
        raise PerceptualWeightsMissing(
            f"LPIPS-{net} needs the ImageNet backbone file {path.name} in {path.parent} (from "
            f"https://download.pytorch.org/models/{path.name}, e.g. by `latentray fetch-weights`; or set TORCH_HOME "
            "to a folder with hub/checkpoints/ holding it). Tests and the demo may opt in to a random backbone "
            "instead.")
    data = read_bytes(str(path))
    sha = sha256_hex(data)
    expected = path.stem.rsplit("-", 1)[-1]
    if not sha.startswith(expected):
        raise CheckpointError(f"{path}: its sha256 ({sha[:16]}...) does not start with the hash in its name "
                              f"({expected}): not the torchvision file; delete it and run `latentray fetch-weights`")
    return data, sha


def backbone_state(net: str) -> tuple[dict, str]:
    """(The backbone's `features.*` tensors, loaded with weights_only: a file carrying code is refused; sha256)."""
    from models.checkpoints import CheckpointError, load_state

    data, sha = backbone_bytes(net)
    path = backbone_path(net)
    state = load_state(data, str(path), what="a torchvision state dict")
    if not isinstance(state, dict) or not any(str(k).startswith("features.") for k in state):
        raise CheckpointError(f"{path}: expected a torchvision {net} state dict (features.*)")
    return state, sha


def load_backbone(trunk: nn.Module, state: dict, name: str) -> None:
    """torchvision's `features.<i>.<param>` into an lpips trunk, whose slices keep torchvision's layer numbers."""
    from models.checkpoints import CheckpointError

    wanted = {k: f"features.{k.split('.', 1)[1]}" for k in trunk.state_dict()}
    missing = sorted(v for v in wanted.values() if v not in state)
    if missing:
        raise CheckpointError(f"{name}: missing {missing[:4]} for the LPIPS trunk")
    trunk.load_state_dict({k: state[v] for k, v in wanted.items()})


def box_downsample(images: torch.Tensor, size: int = LPIPS_SIZE) -> torch.Tensor:
    """[B, C, H, W] -> block means to `size` when H > size (H a multiple of size); smaller images pass through."""
    b, c, h, w = images.shape
    if h <= size:
        return images
    f = h // size
    return images.reshape(b, c, h // f, f, w // f, f).mean(dim=(3, 5))


class Perceptual(nn.Module):
    """`forward(a, b) -> [B]` LPIPS distances of images in [-1, 1]; `net` and `backbone` say what it is."""

    def __init__(self, net: str = "vgg", backbone: str = "imagenet", allow_download: bool = False):
        super().__init__()
        import lpips

        if net not in BACKBONE_FILES:
            raise ValueError(f"lpips net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
        if backbone not in ("imagenet", "random"):
            raise ValueError(f"lpips backbone must be 'imagenet' or 'random', got {backbone!r}")
        if backbone == "imagenet" and allow_download and not backbone_path(net).exists():
            fetch_weights(net)
        state, self.backbone_sha256 = backbone_state(net) if backbone == "imagenet" else (None, "")
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=` argument
            torch.manual_seed(0)
            # always built random (torchvision never loads a file); our own weights_only read fills the trunk
            self.lpips = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        if state is not None:
            load_backbone(self.lpips.net, state, str(backbone_path(net)))
        self.lpips.eval().requires_grad_(False)
        self.net, self.backbone = net, backbone

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from models.stylegan2 import is_batch_invariant

        a, b = box_downsample(a), box_downsample(b)
        if not is_batch_invariant(a.device):
            return self.lpips(a, b).reshape(-1)
        # Image by image, so that a distance (and its gradient) does not depend on the batch (see batch_invariance).
        return torch.cat([self.lpips(x, y).reshape(-1) for x, y in zip(a.split(1), b.split(1))])


# ----- fetching weight files into the torch hub cache (for machines that are online, e.g. cluster setup) ----------
WEIGHT_URLS = {name: f"https://download.pytorch.org/models/{name}" for name in BACKBONE_FILES.values()}


class WeightsUnavailable(FileNotFoundError):
    pass


def fetch_weights(name: str, base_url: str | None = None) -> Path:
    """Put one weight file into `$TORCH_HOME/hub/checkpoints/`: an LPIPS net (`vgg`, `alex`), a file name known
    to WEIGHT_URLS (or under `base_url`), or a URL. A file name carrying a hash prefix (torchvision's
    `name-<sha256[:8]>.pth`) is checked against it. Already present: nothing is downloaded."""
    import re
    from urllib.parse import urlparse

    name = BACKBONE_FILES.get(name, name)
    if "://" in name:
        url = name
    elif base_url:
        url = f"{base_url.rstrip('/')}/{name}"
    elif name in WEIGHT_URLS:
        url = WEIGHT_URLS[name]
    else:
        raise ValueError(f"unknown weight file {name!r}: give a URL, --base-url, or one of {sorted(WEIGHT_URLS)}")
    filename = Path(urlparse(url).path).name
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = re.search(r"-([0-9a-f]{8,})\.[a-z]+$", filename)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=digest.group(1) if digest else None,
                                       progress=False)
    except Exception as exc:  # offline, refused, or the hash does not match: nothing is left behind
        dest.unlink(missing_ok=True)
        raise WeightsUnavailable(f"cannot fetch {url} ({type(exc).__name__}: {exc}). Put {filename} into "
                                 f"{dest.parent} by hand (or set TORCH_HOME to a folder whose hub/checkpoints/ "
                                 "holds it)") from None
    return dest
