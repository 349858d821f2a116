"""Latent-space regularisers: the P_N+ penalty (Zhu et al. 2020, used by BDInvert) and the projector's noise-map
regulariser. Everything is per image: [B, ...] in, [B] out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

P_SLOPE = 5.0  # leaky ReLU slope that undoes the mapping network's last 0.2 slope


@dataclass
class PSpaceStats:
    """Mean `mean` [D], eigenvalues `eigvals` [D] (descending) and eigenvectors `eigvecs` [D, D] (columns) of
    x = LReLU_5(mapping(z)), from `n` samples of one generator."""

    mean: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor
    n: int

    def to(self, device) -> "PSpaceStats":
        return PSpaceStats(self.mean.to(device), self.eigvals.to(device), self.eigvecs.to(device), self.n)


def float32(x: torch.Tensor):
    """A block computed in float32 whatever autocast context it is called from (losses and regularisers)."""
    return torch.autocast(x.device.type, enabled=False)


def to_p_space(w: torch.Tensor) -> torch.Tensor:
    with float32(w):
        return F.leaky_relu(w.float(), P_SLOPE)


@torch.no_grad()
def compute_p_space_stats(G, n: int, seed: int = 0, batch: int = 10_000) -> PSpaceStats:
    """Mean and unbiased covariance accumulated in float64 over n mapped samples, then a symmetric eigensolver."""
    gen = torch.Generator().manual_seed(seed)
    device = G.device
    total = torch.zeros(G.style_dim, dtype=torch.float64)
    outer = torch.zeros(G.style_dim, G.style_dim, dtype=torch.float64)
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), G.style_dim, generator=gen).to(device)
        x = to_p_space(G.mapping(z)).double().cpu()
        total += x.sum(0)
        outer += x.t() @ x
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = torch.argsort(eigvals, descending=True)
    return PSpaceStats(mean.float(), eigvals[order].float(), eigvecs[:, order].float(), n)


def load_or_compute_p_space_stats(G, n: int, seed: int = 0, cache_dir: str | None = None) -> PSpaceStats:
    """Cached by generator id (a file per generator, sample count and seed) when `cache_dir` is given."""
    from ops.latents import cached

    def compute():
        stats = compute_p_space_stats(G, n, seed)
        return {"mean": stats.mean, "eigvals": stats.eigvals, "eigvecs": stats.eigvecs, "n": torch.tensor(n)}

    d = cached(G, cache_dir, f"pspace-n{n}-s{seed}", compute)
    return PSpaceStats(d["mean"], d["eigvals"], d["eigvecs"], int(d["n"]))


def pnorm_penalty(wplus: torch.Tensor, stats: PSpaceStats) -> torch.Tensor:
    """mean over rows and channels of v^2, v = Lambda^-1/2 C^T (LReLU_5(w) - mu), per image: [B, L, D] -> [B].
    Its expected value over the generator's own samples is 1; eigenvalues are floored only against division by 0."""
    from models.stylegan2 import per_sample

    with float32(wplus):
        floor = stats.eigvals.max() * 1e-12
        centred = to_p_space(wplus) - stats.mean
        # per image in invariant mode: a GEMM's rounding depends on its row count (see batch_invariance)
        v = per_sample(lambda x: x @ stats.eigvecs, centred) * torch.rsqrt(stats.eigvals.clamp_min(floor))
        return v.square().mean(dim=tuple(range(1, v.ndim)))


def noise_regularizer(noises: list[torch.Tensor]) -> torch.Tensor:
    """Projector noise penalty per image: squared 1-pixel circular autocorrelations (x and y) of every map, at every
    2x box-downsampled level down to 8x8. noises: list of [B, 1, r, r] -> [B]. Float32 under autocast."""
    total = 0
    with float32(noises[0]):
        for noise in noises:
            noise, size = noise.float(), noise.shape[-1]
            while True:
                total = total + (noise * torch.roll(noise, 1, dims=3)).mean(dim=(1, 2, 3)).square() \
                    + (noise * torch.roll(noise, 1, dims=2)).mean(dim=(1, 2, 3)).square()
                if size <= 8:
                    break
                noise = F.avg_pool2d(noise, 2)
                size //= 2
    return total


@torch.no_grad()
def normalize_noise_(noises: list[torch.Tensor]) -> None:
    """In place, per image: zero mean, unit (unbiased) std, as the projector does after every step."""
    for noise in noises:
        mean = noise.mean(dim=(1, 2, 3), keepdim=True)
        std = noise.std(dim=(1, 2, 3), keepdim=True)
        noise.sub_(mean).div_(std)
