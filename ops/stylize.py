"""DualStyleGAN exemplar style transfer (spec/dualstylegan.md §3.2, style_transfer.py). No Ray."""

from __future__ import annotations

import torch

from models.stylegan2 import per_sample
from ops.destylize import map_zplus

DEFAULT_WEIGHTS = (0.75,) * 7 + (1.0,) * 11  # structure 0.75 (rows 0-6), colour 1 (rows 7-17); cut to n_latent


@torch.no_grad()
def stylize(model, encoder, faces: torch.Tensor, exstyle: torch.Tensor, weights, truncation: float = 0.75,
            preserve_color: bool = False) -> torch.Tensor:
    """faces [B, 3, 256, 256] in [-1, 1], one exemplar's Z+ code [1 or B, L, D] -> images [B, 3, R, R] clamped to
    [-1, 1]: G([E(face)], map(exstyle), z_plus_latent, truncation toward 0, fixed noise). `preserve_color` takes the
    colour rows (7-) of the extrinsic code from the face, before mapping."""
    content = per_sample(encoder, faces)  # Z+
    ex_z = exstyle.to(content).expand(len(faces), -1, -1).clone()
    if preserve_color:
        ex_z[:, 7:] = content[:, 7:]
    out, _ = model([content], map_zplus(model.generator, ex_z), z_plus_latent=True, truncation=truncation,
                   truncation_latent=0, use_res=True, randomize_noise=False, interp_weights=list(weights))
    return out.clamp(-1, 1)
