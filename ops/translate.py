"""CycleGAN test-time conventions (shared/reference/cyclegan/README.md): pre-processing and the uint8 conversion.
No Ray."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PREPROCESS = ("resize_and_crop", "none")


def preprocess(image: np.ndarray, mode: str = "resize_and_crop", size: int = 256) -> torch.Tensor:
    """uint8 [H, W, 3] -> [3, H', W'] in [-1, 1]. resize_and_crop (official test default): squash to size x size
    with PIL bicubic (the crop is then a no-op); none: each side rounded to the nearest multiple of 4 (bicubic,
    only when needed)."""
    if mode not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {mode!r}")
    im = Image.fromarray(image)
    target = (size, size) if mode == "resize_and_crop" else \
        tuple(max(4, int(round(side / 4)) * 4) for side in im.size)
    if im.size != target:
        im = im.resize(target, Image.BICUBIC)
    v = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return v * 2 - 1


def to_uint8_truncated(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] as upstream's tensor2im: (x + 1) / 2 * 255 truncated toward
    zero (no rounding, no clamping beyond what tanh already guarantees)."""
    return ((x.detach().float().cpu().permute(0, 2, 3, 1).numpy() + 1) / 2 * 255).astype(np.uint8)
