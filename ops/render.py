"""Render stored latents back to images (previews, checks that a stored latent reproduces its reconstruction)."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def render(G, columns: dict[str, np.ndarray], space: str, base_level: int = 16) -> torch.Tensor:
    """Latent columns of one space ([N, ...] float32 arrays) -> images [N, 3, R, R] (constant noise)."""
    device = G.input.input.device
    t = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(device) for k, v in columns.items()}
    if space == "w":
        return G.synthesis(t["w"])
    if space == "wplus":
        return G.synthesis(t["wplus"])
    if space == "s":
        return G.synthesis_from_styles(t["styles"])
    return G.synthesis_from_base_code(t["fwplus_base_code"], t["fwplus_wplus"], base_level)
