"""Per-image reconstruction metrics on images in [-1, 1]: [B, 3, H, W] pairs -> [B]."""

from __future__ import annotations

import torch


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per image, over the pixels where `mask` [B, 1, H, W] is 1 when given (weighted by it);
    float32 whatever the autocast context."""
    with torch.autocast(a.device.type, enabled=False):
        error = (a.float() - b.float()).square()
        if mask is None:
            return error.mean(dim=(1, 2, 3))
        weight = mask.float().expand_as(error)
        return (error * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp_min(1e-12)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """10 log10(4 / MSE): the peak-to-peak range of [-1, 1] is 2."""
    return 10 * torch.log10(4.0 / mse(a, b, mask).clamp_min(1e-12))


def identity_similarity(embed, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of face-identity embeddings (`embed` returns L2-normalised [B, E]), in float32."""
    return (embed(a).float() * embed(b).float()).sum(dim=1)
