"""Similarity transforms of image-like tensors (images, base codes) by inverse warping. Pure torch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def similarity_warp(x: torch.Tensor, degrees: float = 0.0, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0),
                    padding: str = "zeros") -> torch.Tensor:
    """Rotate by `degrees` (counter-clockwise on screen) about the centre, scale by `scale`, then translate by `shift`
    = (dx, dy) in units of the tensor's width/height (0.125 = an eighth of the width, to the right/down).
    x [B, C, H, W] -> same shape; bilinear, align_corners=False; padding "zeros" | "border" | "reflection"."""
    b = x.shape[0]
    a = math.radians(degrees)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    tx, ty = 2 * shift[0], 2 * shift[1]  # normalised coordinates span 2
    # Output location u samples the input at T^-1(u) = R(-a)/scale (u - t); y points down, so +a turns CCW on screen.
    theta = torch.tensor([[cos, -sin, -(cos * tx - sin * ty)],
                          [sin, cos, -(sin * tx + cos * ty)]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(b, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
