"""Batched GAN inversion: one optimiser for the W, W+, S and F/W+ (BDInvert) spaces.

Every loss term is computed per image and the batch loss is their sum, Adam is element-wise, and every random draw
(initial noise maps, latent exploration noise) comes from a torch.Generator seeded by (config.seed, key). So an
image's result does not depend on the batch it lands in. Recipes (spec/inversion.md, spec/bdinvert.md):
* w / wplus: rosinality/NVIDIA projector — start at w_avg, Adam lr 0.1 with a linear ramp-up (5 %) and cosine
  ramp-down (25 %), exploration noise sigma_w * 0.05 * max(0, 1 - t/0.75)^2, LPIPS (+ optional MSE), noise maps
  optimised with the 1e5-weighted autocorrelation penalty and renormalised after every step.
* s: the same recipe on the concatenated StyleSpace vector, from styles(w_avg) or an encoder's W+.
* fwplus: BDInvert — base code F at `base_level` from the base-code encoder (or G.base_code(w_avg)), W+ from
  w_avg; Adam lr 0.01 constant, 1200 steps, MSE + 10 LPIPS + 10 mean((F - F0)^2) + 0.01 P_N+; constant noise.
Deviation: both images are box-downsampled to 256 for LPIPS (BDInvert resizes the prediction bicubically and the
target with Lanczos); MSE is taken at full resolution in every space.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from models.stylegan2 import batch_invariance, channels_last, is_batch_invariant
from ops import metrics
from ops.regularizers import load_or_compute_p_space_stats, noise_regularizer, normalize_noise_, pnorm_penalty

SPACES = ("w", "wplus", "s", "fwplus")

_PROJECTOR = dict(steps=1000, lr=0.1, lr_schedule="ramp", mse_weight=0.0, lpips_weight=1.0, optimize_noise=True,
                  noise_weight=1e5, latent_noise=0.05, f_weight=0.0, pnorm_weight=0.0)
SPACE_DEFAULTS = {
    "w": _PROJECTOR,
    "wplus": _PROJECTOR,
    # StyleSpace "hybrid" recipe: a few hundred projector steps directly on S; W's exploration noise scale does
    # not apply to S, so none.
    "s": {**_PROJECTOR, "steps": 300, "latent_noise": 0.0},
    "fwplus": dict(steps=1200, lr=0.01, lr_schedule="constant", mse_weight=1.0, lpips_weight=10.0,
                   optimize_noise=False, noise_weight=0.0, latent_noise=0.0, f_weight=10.0, pnorm_weight=0.01),
}


# BDInvert's anchor 10 mean((F - F0)^2) is weighed against the image loss of real photos, ~100x that of a
# low-contrast generator like the bundled one, where it pins F to the encoder's start. Chosen on a tuning set by
# benchmarks/bench_bdinvert.py (the strongest anchor within 0.5 dB of the best), checked on held-out images by
# tests/test_invert.py: `--set f_weight=0.001` for such generators; the default stays BDInvert's 10.
LOW_CONTRAST_F_WEIGHT = 0.001
CHANNELS_LAST_FROM = 256  # generator size from which NHWC activations are the default (BENCHMARKS.md: device path)

# "Hybrid" inversion (spec/stylespace.md §6): an encoder's W+ refined by 100-300 projector steps (for w, wplus and
# s; `steps` set explicitly wins, 0 keeps the encoder's answer).
HYBRID_STEPS = 200


@dataclass(frozen=True)
class InvertConfig:
    """Inversion settings. A field left None takes its space's default from SPACE_DEFAULTS."""

    space: str = field(default="wplus", metadata={"cli": False})  # w | wplus | s | fwplus
    steps: int | None = None  # optimisation steps per image (None: the space's recipe)
    lr: float | None = None  # peak Adam learning rate
    lr_schedule: Literal["ramp", "constant"] | None = None  # ramp: the projector's warm-up and cosine decay
    mse_weight: float | None = None  # weight of the full-resolution MSE
    lpips_weight: float | None = None  # weight of LPIPS at <= 256 px (0: LPIPS off, no backbone needed)
    lpips_net: Literal["vgg", "alex"] = "vgg"  # LPIPS backbone network
    # imagenet: the torchvision weights in the torch hub cache (latentray fetch-weights); random: an explicit
    # offline opt-in for tests, recorded in every row (not real LPIPS)
    lpips_backbone: Literal["imagenet", "random"] = "imagenet"
    optimize_noise: bool | None = None  # optimise per-image noise maps (else the generator's constant buffers)
    noise_weight: float | None = None  # weight of the noise autocorrelation penalty
    latent_noise: float | None = None  # exploration noise, as a fraction of sigma_w
    base_level: int = 16  # fwplus: resolution of the base code F
    f_weight: float | None = None  # fwplus: weight of mean((F - F0)^2), the base code's anchor to its start
    pnorm_weight: float | None = None  # weight of the P_N+ penalty on W+ (w, wplus, fwplus)
    seed: int = 0  # combined with each key for per-image randomness
    w_stats_samples: int = 10_000  # z samples for w_avg (when the checkpoint has none) and sigma_w
    pnorm_samples: int = 100_000  # z samples for the P-space statistics
    cache_dir: str | None = None  # where derived statistics (P space) are cached by generator id
    # bfloat16 autocast for synthesis and LPIPS (None: on CUDA only; True: on any device, to test that path); the
    # losses, regularisers and metrics are float32 whatever the context
    autocast: bool | None = None
    # per-image convolutions and row-wise affines, so an image's result never depends on its batch (None: on CPU
    # only); False runs batched calls, the GPU path, on any device
    batch_invariant: bool | None = None
    channels_last: bool | None = None  # NHWC activations (None: for generators of 256 px and more, where it wins)
    compile: bool = False  # torch.compile the synthesis (wins once compiled; each new batch size compiles again)

    def resolved(self, encoder_start: bool = False) -> "InvertConfig":
        """Fill None fields from the space's defaults; an encoder (W+) start takes the hybrid recipe's step count."""
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        defaults = SPACE_DEFAULTS[self.space]
        if encoder_start and self.space != "fwplus":
            defaults = {**defaults, "steps": HYBRID_STEPS}
        out = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if not out.lpips_weight and not out.mse_weight:
            raise ValueError(f"{self.space} inversion needs an image loss: lpips_weight and mse_weight are both 0")
        return out


def key_generator(seed: int, key: str) -> torch.Generator:
    """A CPU torch.Generator determined by (seed, key) only."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def learning_rate(cfg: InvertConfig, step: int) -> float:
    return cfg.lr if cfg.lr_schedule == "constant" else projector_lr(cfg.lr, step, cfg.steps)


def projector_lr(lr: float, step: int, steps: int) -> float:
    """The rosinality projector's schedule: linear ramp-up over the first 5 %, cosine ramp-down over the last 25 %."""
    t = step / steps
    ramp = min(1.0, (1.0 - t) / 0.25)
    return lr * (0.5 - 0.5 * math.cos(math.pi * ramp)) * min(1.0, t / 0.05)


def per_image_randn(gens: list[torch.Generator], shape: tuple, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


@functools.lru_cache(maxsize=4)
def shared_perceptual(net: str, backbone: str):
    """One LPIPS module per (net, backbone) in a process: workers and tests build it once."""
    from models.perceptual import Perceptual

    return Perceptual(net, backbone)


@torch.no_grad()
def w_statistics(G, n: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(w_avg [D], sigma_w): the checkpoint's w_avg when it has one, and the RMS distance of n mapped samples."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed)).to(G.device)
    w = G.mapping(z)
    mean = w.mean(0)
    sigma = ((w - mean).square().sum() / n).sqrt().item()
    return (G.w_avg if G.w_avg is not None else mean), sigma


class Inverter:
    """Holds what every batch needs (perceptual net, statistics) so a worker pays for it once.

    `run(images [B,3,H,W] in [-1,1], keys [B]) -> dict` (see `invert`). `encoder`, optional, is a module (or a
    list of them) with `kind` "wplus" (pSp/e4e: images -> W+) or "base_code" (BDInvert: images -> F) used as the
    starting point; fwplus takes both (W+ from the one, F from the other, else G.base_code of the start W+).
    """

    def __init__(self, G, config: InvertConfig, encoder=None, perceptual=None, identity=None):
        self.G, self.identity = G, identity
        encoders = {e.kind: e for e in (encoder if isinstance(encoder, (list, tuple)) else [encoder]) if e is not None}
        self.wplus_encoder, self.base_encoder = encoders.get("wplus"), encoders.get("base_code")
        self.cfg = config.resolved(encoder_start=self.wplus_encoder is not None)
        self.device = G.device
        self.use_autocast = self.device.type == "cuda" if self.cfg.autocast is None else self.cfg.autocast
        synthesis = {"w": G.synthesis, "wplus": G.synthesis, "s": G.synthesis_from_styles,
                     "fwplus": G.synthesis_from_base_code}[self.cfg.space]
        self.synthesis = torch.compile(synthesis) if self.cfg.compile else synthesis
        self.perceptual = None  # LPIPS off (lpips_weight 0): no backbone needed, the metric is NaN
        if self.cfg.lpips_weight:
            self.perceptual = (perceptual or shared_perceptual(self.cfg.lpips_net, self.cfg.lpips_backbone)).to(
                self.device)
        self.lpips_backbone = self.perceptual.backbone if self.perceptual is not None else "none"
        self.w_avg, self.sigma_w = w_statistics(G, self.cfg.w_stats_samples, self.cfg.seed)
        self.p_stats = None
        if self.cfg.pnorm_weight and self.cfg.space != "s":
            self.p_stats = load_or_compute_p_space_stats(G, self.cfg.pnorm_samples, self.cfg.seed,
                                                         self.cfg.cache_dir).to(self.device)
        if self.cfg.space == "fwplus":
            G._check_level(self.cfg.base_level)
        if self.base_encoder is not None and self.cfg.space != "fwplus":
            raise ValueError(f"a base_code encoder cannot start a {self.cfg.space} inversion")
        if self.base_encoder is not None and self.base_encoder.level != self.cfg.base_level:
            raise ValueError(f"the base-code encoder outputs level {self.base_encoder.level}, config asks "
                             f"{self.cfg.base_level}")

    # ----- variables ---------------------------------------------------------------------------------------------
    def _initial_variables(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        G, cfg, b = self.G, self.cfg, images.shape[0]
        with torch.no_grad():
            start = self.w_avg.reshape(1, 1, -1).expand(b, G.n_latent, -1)
            if self.wplus_encoder is not None:
                start = self._encode(self.wplus_encoder, images)
                if start.shape[1:] != (G.n_latent, G.style_dim):
                    raise ValueError(f"encoder gives W+ {list(start.shape[1:])}, generator needs "
                                     f"{[G.n_latent, G.style_dim]}")
            if cfg.space == "w":
                return {"w": start[:, 0].clone()}
            if cfg.space == "wplus":
                return {"wplus": start.clone()}
            if cfg.space == "s":
                return {"styles": G.styles_to_vector(G.styles(start)).clone()}
            if self.base_encoder is not None:
                base = self._encode(self.base_encoder, images)
            elif self.wplus_encoder is not None:  # each image's own start
                base = G.base_code(start, cfg.base_level)
            else:
                base = G.base_code(start[:1], cfg.base_level).expand(b, -1, -1, -1)
            return {"wplus": start.clone(), "base_code": base.clone()}

    def _encode(self, encoder, images: torch.Tensor) -> torch.Tensor:
        """An encoder's answer, image by image when results must not depend on the batch (a batched convolution
        differs from a single image's in the last bit)."""
        if is_batch_invariant(images.device):
            return torch.cat([encoder(images[i:i + 1]) for i in range(len(images))])
        return encoder(images)

    def _render(self, v: dict[str, torch.Tensor], noise, sigma: float, gens) -> torch.Tensor:
        G, cfg = self.G, self.cfg
        if cfg.space == "s":
            s = v["styles"]
            if sigma > 0:
                s = s + sigma * per_image_randn(gens, s.shape[1:], s.device)
            return self.synthesis(s, noise=noise)
        latent = v["w"] if cfg.space == "w" else v["wplus"]
        if sigma > 0:
            latent = latent + sigma * per_image_randn(gens, latent.shape[1:], latent.device)
        if cfg.space == "fwplus":
            return self.synthesis(v["base_code"], latent, cfg.base_level, noise=noise)
        return self.synthesis(G.to_wplus(latent), noise=noise)

    def _loss(self, img, target, v, base0, noises, mask=None) -> torch.Tensor:
        """Per-image objective [B]: LPIPS in the autocast context of the synthesis, every other term in float32.
        With a known-pixel `mask` [B, 1, H, W] (Image2StyleGAN++ inpainting) the image terms see only known
        pixels: LPIPS of both images multiplied by the mask, MSE averaged over the known pixels."""
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast):
            seen = (img * mask, target * mask) if mask is not None else (img, target)
            loss = cfg.lpips_weight * self.perceptual(*seen).float() if cfg.lpips_weight else 0
        with torch.autocast(self.device.type, enabled=False):  # every term below also casts its inputs to float32
            if cfg.mse_weight:
                loss = loss + cfg.mse_weight * metrics.mse(img, target, mask)
            if cfg.optimize_noise and cfg.noise_weight:
                loss = loss + cfg.noise_weight * noise_regularizer(noises)
            if cfg.space == "fwplus" and cfg.f_weight:
                loss = loss + cfg.f_weight * (v["base_code"].float() - base0).square().mean(dim=(1, 2, 3))
            if self.p_stats is not None:
                wplus = self.G.to_wplus(v.get("w", v.get("wplus")))
                loss = loss + cfg.pnorm_weight * pnorm_penalty(wplus, self.p_stats)
        return loss

    # ----- the loop ----------------------------------------------------------------------------------------------
    def run(self, images: torch.Tensor, keys: list[str], steps: int | None = None,
            masks: torch.Tensor | None = None) -> dict:
        """Invert a batch (`steps` overrides the recipe's count, e.g. for a memory probe); `masks` [B, 1, H, W] in
        [0, 1] marks the known pixels (1) of each image: the losses and metrics see only those."""
        nhwc = self.G.size >= CHANNELS_LAST_FROM if self.cfg.channels_last is None else self.cfg.channels_last
        with batch_invariance(self.cfg.batch_invariant), channels_last(nhwc):
            return self._run(images, keys, self.cfg.steps if steps is None else steps, masks)

    def _run(self, images: torch.Tensor, keys: list[str], steps: int, masks=None) -> dict:
        G, cfg = self.G, self.cfg
        if images.shape[1:] != (3, G.size, G.size):
            raise ValueError(f"images must be [B, 3, {G.size}, {G.size}], got {list(images.shape)}")
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
        t0 = time.perf_counter()
        target = images.to(self.device, torch.float32)
        mask = masks.to(self.device, torch.float32) if masks is not None else None
        gens = [key_generator(cfg.seed, k) for k in keys]
        v = {k: t.requires_grad_(True) for k, t in self._initial_variables(target).items()}
        base0 = v["base_code"].detach().clone() if "base_code" in v else None
        if cfg.optimize_noise:
            noises = [per_image_randn(gens, buf.shape[1:], self.device).requires_grad_(True)
                      for buf in G.make_noise(1, "const")]
        else:
            noises = G.make_noise(1, "const")
        params = list(v.values()) + (noises if cfg.optimize_noise else [])
        opt = torch.optim.Adam(params, lr=cfg.lr)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            sigma = self.sigma_w * cfg.latent_noise * max(0.0, 1 - step / cfg.steps / 0.75) ** 2
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast):
                img = self._render(v, noises, sigma, gens)
            loss = self._loss(img, target, v, base0, noises, mask)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if cfg.optimize_noise:
                normalize_noise_(noises)
        return self._result(v, noises, target, time.perf_counter() - t0, mask)

    @torch.no_grad()
    def _result(self, v, noises, target, seconds: float, mask=None) -> dict:
        cfg, b = self.cfg, target.shape[0]
        recon = self._render(v, noises, 0.0, None).float()
        out = {name: t.detach() for name, t in v.items()}
        if "w" in out:
            out["wplus"] = self.G.to_wplus(out.pop("w")).contiguous()
        seen = (recon * mask, target * mask) if mask is not None else (recon, target)
        out.update(recon=recon, mse=metrics.mse(recon, target, mask), psnr=metrics.psnr(recon, target, mask),
                   lpips=self.perceptual(*seen) if self.perceptual is not None else
                   torch.full((b,), float("nan"), device=recon.device),
                   steps=torch.full((b,), cfg.steps), seconds=torch.full((b,), seconds / b),
                   lpips_net=cfg.lpips_net, lpips_backbone=self.lpips_backbone)
        if self.identity is not None:
            out["id_sim"] = metrics.identity_similarity(self.identity, recon, target)
        if cfg.optimize_noise:
            out["noises"] = [n.detach() for n in noises]
        return out


def invert(G, images: torch.Tensor, keys: list[str], config: InvertConfig, encoder=None, identity=None,
           masks: torch.Tensor | None = None) -> dict:
    """Invert a batch. Returns `wplus` [B,L,D] (w, wplus, fwplus), `styles` [B,n_S] (s), `base_code` [B,C,s,s]
    (fwplus), `recon` [B,3,H,W], per-image `mse`, `psnr`, `lpips`, `steps`, `seconds` [B], `id_sim` [B] when an
    `identity` embedder (images -> L2-normalised [B, E]) is given, `noises` (when optimised), and the
    `lpips_net` / `lpips_backbone` labels. `masks` [B, 1, H, W] (1 where a pixel is known): losses and metrics see
    only the known pixels; `recon` fills the rest."""
    return Inverter(G, config, encoder=encoder, identity=identity).run(images, keys, masks=masks)
