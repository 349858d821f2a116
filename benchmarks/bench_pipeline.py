"""End-to-end seconds of the Ray invert pipeline against the same stages called in a plain loop in one process
(read + decode + centre crop, invert, atomic part write), same images and cores: the plain loop, the pipeline on a
cold Ray (`ray.init` included, as a CLI user pays it) and on a warm one.

Every repetition is a fresh process (so "cold" is really cold): cold first, then loop and warm in alternating order
(loop-warm, warm-loop, ...) so that the machine's drift does not favour one side. Median and spread over REPS
repetitions per workload. Each run also sums its rows' `wplus_seconds` (the inversion's own time) to split the
pipeline's extra seconds into slower compute, which grows with the rows, and fixed costs, which do not."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORKLOADS = {"small": dict(images=16, steps=20), "larger": dict(images=32, steps=25)}
BATCH = 4
REPS = 3


def inversion_seconds(out_dir: Path) -> float:
    """Sum of the per-row inversion seconds stored in an output's parts (a batch's time is split over its rows)."""
    import pyarrow.parquet as pq

    return float(sum(pq.read_table(p, columns=["wplus_seconds"]).column(0).to_numpy().sum()
                     for p in out_dir.glob("part-*.parquet")))


def measure(images: int, steps: int, loop_first: bool) -> dict:
    """One repetition in a fresh process: cold pipeline, then loop and warm pipeline (order by `loop_first`);
    seconds and summed inversion seconds of each."""
    import torch

    from benchmarks.report import ok_rows
    from ops.align import AlignConfig
    from ops.ingest import IngestConfig, IngestStage, list_inputs
    from ops.invert import InvertConfig
    from ops.invert_stage import InvertStage, InvertStageConfig
    from ops.stage import objects
    from pipelines import driver
    from pipelines.demo import write_synthetic
    from pipelines.lock import OutputLock

    torch.set_num_threads(2)
    cfg = InvertStageConfig(invert=InvertConfig(steps=steps, lpips_net="alex", lpips_backbone="random",
                                                optimize_noise=False))
    photos = IngestConfig(alignment=AlignConfig("none"))
    options = driver.RunOptions(batch_size=BATCH, progress=False)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp) / "in", n=images // 2)  # images/2 samples + their shifted copies
        inputs = [str(Path(tmp) / "in")]
        items = list_inputs(inputs)

        def loop() -> None:
            stage = InvertStage(cfg).ready()
            ingest = IngestStage.feeding(stage.plan.image_size, photos).ready()
            drop = frozenset(stage.plan.not_stored() | ingest.plan.not_stored())
            with OutputLock(str(Path(tmp) / "loop")) as lock:
                for i in range(0, len(items), BATCH):
                    chunk = items[i:i + BATCH]
                    batch = ok_rows([k for k, _ in chunk], uri=objects([u for _, u in chunk]))
                    driver.write_batch(stage.process(ingest.process(batch)), str(Path(tmp) / "loop"),
                                       {"fingerprint": "loop"}, stage.plan.previews, lock.ticket, "key", drop)

        def pipeline(name: str) -> None:
            stats = driver.run("invert", inputs, str(Path(tmp) / name), cfg, photos, options)
            assert stats["by_status"] == {"ok": images}, stats

        runs = {"cold": lambda: pipeline("cold"), "loop": loop, "warm": lambda: pipeline("warm")}
        for name in ["cold", *(["loop", "warm"] if loop_first else ["warm", "loop"])]:
            t0 = time.perf_counter()
            runs[name]()
            out[name] = time.perf_counter() - t0
            out[name + "_compute"] = inversion_seconds(Path(tmp) / name)
    return out


def main() -> None:
    results = {}
    for name, workload in WORKLOADS.items():
        reps = []
        for rep in range(REPS):
            args = {**workload, "loop_first": rep % 2 == 0}
            code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); " \
                   f"from benchmarks.bench_pipeline import measure; print('RESULT', json.dumps(measure(**{args!r})))"
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
            reps.append(json.loads(done.stdout.split("RESULT", 1)[1]))
            print(name, rep, reps[-1], flush=True)
        results[name] = reps
    report(results)


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """Median with the range of the repetitions."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def report(results: dict) -> None:
    """The BENCHMARKS.md section, from `measure`'s repetitions per workload."""
    from benchmarks.report import machine_line, write_section

    def each(reps, f):
        return [f(r) for r in reps]

    rows = ["| workload | plain loop s | Ray cold s | Ray warm s | pipeline/loop cold | pipeline/loop warm |",
            "|---|---:|---:|---:|---:|---:|"]
    split = ["| workload | warm − loop s | inversion compute: loop s | inversion compute: warm s | "
             "compute ms per image-step: loop / warm | rest (fixed) s |", "|---|---:|---:|---:|---:|---:|"]
    for name, reps in results.items():
        w = WORKLOADS[name]
        label = f"{w['images']} images, {w['steps']} steps"
        rows.append(f"| {label} | {spread(each(reps, lambda r: r['loop']))} | {spread(each(reps, lambda r: r['cold']))} | "
                    f"{spread(each(reps, lambda r: r['warm']))} | "
                    f"{spread(each(reps, lambda r: r['loop'] / r['cold']), '{:.2f}')} | "
                    f"{spread(each(reps, lambda r: r['loop'] / r['warm']), '{:.2f}')} |")
        image_steps = w["images"] * w["steps"]
        split.append(f"| {label} | {spread(each(reps, lambda r: r['warm'] - r['loop']))} | "
                     f"{spread(each(reps, lambda r: r['loop_compute']))} | "
                     f"{spread(each(reps, lambda r: r['warm_compute']))} | "
                     f"{statistics.median(each(reps, lambda r: r['loop_compute'])) / image_steps * 1e3:.1f} / "
                     f"{statistics.median(each(reps, lambda r: r['warm_compute'])) / image_steps * 1e3:.1f} | "
                     f"{spread(each(reps, lambda r: (r['warm'] - r['warm_compute']) - (r['loop'] - r['loop_compute'])))} |")
    body = "\n".join([
        "## Pipeline throughput (`benchmarks/bench_pipeline.py`)",
        "",
        f"Machine: {machine_line()}. Generator samples and shifted copies (64×64), `--align none`, W+, batch {BATCH}, "
        "LPIPS-alex (random backbone), constant noise; one invert actor. The plain loop calls the same stages "
        "(ingest, invert, part writer) in one process; its timing includes the stage setup (models, LPIPS, "
        "statistics), not the imports the benchmark process already paid. "
        f"Each of {REPS} repetitions per workload is a fresh process: the cold pipeline first (`ray.init` "
        "included), then the plain loop and the warm pipeline in alternating order (loop first in odd repetitions, "
        "warm first in even ones), so drift of this machine's shared cores does not favour one side. Cells are the "
        "median and, in brackets, the range of the repetitions; ratios are paired within a repetition.",
        "",
        *rows,
        "",
        "Where the warm pipeline's extra seconds go: every row stores its inversion's own time (`wplus_seconds`, the "
        "batch's time over its rows), so the sum over an output is the time spent inverting. *Rest* is what remains "
        "of warm − loop once the difference in inversion compute is taken out: actor start-up, scheduling, "
        "ingest and write tasks, object store.",
        "",
        *split,
        "",
        "{explanation}",
        "",
        "Causes of the gap found earlier by timestamping the actor's constructor, every batch and every write task "
        "(16-image workload; before the fixes: loop 9.7 s, warm 16.3 s, cold 27.0 s):",
        "",
        "1. **Ray Data runs an actor's UDF on a second thread** (its single-thread wrapper), while the models were "
        "set up on the main one; there, oneDNN's 2-thread convolutions ran 2.5× slower than on the main thread "
        "(3.3 s vs 1.36 s per batch of 4; 1 thread: 1.9 s). Fixed: the UDF runs on the actor's main thread, one "
        "call at a time (`enable_true_multi_threading` with `max_concurrent_calls_per_actor=1`), with the threads "
        "of the CPUs it declares (`cpu_actor_threads`).",
        "2. **Actor start-up**, fixed per run: a new worker process importing torch, torchvision (via lpips) and "
        "the stage, then the same setup the loop pays. Tried and dropped: a worker setup hook pre-importing torch "
        "(every idle worker importing torch at once delayed the cold run's first ready actor from 5.7 s to 15 s).",
        "3. **`ray.init`** and the session's first dataset: cold runs only (cold − warm).",
        "4. Object store, Arrow ↔ numpy and the atomic part writes: ~10 ms per ingest task, 20–50 ms per part "
        "write. The CPU tasks (decode, align, write) do not import torch.",
    ])
    body = body.replace("{explanation}", explanation(results))
    write_section("pipeline", body)
    print(body)


def explanation(results: dict) -> str:
    """Why the gap grows with the work: the part of it that is slower compute against the part that is fixed."""
    def med(reps, f):
        return statistics.median(f(r) for r in reps)

    small, large = results["small"], results["larger"]
    gap = [med(reps, lambda r: r["warm"] - r["loop"]) for reps in (small, large)]
    slower = [med(reps, lambda r: r["warm_compute"] / r["loop_compute"] - 1) for reps in (small, large)]
    rest = [med(reps, lambda r: (r["warm"] - r["warm_compute"]) - (r["loop"] - r["loop_compute"]))
            for reps in (small, large)]
    ceiling = 1 / (1 + max(slower))
    return (f"The gap grows with the work ({gap[0]:.1f} s → {gap[1]:.1f} s) because the inversion itself runs "
            f"{slower[0] * 100:.0f} % and {slower[1] * 100:.0f} % slower in the actor than in the loop: that share "
            f"grows with the rows, while the rest stays at {rest[0]:.1f} s and {rest[1]:.1f} s — the fixed cost. A "
            "likely cause, not measured here: on 2 cores the actor's 2 threads share them with the ingest and write "
            "tasks running beside it, which the loop runs one after the other. For large datasets the warm ratio "
            f"therefore tends to about 1/(1 + slowdown) ≈ {ceiling:.2f}, not 1. An earlier version of this table "
            "(min-of-two runs, 64 images × 50 steps) printed 0.86 and called the gap fixed while it grew from 8.5 s "
            "to 15.8 s; it did not separate compute from fixed cost.")


if __name__ == "__main__":
    main()
