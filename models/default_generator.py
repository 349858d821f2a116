"""The bundled default generator: a small, seeded, *untrained* StyleGAN2 (64x64) shipped for the demo and tests.

It is NOT a face model: its weights are random (plus the perturbations below), so its images are smooth random
textures. It exists so that every stage runs offline in minutes on 2 CPU cores. Real runs pass
`--generator PATH` with a rosinality `.pt`, an NVIDIA `.pkl` or a latentray-converted file.

Recipe (reproducible: `python -m models.default_generator` rewrites `models/assets/default_generator.pt`
bit-identically; a test checks that):
1. `torch.manual_seed(SEED)` (inside a forked RNG), then `Generator(**ARCHITECTURE)`.
2. Every zero/constant-initialised parameter gets a small seeded perturbation (torch.Generator SEED+1, in
   `named_parameters()` order), as in the reference goldens, so that noise, biases and modulation biases all matter:
   mapping biases N(0,1) (x lr_mul at run time), modulation biases 1 + 0.1 N, noise strengths 0.1 N,
   activation and ToRGB biases 0.1 N.
3. `w_avg` = mean of mapping(z) over 10,000 z (seed SEED+2), stored like a checkpoint's `latent_avg`.
4. Output scale: a random StyleGAN2 ranges far beyond [-1, 1]. Every ToRGB weight and bias is multiplied by
   OUTPUT_MARGIN / max|image| over 1,024 samples (z seed SEED+3, psi 1, constant noise). The image is a sum of
   ToRGB outputs, so this scales it exactly; samples then lie within about [-OUTPUT_MARGIN, OUTPUT_MARGIN].
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoints import load_generator, save_generator
from models.stylegan2 import Generator

SEED = 2026
ARCHITECTURE = {"size": 64, "style_dim": 128, "n_mlp": 4, "channels": {4: 128, 8: 128, 16: 64, 32: 32, 64: 16}}
OUTPUT_MARGIN = 0.8
DEFAULT_GENERATOR_PATH = Path(__file__).parent / "assets" / "default_generator.pt"


def _perturb_constant_parameters(G: Generator, gen: torch.Generator) -> None:
    for name, p in G.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.startswith("style.") and name.endswith(".bias"):
            p.copy_(noise)
        elif name.endswith("modulation.bias"):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("noise.weight") or name.endswith("activate.bias") or name.endswith("rgb1.bias") \
                or (name.startswith("to_rgbs.") and name.endswith(".bias")):
            p.copy_(0.1 * noise)


def _scale_output(G: Generator, n: int, seed: int) -> float:
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    peak = max(G.synthesis(G.mapping(chunk)).abs().max().item() for chunk in z.split(128))
    factor = OUTPUT_MARGIN / peak
    for rgb in [G.to_rgb1, *G.to_rgbs]:
        rgb.conv.weight.mul_(factor)
        rgb.bias.mul_(factor)
    return factor


@torch.no_grad()
def build_default_generator() -> Generator:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        G = Generator(**ARCHITECTURE)
    _perturb_constant_parameters(G, torch.Generator().manual_seed(SEED + 1))
    G.w_avg = G.mean_latent(10_000, seed=SEED + 2).reshape(-1)
    _scale_output(G, 1024, seed=SEED + 3)
    return G.eval().requires_grad_(False)


def load_default_generator() -> Generator:
    """The shipped generator, loaded through the ordinary checkpoint path."""
    return load_generator(str(DEFAULT_GENERATOR_PATH))


if __name__ == "__main__":
    DEFAULT_GENERATOR_PATH.parent.mkdir(parents=True, exist_ok=True)
    save_generator(build_default_generator(), str(DEFAULT_GENERATOR_PATH))
    print(f"wrote {DEFAULT_GENERATOR_PATH} ({DEFAULT_GENERATOR_PATH.stat().st_size / 1e6:.2f} MB)")
