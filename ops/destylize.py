"""Facial destylization (DualStyleGAN, spec/dualstylegan.md §2): artistic portraits -> realistic faces, as paired
data. Batched and per-image independent: every loss term is computed per image and summed, noise maps are drawn
per image from a generator seeded by (seed, key). No Ray.

1. z_e = E(S) in Z+ (the Z+ pSp encoder).
2. Optimise z (from z_e) and per-image noise maps on the fine-tuned generator g':
   LPIPS(P(g'(z)), S) + id_weight (1 - cos ID) + reg_weight mean_d std_l(z) + noise_weight noise_reg, Adam lr 0.1
   with the projector's ramps, 300 steps, noise re-normalised after each step.
3. Rows >= 8 of the optimised code are restored from z_e (colour).
4. x_d = g(z_hat) with truncation 0.7 toward 0 (the intermediate face); z_i = E(x_d) with rows >= 8 from z_e;
   x_r = g(z_i) (the final face). Same noise maps for both renders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.perceptual import box_downsample
from models.stylegan2 import per_sample
from ops.invert import key_generator, per_image_randn, projector_lr, shared_perceptual
from ops.regularizers import noise_regularizer, normalize_noise_


@dataclass(frozen=True)
class DestylizeConfig:
    steps: int = 300
    lr: float = 0.1
    lpips_net: str = "vgg"
    lpips_backbone: str = "imagenet"
    id_weight: float = 0.1  # forced to 0 (and recorded) when no identity model is given
    reg_weight: float = 1.0
    noise_weight: float = 1e5
    truncation: float = 0.7  # toward 0, as every DualStyleGAN script
    colour_row: int = 8  # rows >= this keep the encoder's code (destylize.py uses 8)
    seed: int = 0


def map_zplus(G, z: torch.Tensor) -> torch.Tensor:
    """Z+ [B, L, D]: every row through the mapping network on its own -> W+."""
    return G.mapping(z.reshape(-1, z.shape[-1])).reshape(z.shape)


def compare_size(G, portraits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Generator images are compared at min(G.size, 256): box-averaged down to 256 (the 4x4 block mean at 1024), or
    the 256-px portrait brought to a smaller generator's resolution."""
    size = min(G.size, portraits.shape[-1])
    target = portraits if portraits.shape[-1] == size else F.adaptive_avg_pool2d(portraits, size)
    return size, target


def initial_noise(G, keys: list[str], seed: int, device) -> list[torch.Tensor]:
    gens = [key_generator(seed, f"destylize-noise:{k}") for k in keys]
    return [per_image_randn(gens, b.shape[1:], device) for b in G.make_noise(1)]


def destylize(g, g_ft, encoder, portraits: torch.Tensor, keys: list[str], config: DestylizeConfig = DestylizeConfig(),
              identity=None) -> dict:
    """portraits [B, 3, 256, 256] in [-1, 1] -> codes z_e, z_hat, z_i [B, L, D], faces `intermediate` (from z_hat)
    and `face` (from z_i) [B, 3, R, R], per-image `lpips` (g'(z_hat) vs S), `id_sim` (face vs S, when an identity
    model is given), `id_weight` used, `seconds`."""
    t0 = time.time()
    device = portraits.device
    id_weight = config.id_weight if identity is not None else 0.0
    perceptual = shared_perceptual(config.lpips_net, config.lpips_backbone)
    size, target = compare_size(g_ft, portraits)
    with torch.no_grad():  # image by image on CPU: conv rounding must not depend on the batch (see per_sample)
        z_e = per_sample(encoder, portraits)
        target_id = per_sample(identity, portraits) if id_weight else None
    z = z_e.clone().requires_grad_(True)
    noises = [n.requires_grad_(True) for n in initial_noise(g_ft, keys, config.seed, device)]
    opt = torch.optim.Adam([z, *noises], lr=config.lr)
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = projector_lr(config.lr, step, config.steps)
        image = box_downsample(g_ft.synthesis(map_zplus(g_ft, z), noise=noises), size)
        loss = perceptual(image, target) + config.reg_weight * z.std(dim=1).mean(dim=1) \
            + config.noise_weight * noise_regularizer(noises)
        if id_weight:
            loss = loss + id_weight * (1 - (per_sample(identity, image) * target_id).sum(dim=1))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # per-image losses summed: images never share a gradient
        opt.step()
        with torch.no_grad():
            normalize_noise_(noises)
    with torch.no_grad():
        z_hat = z.detach().clone()
        z_hat[:, config.colour_row:] = z_e[:, config.colour_row:]
        lpips = perceptual(box_downsample(g_ft.synthesis(map_zplus(g_ft, z_hat), noise=noises), size), target)
        intermediate = g.synthesis(config.truncation * map_zplus(g, z_hat), noise=noises)
        z_i = per_sample(encoder, intermediate)
        z_i[:, config.colour_row:] = z_e[:, config.colour_row:]
        face = g.synthesis(config.truncation * map_zplus(g, z_i), noise=noises)
        out = {"z_e": z_e, "z_hat": z_hat, "z_i": z_i, "intermediate": intermediate, "face": face, "lpips": lpips,
               "id_weight": id_weight, "seconds": torch.full((len(keys),), (time.time() - t0) / len(keys))}
        if identity is not None:
            out["id_sim"] = (per_sample(identity, face) * per_sample(identity, portraits)).sum(dim=1)
    return out
