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
   Then the noise strengths of the StyledConvs at resolutions <= 16 are set to COARSE_NOISE_STRENGTH: the coarse
   layout of every image is then anchored in image space by the constant noise buffers, much as a trained
   generator's layout is anchored by what it learned (faces centred and upright). W+ cannot move that layout;
   this is what makes shifted or rotated ("out-of-range") images hard for W+ and what BDInvert's base code fixes.
   An untrained generator without it follows shifted images in W+ almost perfectly.
3. `w_avg` = mean of mapping(z) over 10,000 z (seed SEED+2), stored like a checkpoint's `latent_avg`.
4. Output scale: a random StyleGAN2 ranges far beyond [-1, 1]. Each ToRGB (weight and bias) first gets a gain
   that sets its output std to (4 / resolution)^SPECTRUM_SLOPE (coarse layers dominate, as in photographs), then
   all of them are multiplied by OUTPUT_MARGIN / max|image| over 1,024 samples (z seed SEED+3, psi 1, constant
   noise). The image is a sum of ToRGB outputs, so this scales it exactly; samples then lie within about
   [-OUTPUT_MARGIN, OUTPUT_MARGIN].
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoints import load_generator, save_generator
from models.stylegan2 import Generator

SEED = 2026
ARCHITECTURE = {"size": 64, "style_dim": 128, "n_mlp": 4, "channels": {4: 128, 8: 128, 16: 64, 32: 32, 64: 16}}
OUTPUT_MARGIN = 0.8
COARSE_NOISE_STRENGTH = 2.0
SPECTRUM_SLOPE = 1.0
COARSE_NOISE_MAX_RESOLUTION = 16
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


def coarse_convs(G: Generator) -> list:
    """The StyledConvs at resolutions <= COARSE_NOISE_MAX_RESOLUTION (those whose noise anchors the layout)."""
    return [conv for i, conv in enumerate([G.conv1, *G.convs]) if 2 ** ((i + 5) // 2) <= COARSE_NOISE_MAX_RESOLUTION]


def _anchor_coarse_layout(G: Generator) -> None:
    for conv in coarse_convs(G):
        conv.noise.weight.fill_(COARSE_NOISE_STRENGTH)


def _scale_output(G: Generator, n: int, seed: int) -> float:
    """Per-resolution ToRGB gains, then one global gain. Each ToRGB's output is scaled to a std proportional to
    (4 / resolution)^SPECTRUM_SLOPE, so coarse layers carry more energy than fine ones as in photographs (a random
    generator otherwise puts heavy-tailed fine detail on top and must be scaled down to a few % contrast); then the
    sum is scaled so that the largest |value| over n samples is OUTPUT_MARGIN."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    rgbs = [G.to_rgb1, *G.to_rgbs]
    stds = {}
    hooks = [rgb.conv.register_forward_hook(lambda m, i, o, k=k: stds.setdefault(k, []).append(o.std().item()))
             for k, rgb in enumerate(rgbs)]
    for chunk in z.split(128):
        G.synthesis(G.mapping(chunk))
    for h in hooks:
        h.remove()
    for k, rgb in enumerate(rgbs):
        gain = (4 / 2 ** (k + 2)) ** SPECTRUM_SLOPE / (sum(stds[k]) / len(stds[k]))
        rgb.conv.weight.mul_(gain)
        rgb.bias.mul_(gain)
    peak = max(G.synthesis(G.mapping(chunk)).abs().max().item() for chunk in z.split(128))
    factor = OUTPUT_MARGIN / peak
    for rgb in rgbs:
        rgb.conv.weight.mul_(factor)
        rgb.bias.mul_(factor)
    return factor


@torch.no_grad()
def build_default_generator() -> Generator:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        G = Generator(**ARCHITECTURE)
    _perturb_constant_parameters(G, torch.Generator().manual_seed(SEED + 1))
    _anchor_coarse_layout(G)
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
