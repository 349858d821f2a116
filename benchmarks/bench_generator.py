"""Forward cost of our Generator at 256 config-f (random weights, batch 1, CPU float32) against the reference
figures in shared/reference/stylegan2/flops_timing_config_f.json (rosinality code on the same kind of machine), and
our batched (non-fused) modulated convolutions against rosinality's per-sample grouped convolution, side by side."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import machine_line, write_section  # noqa: E402
from models.stylegan2 import Generator  # noqa: E402

REFERENCE_JSON = Path(__file__).resolve().parents[2] / "shared/reference/stylegan2/flops_timing_config_f.json"


def time_runs(fn, runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def grouped_conv_synthesis(G: Generator, wplus: torch.Tensor) -> torch.Tensor:
    """Rosinality's per-sample path (one modulated weight per image, groups=B), for the side-by-side ratio."""
    import torch.nn.functional as F

    def modconv(layer, x, s, demod=True):
        b, cin, h, w = x.shape
        wt = layer.weight * layer.scale * s.view(b, 1, cin, 1, 1)
        if demod:
            wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4]) + 1e-8).view(b, -1, 1, 1, 1)
        cout, k = wt.shape[1], wt.shape[-1]
        if layer.upsample:
            wt = wt.transpose(1, 2).reshape(b * cin, cout, k, k)
            out = F.conv_transpose2d(x.reshape(1, b * cin, h, w), wt, stride=2, groups=b)
            return layer.blur(out.view(b, cout, *out.shape[-2:]))
        out = F.conv2d(x.reshape(1, b * cin, h, w), wt.reshape(b * cout, cin, k, k), padding=k // 2, groups=b)
        return out.view(b, cout, h, w)

    styles = G.styles(wplus)
    noises = G.make_noise(wplus.shape[0])
    x = G.input(wplus.shape[0])
    skip = None
    for name, module, _, _, is_rgb in G._modulated_layers():
        if is_rgb:
            y = modconv(module.conv, x, styles[name], demod=False) + module.bias
            skip = y if skip is None else y + module.upsample(skip)
        else:
            idx = 0 if name == "conv1" else int(name.split(".")[1]) + 1
            x = module.activate(module.noise(modconv(module.conv, x, styles[name]), noises[idx]))
    return skip


def forward_backward(synthesis, wplus: torch.Tensor) -> None:
    """One inversion-style step: image from W+, gradient w.r.t. W+ only (weights frozen)."""
    x = wplus.clone().requires_grad_(True)
    synthesis(x).square().mean().backward()


def main() -> None:
    torch.set_num_threads(2)
    ref = json.loads(REFERENCE_JSON.read_text())["256"] if REFERENCE_JSON.exists() else None
    torch.manual_seed(0)
    G = Generator(256).eval().requires_grad_(False)
    wplus = torch.randn(1, G.n_latent, 512)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            G.synthesis(wplus)
        flops = counter.get_total_flops()
        ours = time_runs(lambda: G.synthesis(wplus), 7)
        grouped = time_runs(lambda: grouped_conv_synthesis(G, wplus), 7)
        w4 = torch.randn(4, G.n_latent, 512)
        ours4 = time_runs(lambda: G.synthesis(w4), 3)
        grouped4 = time_runs(lambda: grouped_conv_synthesis(G, w4), 3)
        err = (G.synthesis(w4) - grouped_conv_synthesis(G, w4)).abs().max().item()
    ours_fb = time_runs(lambda: forward_backward(lambda x: G.synthesis(x), w4), 2)
    grouped_fb = time_runs(lambda: forward_backward(lambda x: grouped_conv_synthesis(G, x), w4), 2)
    rows = [
        "| | ours (non-fused; image by image on CPU) | per-sample grouped conv (rosinality's path) | reference JSON (rosinality code) |",
        "|---|---:|---:|---:|",
        f"| FLOPs W+→image, batch 1 | {flops / 1e9:.2f} G | same ops | {ref['flops_fwd_wplus_to_img'] / 1e9:.2f} G |" if ref else "",
        f"| forward batch 1, min / median s | {min(ours):.2f} / {statistics.median(ours):.2f} | {min(grouped):.2f} / {statistics.median(grouped):.2f} | "
        + (f"{ref['time_fwd_b1_s_min']:.2f} / {ref['time_fwd_b1_s_median']:.2f} |" if ref else "— |"),
        f"| forward batch 4, min s | {min(ours4):.2f} | {min(grouped4):.2f} | — |",
        f"| forward + backward w.r.t. W+ (weights frozen), batch 4, min s | {min(ours_fb):.2f} | {min(grouped_fb):.2f} | — |",
    ]
    body = "\n".join([
        "## Generator forward, 256 config-f (`benchmarks/bench_generator.py`)",
        "",
        f"Machine: {machine_line()}. Random weights, float32, no_grad, const noise. "
        f"Max |Δ| between the two paths at batch 4: {err:.1e}.",
        "",
        *[r for r in rows if r],
        "",
        f"Speed-up of ours over the grouped path at batch 4: forward {min(grouped4) / min(ours4):.2f}×, "
        f"forward+backward {min(grouped_fb) / min(ours_fb):.2f}× (inversion's step: with frozen weights the "
        "non-fused form needs no weight-gradient convolution)"
        + (f"; ours / reference-JSON minimum at batch 1: {min(ours) / ref['time_fwd_b1_s_min']:.2f}× "
           "(the JSON was timed on a loaded machine, see its note)." if ref else "."),
    ])
    write_section("generator", body)
    print(body)


if __name__ == "__main__":
    main()
