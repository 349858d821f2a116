"""Encoder training for any generator (no Ray): the maths of one step, the data, validation and the saved file.
pipelines/train.py runs these steps on Ray Train workers; `train_locally` runs them in this process.

* `wplus`: e4e's Encoder4Editing (models.encoders.StyleEncoder with delta rows, start from latent_avg). Losses of
  e4e's training: L2 1 + LPIPS 0.8 + delta regulariser 2e-4 * sum over trained rows i of ||w_i - w_0||_2 (+ identity
  0.1 * (1 - cos) with an ArcFace given); progressive training: row 0 alone until `progressive_start`, then one
  more delta row every `progressive_every` steps. On the generator's own samples the W+ that made each image is
  known, so those rows also regress to it (`latent_weight`, our addition: it keeps the early encoder on the W
  manifold). Adam at 1e-4 (e4e uses Ranger at 1e-4). Photos (rows of an ingest output) mix into each batch.
* `base_code`: BDInvert's base-code encoder (spec/bdinvert.md §2.2): samples z -> W+ truncated with psi 0.7 on rows
  0-7, loss through G_F with the true W+: MSE + 10 LPIPS; Adam 1e-3, x0.1 every steps // 5.

Every batch is drawn from a generator seeded by (seed, stream, worker rank, step): N workers see N different
batches, a resumed run draws exactly the batches the lost one would have, and validation samples (their own
stream) are never trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from models.encoders import BaseCodeEncoder, StyleEncoder
from ops import metrics

KIND_DEFAULTS = {
    "wplus": dict(lr=1e-4, lpips_weight=0.8, truncation_psi=1.0),
    "base_code": dict(lr=1e-3, lpips_weight=10.0, truncation_psi=0.7),
}
VALIDATION_STREAM = "validation"


@dataclass(frozen=True)
class EncoderTrainConfig:
    kind: Literal["wplus", "base_code"] = "wplus"  # e4e W+ encoder, or BDInvert's base-code encoder
    steps: int = 2000  # optimiser steps; every worker takes each step on its own batch
    batch_size: int = 8  # images per worker per step
    lr: float | None = None  # Adam learning rate (None: 1e-4 for wplus as e4e, 1e-3 for base_code as BDInvert)
    mse_weight: float = 1.0  # weight of the image L2 loss
    lpips_weight: float | None = None  # weight of LPIPS (None: 0.8 for wplus as e4e, 10 for base_code as BDInvert)
    latent_weight: float = 1.0  # wplus: on generator samples, mean squared distance of the W+ to the true one
    delta_weight: float = 2e-4  # wplus: e4e's delta regulariser, sum of ||w_i - w_0||_2 over the trained rows
    identity_weight: float = 0.1  # wplus: weight of 1 - cos(ArcFace) (only when an identity net is given)
    progressive_start: int | None = None  # wplus: step at which delta row 1 starts (None: steps // 5)
    progressive_every: int | None = None  # wplus: steps between delta rows (None: all rows in by 3/4 of training)
    photo_fraction: float = 0.5  # share of each batch taken from photos, when photos are given (wplus only)
    truncation_psi: float | None = None  # samples' truncation toward w_avg (None: 1 for wplus, 0.7 for base_code)
    input_size: int = 0  # wplus: the encoder's input size (0: the generator's size, at most 256 as pSp/e4e)
    widths: tuple[int, ...] = (16, 16, 24, 32)  # wplus: IR-SE50 stage widths (the e4e release: 64, 128, 256, 512)
    level: int = 16  # base_code: resolution of the base code
    width: int = 128  # base_code: first-stage channels (release: 128)
    max_width: int = 512  # base_code: channel cap (release: 512)
    lpips_net: Literal["vgg", "alex"] = "vgg"  # LPIPS backbone network
    lpips_backbone: Literal["imagenet", "random"] = "imagenet"  # random: an explicit offline opt-in for tests
    seed: int = 0  # model initialisation and every data stream
    validation_samples: int = 16  # held-out generator samples scored at every checkpoint

    def resolved(self) -> "EncoderTrainConfig":
        if self.kind not in KIND_DEFAULTS:
            raise ValueError(f"kind must be wplus or base_code, got {self.kind!r}")
        for name in ("steps", "batch_size", "validation_samples"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be {'0' if name == 'steps' else '1'} or more, got "
                                 f"{getattr(self, name)}")
        if not 0 <= self.photo_fraction <= 1:
            raise ValueError(f"photo_fraction must lie in [0, 1], got {self.photo_fraction}")
        defaults = KIND_DEFAULTS[self.kind]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def stream_generator(seed: int, stream: str, rank: int, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{stream}:{rank}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def training_batch(G, n: int, gen: torch.Generator, psi: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """(W+, image) pairs drawn from the generator with constant noise; rows 0-7 truncated toward w_avg by `psi`
    (BDInvert's training data at 0.7)."""
    z = torch.randn(n, G.style_dim, generator=gen).to(G.device)
    with torch.no_grad():
        wplus = G.to_wplus(G.mapping(z)).clone()
        if G.w_avg is not None and psi != 1:
            wplus[:, :8] = G.truncate(wplus[:, :8], G.w_avg, psi)
        return wplus, G.synthesis(wplus)


class EncoderTraining:
    """What every step of one training needs: the generator, the losses, the data streams and the schedule."""

    def __init__(self, G, config: EncoderTrainConfig, identity=None):
        from ops.invert import shared_perceptual, w_statistics

        self.G, self.cfg, self.identity = G, config.resolved(), identity
        cfg = self.cfg
        if cfg.kind == "base_code":
            G._check_level(cfg.level)
        self.perceptual = shared_perceptual(cfg.lpips_net, cfg.lpips_backbone).to(G.device) if cfg.lpips_weight \
            else None
        self.w_avg = w_statistics(G, 10_000, cfg.seed)[0]
        self.input_size = cfg.input_size or min(256, max(64, G.size))
        start = cfg.steps // 5 if cfg.progressive_start is None else cfg.progressive_start
        every = cfg.progressive_every or max(1, (cfg.steps * 3 // 4 - start) // max(1, G.n_latent - 1))
        self.progressive = (start, every)

    # ----- model and schedule ------------------------------------------------------------------------------------
    def new_model(self) -> torch.nn.Module:
        """The untrained encoder, seeded, on the generator's device, in training mode."""
        G, cfg = self.G, self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.kind == "base_code":
                model = BaseCodeEncoder(cfg.level, G.channels[cfg.level], cfg.width, cfg.max_width)
            else:
                model = StyleEncoder(list(cfg.widths), G.style_dim, G.n_latent, delta_rows=True,
                                     latent_avg=self.w_avg.detach().cpu(), input_size=self.input_size)
        model.generator_id = getattr(G, "generator_id", None)
        return model.to(G.device).train()

    def learning_rate(self, step: int) -> float:
        if self.cfg.kind == "base_code":  # the release's StepLR: x0.1 every steps // 5
            return self.cfg.lr * 0.1 ** (step // max(1, self.cfg.steps // 5))
        return self.cfg.lr

    def stage(self, step: int) -> int:
        """e4e's progressive stage: how many delta rows are trained at `step`."""
        start, every = self.progressive
        return 0 if step < start else min(self.G.n_latent - 1, 1 + (step - start) // every)

    # ----- data --------------------------------------------------------------------------------------------------
    def samples(self, stream: str, rank: int, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return training_batch(self.G, n, stream_generator(self.cfg.seed, stream, rank, step), self.cfg.truncation_psi)

    def photo_count(self, photos_available: bool) -> int:
        return round(self.cfg.batch_size * self.cfg.photo_fraction) if photos_available else 0

    def batch(self, rank: int, step: int, photos: torch.Tensor | None = None):
        """(images [B,3,H,W], the W+ of the first rows [k,L,D]): generator samples, then photos when given."""
        n = self.cfg.batch_size - (0 if photos is None else len(photos))
        wplus, images = self.samples("train", rank, step, n)
        if photos is not None and len(photos):
            images = torch.cat([images, photos.to(images.device, images.dtype)])
        return images, wplus

    # ----- losses ------------------------------------------------------------------------------------------------
    def loss(self, model, images: torch.Tensor, wplus: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The batch loss and its parts (floats). `wplus` holds the true W+ of the first len(wplus) images."""
        G, cfg, known = self.G, self.cfg, len(wplus)
        if cfg.kind == "base_code":
            if known != len(images):
                raise ValueError("the base-code encoder trains on generator samples only (it needs the true W+)")
            recon = G.synthesis_from_base_code(model(images), wplus, cfg.level)
            parts = {}
        else:
            stage = self.stage(step)
            pred = model(images, stage=stage)
            recon = G.synthesis(pred)
            deltas = (pred[:, 1:stage + 1] - pred[:, :1]).norm(dim=2).sum(dim=1).mean() if stage else pred.new_zeros(())
            latent = (pred[:known] - wplus).square().mean() if known else pred.new_zeros(())
            parts = {"delta": deltas, "latent": latent}
            if self.identity is not None:
                parts["identity"] = (1 - metrics.identity_similarity(self.identity, recon, images)).mean()
        parts["mse"] = (recon - images).square().mean()
        if self.perceptual is not None:
            parts["lpips"] = self.perceptual(recon, images).mean()
        weights = {"mse": cfg.mse_weight, "lpips": cfg.lpips_weight, "delta": cfg.delta_weight,
                   "latent": cfg.latent_weight, "identity": cfg.identity_weight}
        total = sum(weights[k] * v for k, v in parts.items())
        return total, {"loss": total.item(), **{k: v.item() for k, v in parts.items()}}

    def step(self, model, optimizer, step: int, rank: int = 0, photos: torch.Tensor | None = None) -> dict:
        """One optimiser step on this worker's batch for `step` (with DDP, `model` is the wrapped module)."""
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        images, wplus = self.batch(rank, step, photos)
        loss, parts = self.loss(model, images, wplus, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # which images this step saw (workers' batches must differ)
        parts["digest"] = hashlib.sha256(images.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        return parts

    def optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr)

    # ----- validation and the saved encoder ---------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model) -> dict:
        """Mean PSNR and LPIPS of the encoder's reconstructions of held-out samples (a stream never trained on), and
        of the w_avg start (wplus) or G.base_code(w_avg) (base_code) on the same samples, for reference."""
        G, cfg = self.G, self.cfg
        was_training = model.training
        model.eval()
        wplus, images = self.samples(VALIDATION_STREAM, 0, 0, cfg.validation_samples)
        start = self.w_avg.reshape(1, 1, -1).expand(len(images), G.n_latent, -1)
        if cfg.kind == "base_code":
            recon = G.synthesis_from_base_code(model(images), wplus, cfg.level)
            baseline = G.synthesis_from_base_code(G.base_code(start, cfg.level), wplus, cfg.level)
        else:
            recon, baseline = G.synthesis(model(images)), G.synthesis(start)
        model.train(was_training)
        out = {"val_psnr": metrics.psnr(recon, images).mean().item(),
               "start_psnr": metrics.psnr(baseline, images).mean().item()}
        if self.perceptual is not None:
            out["val_lpips"] = self.perceptual(recon, images).mean().item()
        return out

    def save(self, model, path) -> None:
        """The trained encoder in the file `invert --encoder` / `--basecode-encoder` read."""
        from models.encoders import save_basecode_encoder, save_style_encoder

        model = model.eval()
        if self.cfg.kind == "base_code":
            save_basecode_encoder(model, str(path))
        else:
            save_style_encoder(model, str(path), generator_id=model.generator_id,
                               extra={"trained_by": "latentray train-encoder", "steps": self.cfg.steps})


def photos_to_tensor(images, size: int) -> torch.Tensor:
    """uint8 photos [H, W, 3] (any square size) -> [B, 3, size, size] in [-1, 1]."""
    import numpy as np

    from ops.images import resize_square, to_tensor

    return to_tensor(resize_square(np.stack(images), size))


def plot_curves(history: list[dict]) -> bytes:
    """PNG of the training loss per step and the validation PSNR per checkpoint (with the w_avg start's)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    left.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8)
    left.set(xlabel="step", ylabel="training loss", yscale="log", title="loss (worker 0's batches)")
    checks = [h for h in history if "val_psnr" in h]
    right.plot([h["step"] for h in checks], [h["val_psnr"] for h in checks], "o-", label="encoder")
    right.plot([h["step"] for h in checks], [h["start_psnr"] for h in checks], "--", label="w_avg start")
    right.set(xlabel="step", ylabel="PSNR dB", title="held-out samples")
    right.legend()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def train_locally(G, cfg: EncoderTrainConfig, history: list | None = None, identity=None) -> torch.nn.Module:
    """Train in this process (one worker); each step's loss is appended to `history` when given."""
    training = EncoderTraining(G, cfg, identity=identity)
    model = training.new_model()
    optimizer = training.optimizer(model)
    for step in range(training.cfg.steps):
        parts = training.step(model, optimizer, step)
        if history is not None:
            history.append(parts["loss"])
    return model.eval().requires_grad_(False)


def train_basecode_encoder(G, cfg: EncoderTrainConfig, history: list | None = None) -> BaseCodeEncoder:
    """BDInvert's encoder on the generator's own samples (the release's loop, in this process)."""
    return train_locally(G, dataclasses.replace(cfg, kind="base_code"), history)


if __name__ == "__main__":
    from models.default_generator import DEFAULT_GENERATOR_PATH, load_default_generator
    from models.encoders import save_basecode_encoder

    torch.set_num_threads(2)
    G = load_default_generator()
    cfg = EncoderTrainConfig(kind="base_code", level=16, steps=600, batch_size=16, width=32, max_width=128,
                             lpips_net="alex", lpips_backbone="random")
    encoder = train_basecode_encoder(G, cfg)
    path = DEFAULT_GENERATOR_PATH.with_name("default_basecode_encoder_l16.pt")
    save_basecode_encoder(encoder, str(path))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) for generator {G.generator_id[:12]}")
