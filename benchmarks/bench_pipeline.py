"""End-to-end rows/s of the Ray invert pipeline against the same ops in a plain loop in one process (read + decode +
align, invert, atomic part write), same images, same cores, in one run. Bundled generator, W+, LPIPS-alex with the
random backbone, `--align none` on generator samples plus FFHQ alignment on the public-domain portraits."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import machine_line, write_section  # noqa: E402
from ops.align import AlignConfig  # noqa: E402
from ops.ingest import IngestConfig, IngestStage, list_inputs  # noqa: E402
from ops.invert import InvertConfig  # noqa: E402
from ops.invert_stage import InvertStage, InvertStageConfig  # noqa: E402
from ops.stage import Context, objects  # noqa: E402
from pipelines import invert  # noqa: E402
from pipelines.demo import write_synthetic  # noqa: E402
from pipelines.runtime import RunOptions, run, write_batch  # noqa: E402

STEPS, BATCH, N = 20, 4, 16


def plain_loop(inputs: list[str], output: str, cfg: InvertStageConfig, photos: IngestConfig) -> float:
    """The pipeline's own stages, called batch after batch in this process."""
    t0 = time.perf_counter()
    stage = InvertStage(cfg)
    stage.prepare(Context())
    stage.setup()
    ingest = IngestStage.feeding(stage, photos)
    items = list_inputs(inputs)
    for i in range(0, len(items), BATCH):
        chunk = items[i:i + BATCH]
        batch = {"key": objects([k for k, _ in chunk]), "uri": objects([u for _, u in chunk]),
                 "status": objects(["ok"] * len(chunk)), "error_code": objects([""] * len(chunk)),
                 "error": objects([""] * len(chunk))}
        write_batch(stage.process(ingest.process(batch)), output, {}, stage.preview_columns())
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(2)
    cfg = InvertStageConfig(invert=InvertConfig(steps=STEPS, lpips_net="alex", lpips_backbone="random",
                                                optimize_noise=False))
    photos = IngestConfig(alignment=AlignConfig("none"))
    options = RunOptions(batch_size=BATCH, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp) / "in", n=N // 2)
        inputs = [str(Path(tmp) / "in")]
        loop_s = plain_loop(inputs, str(Path(tmp) / "loop"), cfg, photos)
        t0 = time.perf_counter()
        stats = run(invert.ADAPTER, inputs, str(Path(tmp) / "ray"), cfg, photos, options)
        ray_s = time.perf_counter() - t0  # includes Ray start-up, as a user of the CLI pays it
        t0 = time.perf_counter()
        run(invert.ADAPTER, inputs, str(Path(tmp) / "ray_warm"), cfg, photos, options)
        warm_s = time.perf_counter() - t0
    assert stats["by_status"] == {"ok": N}
    body = "\n".join([
        "## Pipeline throughput (`benchmarks/bench_pipeline.py`)",
        "",
        f"Machine: {machine_line()}. {N} images (64×64 generator samples, shifted copies), `--align none`, W+, "
        f"{STEPS} steps, batch {BATCH}, LPIPS-alex (random backbone), one invert actor.",
        "",
        "| runner | seconds | rows/s | vs plain loop |",
        "|---|---:|---:|---:|",
        f"| plain loop, one process | {loop_s:.1f} | {N / loop_s:.2f} | 1.00× |",
        f"| Ray pipeline, cold (incl. `ray.init`) | {ray_s:.1f} | {N / ray_s:.2f} | {loop_s / ray_s:.2f}× |",
        f"| Ray pipeline, warm cluster | {warm_s:.1f} | {N / warm_s:.2f} | {loop_s / warm_s:.2f}× |",
        "",
        "With one actor on 2 cores the pipeline cannot beat the loop on compute; what it buys is decode/align tasks "
        "overlapping the inversion, per-row failure handling, resume, and the same command on a cluster.",
    ])
    write_section("pipeline", body)
    print(body)


if __name__ == "__main__":
    main()
