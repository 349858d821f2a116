"""The device path on CPU, side by side in one run: batch-invariant inversion (per-image convolutions, row-wise
affines, per-image LPIPS: CPU's default) against the batched path a GPU runs (`batch_invariant=False`), at batch
1/4/8/16 on the bundled 64-px model; torch.compile and channels-last on top; achieved GFLOP/s against the measured
matmul peak at 64 px and 256 config-f; and how far an image's result drifts with its batch on the batched path."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import machine_line, write_section  # noqa: E402
from models.default_generator import load_default_generator  # noqa: E402
from models.stylegan2 import Generator  # noqa: E402
from ops.invert import InvertConfig, Inverter  # noqa: E402

STEPS, FAST = 20, dict(lpips_net="alex", lpips_backbone="random", optimize_noise=False)


def samples(G, n: int, seed: int) -> torch.Tensor:
    with torch.no_grad():
        w = G.mapping(torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed)))
        return G.synthesis(w).clamp(-1, 1)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def image_steps_per_s(inverter: Inverter, images: torch.Tensor, steps: int, repeats: int = 2) -> float:
    keys = [f"k{i}" for i in range(len(images))]
    inverter.run(images, keys, steps=1)  # warm-up (and compilation, when compiled)
    return len(images) * steps / min(timed(lambda: inverter.run(images, keys, steps=steps)) for _ in range(repeats))


def matmul_peak_flops(n: int = 2048, runs: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b) for _ in range(runs))


def step_flops(inverter: Inverter, images: torch.Tensor) -> float:
    """FLOPs of one optimisation step (render, losses, backward) counted by FlopCounterMode."""
    v = {k: t.requires_grad_(True) for k, t in inverter._initial_variables(images).items()}
    with FlopCounterMode(display=False) as counter:
        img = inverter._render(v, inverter.G.make_noise(1), 0.0, None)
        inverter._loss(img, images, v, None, None).sum().backward()
    return counter.get_total_flops()


def drift(G, images: torch.Tensor, steps: int) -> tuple[float, float]:
    """Batched path: image 0 inverted alone vs in its batch -> (max |dW+|, |dPSNR| in dB)."""
    inverter = Inverter(G, InvertConfig(space="wplus", steps=steps, batch_invariant=False, **FAST))
    keys = [f"k{i}" for i in range(len(images))]
    batch, alone = inverter.run(images, keys), inverter.run(images[:1], keys[:1])
    return ((batch["wplus"][0] - alone["wplus"][0]).abs().max().item(),
            (batch["psnr"][0] - alone["psnr"][0]).abs().item())


def main() -> None:
    torch.set_num_threads(2)
    G = load_default_generator()
    images = samples(G, 16, seed=0)
    config = dict(space="wplus", steps=STEPS, **FAST)
    invariant = Inverter(G, InvertConfig(batch_invariant=True, **config))
    batched = Inverter(G, InvertConfig(batch_invariant=False, **config))
    rows = ["| batch | invariant (CPU default): image-steps/s | batched (device path): image-steps/s | batched / "
            "invariant |", "|---:|---:|---:|---:|"]
    for b in (1, 4, 8, 16):
        slow, fast = image_steps_per_s(invariant, images[:b], STEPS), image_steps_per_s(batched, images[:b], STEPS)
        rows.append(f"| {b} | {slow:.1f} | {fast:.1f} | {fast / slow:.2f}× |")
        print(rows[-1], flush=True)
    extras = ["| at batch 8, batched path | image-steps/s | vs plain batched |", "|---|---:|---:|"]
    plain = image_steps_per_s(batched, images[:8], STEPS)
    t0 = time.perf_counter()
    compiled = Inverter(G, InvertConfig(batch_invariant=False, compile=True, **config))
    compiled.run(images[:8], [f"k{i}" for i in range(8)], steps=1)
    compile_s = time.perf_counter() - t0
    nhwc = Inverter(G, InvertConfig(batch_invariant=False, channels_last=True, **config))
    for name, inverter in (("plain", batched), (f"torch.compile (first step {compile_s:.1f} s)", compiled),
                           ("channels-last", nhwc)):
        rate = plain if inverter is batched else image_steps_per_s(inverter, images[:8], STEPS)
        extras.append(f"| {name} | {rate:.1f} | {rate / plain:.2f}× |")
        print(extras[-1], flush=True)
    peak = matmul_peak_flops()
    flops_rows = ["| model, path, batch | GFLOP per image-step | achieved GFLOP/s | share of matmul peak |",
                  "|---|---:|---:|---:|"]
    big = Generator(256).eval().requires_grad_(False)
    big_images = samples(big, 2, seed=1)
    for name, model, imgs, steps, extra in (
            ("64 px, batched, 8", G, images[:8], STEPS, {}),
            ("64 px, invariant, 8", G, images[:8], STEPS, {"batch_invariant": True}),
            ("256 config-f, batched, 2", big, big_images, 2, {}),
            ("256 config-f, batched + channels-last, 2", big, big_images, 2, {"channels_last": True}),
            ("256 config-f, invariant, 2", big, big_images, 2, {"batch_invariant": True, "channels_last": False}),
            ("256 config-f, invariant + channels-last, 2", big, big_images, 2, {"batch_invariant": True,
                                                                              "channels_last": True})):
        cfg = InvertConfig(**{**config, "steps": steps, "batch_invariant": False, "channels_last": False, **extra})
        inverter = Inverter(model, cfg)
        flops = step_flops(inverter, imgs) / len(imgs)
        rate = image_steps_per_s(inverter, imgs, steps, repeats=1)
        flops_rows.append(f"| {name} | {flops / 1e9:.2f} | {flops * rate / 1e9:.1f} | "
                          f"{100 * flops * rate / peak:.0f} % |")
        print(flops_rows[-1], flush=True)
    drifts = [(steps, *drift(G, samples(G, 4, seed=7), steps)) for steps in (50, 300)]
    body = "\n".join([
        "## Device path on CPU (`benchmarks/bench_device_path.py`)",
        "",
        f"Machine: {machine_line()}. Bundled 64×64 generator, W+, {STEPS} steps, LPIPS-alex (random backbone), "
        "constant noise. *Invariant* is CPU's default (`batch_invariant` None): per-image convolutions and LPIPS, "
        "row-wise affines. *Batched* (`--no-batch-invariant`, CUDA's default) makes one call per batch: the code a "
        "GPU runs, here on CPU.",
        "",
        *rows,
        "",
        *extras,
        "",
        f"Achieved FLOP/s of one step (forward + backward, counted by FlopCounterMode) against a measured 2048² "
        f"float32 matmul peak of {peak / 1e9:.0f} GFLOP/s:",
        "",
        *flops_rows,
        "",
        "Drift of an image's result with its batch on the batched path (image inverted alone vs in a batch of 4, "
        "same key; the invariant path gives 0 exactly, `tests/test_invert.py`):",
        "",
        "| steps | max \\|ΔW+\\| | \\|ΔPSNR\\| |",
        "|---:|---:|---:|",
        *[f"| {s} | {dw:.2e} | {dp:.3f} dB |" for s, dw, dp in drifts],
    ])
    write_section("device_path", body)
    print(body)


if __name__ == "__main__":
    main()
