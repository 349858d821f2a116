"""Encoder, hybrid and optimisation inversion at their costs, and Ray Train's training throughput.

1. Throughput: `latentray train-encoder` (pipelines.train) for TPUT_STEPS steps with 1 worker x 1 CPU, 1 worker x 2
   CPUs and 2 workers x 1 CPU (DDP, gloo), samples/s as the workers measure them (training steps only).
2. Trade-off: an e4e encoder trained with 2 workers for TRAIN_STEPS steps on the bundled generator's samples (its
   own seeded training streams), then, on HELD_OUT images (samples of seeds the training streams never draw) and on
   the same images shifted 1/8 and rotated 10 degrees: W+ optimisation 100/300/1000 steps from w_avg, the encoder
   alone, and the encoder + 50/100/300 steps. PSNR, LPIPS, image-steps and wall seconds per image; plot in
   benchmarks/encoder_tradeoff.png.

Every inversion uses the invert stage's recipe (projector lr 0.1 with its ramps, LPIPS, constant noise) with the
random LPIPS-alex backbone (no ImageNet weights offline) and the batched path, 2 threads."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import machine_line, write_section  # noqa: E402
from models.default_generator import load_default_generator  # noqa: E402
from models.encoders import load_style_encoder  # noqa: E402
from ops.geometry import similarity_warp  # noqa: E402
from ops.invert import InvertConfig, invert  # noqa: E402
from ops.train_encoder import EncoderTrainConfig, stream_generator, training_batch  # noqa: E402

TPUT_STEPS, TRAIN_STEPS, HELD_OUT = 30, 800, 8
OPT_STEPS, HYBRID_STEPS = (100, 300, 1000), (0, 50, 100, 300)
LPIPS = dict(lpips_net="alex", lpips_backbone="random")
PLOT = Path(__file__).with_name("encoder_tradeoff.png")
READING = """What this shows, and what it does not. The bundled generator is untrained and the encoder saw 12,800 of its samples (e4e's FFHQ encoder trained 300,000 steps of 8 images); the held-out samples come from the distribution it trained on, the shifted set does not (as real photos are not GAN samples). At equal steps the encoder start is ahead while the steps are few (+2 dB at 100 steps on held-out samples) and the lead shrinks as they grow; on the shifted set it is gone by 100 steps. The refinement is the invert stage's projector recipe, made for a w_avg start (lr 0.1 with warm-up, cosine decay and exploration noise that first pushes the start away); a gentler schedule for encoder starts was not tried (it would be chosen on other images than these). The issue's goal, hybrid within 0.5 dB of 1000-step optimisation at 5x less compute, is not met here: 3.4x on held-out samples, not reached within 300 steps on the shifted set. A fully trained encoder starts much closer to the optimum (FFHQ, HyperStyle's table in spec/performance-anchors.md: e4e LPIPS 0.20 in 0.1 s, optimisation 0.09 in 228 s), which is where hybrid's published savings come from; these figures measure the machinery (training on Ray Train, hybrid starts, the trade-off curve), not that saving."""


def train(out: Path, steps: int, workers: int, cpus: int) -> dict:
    from pipelines.train import TrainOptions, train as run

    cfg = EncoderTrainConfig(steps=steps, batch_size=8, validation_samples=16, **LPIPS)
    return run(str(out), cfg, TrainOptions(workers=workers, cpus_per_worker=cpus, checkpoint_every=max(1, steps // 4),
                                           device="cpu"))


def held_out(G) -> dict[str, torch.Tensor]:
    _, images = training_batch(G, HELD_OUT, stream_generator(12345, "benchmark held-out", 0, 0), psi=1.0)
    return {"held-out samples": images,
            "shifted 1/8, rotated 10°": similarity_warp(images, degrees=10, shift=(0.125, 0.0), padding="reflection")}


def measure(G, images, steps: int, encoder) -> dict:
    keys = [f"img{i}" for i in range(len(images))]
    cfg = InvertConfig(space="wplus", steps=steps, optimize_noise=False, batch_invariant=False, **LPIPS)
    t0 = time.perf_counter()
    result = invert(G, images, keys, cfg, encoder=encoder)
    seconds = (time.perf_counter() - t0) / len(images)
    return {"psnr": result["psnr"].mean().item(), "lpips": result["lpips"].mean().item(), "image_steps": steps,
            "seconds": seconds}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), dpi=100)
    for ax, (name, rows) in zip(axes, results.items()):
        for method, marker in (("optimisation", "o-"), ("encoder + steps", "s-")):
            pts = [(r["seconds"], r["psnr"], r["label"]) for r in rows if r["method"] == method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=method)
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set(xscale="log", xlabel="seconds per image (2 CPU threads)", ylabel="PSNR dB", title=name)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOT)
    plt.close(fig)


def main() -> None:
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench_encoder-"))
    try:
        tput = {}
        for workers, cpus in ((1, 1), (1, 2), (2, 1)):
            record = train(work / f"tput-{workers}x{cpus}", TPUT_STEPS, workers, cpus)
            tput[(workers, cpus)] = (record["validation"][-1]["samples_per_s"], record["seconds"])
        t0 = time.perf_counter()
        record = train(work / "encoder", TRAIN_STEPS, 2, 1)
        train_seconds = time.perf_counter() - t0
        G = load_default_generator().requires_grad_(False)
        encoder = load_style_encoder(record["encoder"])
        results = {}
        for name, images in held_out(G).items():
            rows = [{"method": "optimisation", "label": f"{k} steps", **measure(G, images, k, None)}
                    for k in OPT_STEPS]
            rows += [{"method": "encoder + steps", "label": f"+{k}" if k else "encoder only",
                      **measure(G, images, k, encoder)} for k in HYBRID_STEPS]
            results[name] = rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot(results)

    val = record["validation"][-1]
    lines = [f"Machine: {machine_line()}. Bundled 64-px generator (untrained weights, see below); encoder: e4e "
             f"recipe (`latentray train-encoder` defaults: Adam 1e-4, L2 1 + LPIPS 0.8 + delta 2e-4 + W+ regression "
             f"1, progressive rows), IR-SE50 widths 16/16/24/32 at 64 px, {TRAIN_STEPS} steps x 2 workers x 8 "
             f"images ({TRAIN_STEPS * 16:,} generator samples) in {train_seconds:.0f} s; its own validation "
             f"samples: {val['val_psnr']:.2f} dB vs {val['start_psnr']:.2f} dB from w_avg. {HELD_OUT} images per "
             "set, from a seed the training streams never draw; LPIPS-alex with a random backbone; W+ with the invert "
             "stage's recipe (projector lr 0.1 with ramps, constant noise); seconds per image on 2 threads, batched.",
             "", "Training throughput (Ray Train, TorchTrainer, gloo; samples/s over the training steps, "
             f"{TPUT_STEPS} steps of 8 images per worker):", "",
             "| workers x CPUs | samples/s | whole run s (incl. Ray Train start) |", "|---|---:|---:|"]
    lines += [f"| {w} x {c} | {s:.1f} | {t:.0f} |" for (w, c), (s, t) in tput.items()]
    for name, rows in results.items():
        lines += ["", f"**{name}**", "", "| method | image-steps | s / image | PSNR dB | LPIPS |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['method']}: {r['label']} | {r['image_steps']} | {r['seconds']:.3f} | {r['psnr']:.2f} | "
                  f"{r['lpips']:.4f} |" for r in rows]
        target = next(r for r in rows if r["label"] == "1000 steps")
        match = next((r for r in rows if r["method"] == "encoder + steps" and r["psnr"] >= target["psnr"] - 0.5), None)
        if match is None:
            lines += ["", f"No hybrid budget here came within 0.5 dB of 1000-step optimisation ({target['psnr']:.2f} dB)."]
        else:
            lines += ["", f"Hybrid within 0.5 dB of 1000-step optimisation ({target['psnr']:.2f} dB): "
                          f"{match['label']} ({match['psnr']:.2f} dB) at {match['seconds']:.3f} s per image, "
                          f"{target['seconds'] / match['seconds']:.1f}x less time than {target['seconds']:.3f} s."]
    lines += ["", READING]
    lines += ["", f"![PSNR against seconds per image]({PLOT.relative_to(PLOT.parents[1])})"]
    write_section("encoder", "## Encoder, hybrid and optimisation inversion (`benchmarks/bench_encoder.py`)\n\n" +
                  "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
