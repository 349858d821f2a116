"""Train BDInvert's base-code encoder on the generator's own samples (spec/bdinvert.md §2.2).

Data: z -> w -> W+ with truncation psi 0.7 (toward w_avg) on rows 0-7, I = G(W+) with constant noise.
Loss through the generator with the ground-truth detail code: x = G_F(E(I), W+); mean((x - I)^2) + 10 LPIPS(x, I).
Adam lr 1e-3, x0.1 every `steps // 5` iterations (10,000 / 2,000 in the release). Seeded; runs on G's device.

`python -m ops.train_encoder` rebuilds the small encoder shipped for the bundled generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.encoders import BaseCodeEncoder


@dataclass(frozen=True)
class EncoderTrainConfig:
    level: int = 16  # base-code resolution
    steps: int = 10_000  # iterations
    batch_size: int = 16
    lr: float = 1e-3
    lpips_weight: float = 10.0
    lpips_net: str = "vgg"
    lpips_backbone: str = "imagenet"
    width: int = 128  # first-stage channels of the encoder (release: 128)
    max_width: int = 512
    seed: int = 1


def training_batch(G, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(W+, image) pairs drawn from the generator, truncated like the release's training data."""
    z = torch.randn(n, G.style_dim, generator=gen).to(G.device)
    with torch.no_grad():
        wplus = G.to_wplus(G.mapping(z)).clone()
        if G.w_avg is not None:
            wplus[:, :8] = G.truncate(wplus[:, :8], G.w_avg, 0.7)
        return wplus, G.synthesis(wplus)


def train_basecode_encoder(G, cfg: EncoderTrainConfig, log_every: int = 0, history: list | None = None
                           ) -> BaseCodeEncoder:
    """Train on the generator's own (W+, image) pairs; each step's loss is appended to `history` when given."""
    from ops.invert import shared_perceptual

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        encoder = BaseCodeEncoder(cfg.level, G.channels[cfg.level], cfg.width, cfg.max_width)
    encoder.to(G.device).train()
    encoder.generator_id = getattr(G, "generator_id", None)
    perceptual = shared_perceptual(cfg.lpips_net, cfg.lpips_backbone)
    opt = torch.optim.Adam(encoder.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.steps // 5), gamma=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        wplus, images = training_batch(G, cfg.batch_size, gen)
        recon = G.synthesis_from_base_code(encoder(images), wplus, cfg.level)
        loss = (recon - images).square().mean() + cfg.lpips_weight * perceptual(recon, images).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if history is not None:
            history.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    return encoder.eval().requires_grad_(False)


if __name__ == "__main__":
    from models.default_generator import DEFAULT_GENERATOR_PATH, load_default_generator
    from models.encoders import save_basecode_encoder

    torch.set_num_threads(2)
    G = load_default_generator()
    cfg = EncoderTrainConfig(level=16, steps=600, batch_size=16, width=32, max_width=128,
                             lpips_net="alex", lpips_backbone="random")
    encoder = train_basecode_encoder(G, cfg, log_every=50)
    path = DEFAULT_GENERATOR_PATH.with_name("default_basecode_encoder_l16.pt")
    save_basecode_encoder(encoder, str(path))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) for generator {G.generator_id[:12]}")
