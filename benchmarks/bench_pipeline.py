"""End-to-end rows/s of the Ray invert pipeline against the same stages called in a plain loop in one process
(read + decode + centre crop, invert, atomic part write), same images and cores, side by side in one run:
the plain loop, the pipeline on a cold Ray (`ray.init` included, as a CLI user pays it) and on a warm one;
loop and warm alternate twice and the faster run of each is kept.

Two workloads, each in its own process so that "cold" is really cold: the issue's (16 images, W+, 20 steps,
batch 4) and a dataset-sized one (64 images, 50 steps). The last two lines give the dataset-sized ratios."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORKLOADS = {"issue": dict(images=16, steps=20), "dataset": dict(images=64, steps=50)}
BATCH = 4


def measure(images: int, steps: int) -> dict:
    """Loop, cold and warm pipeline seconds for one workload (run in a fresh process)."""
    import torch

    from benchmarks.report import ok_rows
    from ops.align import AlignConfig
    from ops.ingest import IngestConfig, IngestStage, list_inputs
    from ops.invert import InvertConfig
    from ops.invert_stage import InvertStage, InvertStageConfig
    from ops.stage import objects
    from pipelines import driver, runtime
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

        def loop(run: int) -> float:
            t0 = time.perf_counter()
            stage = InvertStage(cfg).ready()
            ingest = IngestStage.feeding(stage.plan.image_size, photos).ready()
            drop = frozenset(stage.plan.not_stored() | ingest.plan.not_stored())
            with OutputLock(str(Path(tmp) / f"loop{run}")) as lock:
                for i in range(0, len(items), BATCH):
                    chunk = items[i:i + BATCH]
                    batch = ok_rows([k for k, _ in chunk], uri=objects([u for _, u in chunk]))
                    driver.write_batch(stage.process(ingest.process(batch)), str(Path(tmp) / f"loop{run}"),
                                       {"fingerprint": "loop"}, stage.plan.previews, lock.ticket, "key", drop)
            return time.perf_counter() - t0

        def pipeline(name: str) -> float:
            t0 = time.perf_counter()
            stats = driver.run("invert", inputs, str(Path(tmp) / name), cfg, photos, options)
            assert stats["by_status"] == {"ok": images}, stats
            return time.perf_counter() - t0

        # The machine's speed drifts (shared cores): loop and warm pipeline alternate, and the faster of two
        # runs of each is kept; cold happens once per process by definition.
        loops, warms = [loop(0)], []
        out["cold"] = pipeline("cold")
        warms.append(pipeline("warm0"))
        loops.append(loop(1))
        warms.append(pipeline("warm1"))
        out["loop"], out["warm"] = min(loops), min(warms)
        out["loop_runs"], out["warm_runs"] = loops, warms
        t0 = time.perf_counter()
        runtime.init_ray()
        out["init_ray_warm"] = time.perf_counter() - t0
    return out


def main() -> None:
    results = {}
    for name, workload in WORKLOADS.items():
        code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_pipeline import measure; " \
               f"print('RESULT', json.dumps(measure(**{workload!r})))"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.split("RESULT", 1)[1])
        print(name, results[name], flush=True)
    report(results)


def report(results: dict) -> None:
    """The BENCHMARKS.md section and the two ratio lines, from `measure`'s results per workload."""
    from benchmarks.report import machine_line, write_section

    rows = ["| workload | plain loop s | Ray cold s | Ray warm s | pipeline/loop cold | pipeline/loop warm |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        w = WORKLOADS[name]
        rows.append(f"| {w['images']} images, {w['steps']} steps | {r['loop']:.1f} | {r['cold']:.1f} | "
                    f"{r['warm']:.1f} | {r['loop'] / r['cold']:.2f} | {r['loop'] / r['warm']:.2f} |")
    small = results["issue"]
    body = "\n".join([
        "## Pipeline throughput (`benchmarks/bench_pipeline.py`)",
        "",
        f"Machine: {machine_line()}. Generator samples and shifted copies (64×64), `--align none`, W+, batch {BATCH}, "
        "LPIPS-alex (random backbone), constant noise; one invert actor. The plain loop calls the same stages "
        "(ingest, invert, part writer) in one process; its timing includes the stage setup (models, LPIPS, "
        "statistics), not the imports the benchmark process already paid. Loop and warm pipeline alternate twice; "
        "the faster run of each is reported (this machine's shared cores drift by up to 1.7× between runs). The "
        "second loop finds the models cached in its process (setup ~0.1 s instead of ~3 s), so the ratios are "
        "conservative.",
        "",
        *rows,
        "",
        f"Fixed costs the pipeline pays and the loop does not (16-image run): `ray.init` "
        f"{small['cold'] - small['warm']:.1f} s (cold − warm), and the actor's start-up: a new process importing "
        f"torch, torchvision (via lpips) and the stage, then the same setup the loop pays; "
        f"together {small['warm'] - small['loop']:.1f} s over the loop when warm. "
        "They do not grow with the dataset, so the ratios rise with its size.",
        "",
        "Causes of the gap, found by timestamping the actor's constructor, every batch and every write task "
        "(16-image workload; before the fixes: loop 9.7 s, warm 16.3 s, cold 27.0 s):",
        "",
        "1. **Ray Data runs an actor's UDF on a second thread** (its single-thread wrapper), while the models were "
        "set up on the main one; there, oneDNN's 2-thread convolutions ran 2.5× slower than on the main thread "
        "(3.3 s vs 1.36 s per batch of 4; 1 thread: 1.9 s). The old 0.5-CPU actor (1 thread) was at 1.9 s. Fixed: "
        "the UDF runs on the actor's main thread, one call at a time (`enable_true_multi_threading` with "
        "`max_concurrent_calls_per_actor=1`), with the threads of the CPUs it declares (`cpu_actor_threads`): "
        "~2 s of the 6.6 s warm gap. Raising the thread count alone (1 → 2, off the main thread) made it worse.",
        "2. **Actor start-up**, fixed per run: ~3.6 s before the constructor runs (a new worker process; unpickling "
        "the stage imports torch) and ~2.6 s in it (lpips imports torchvision and torch._dynamo, 1.3 s; models and "
        "statistics 0.5 s), against the loop's setup (2.3 s): ~4 s. Tried and dropped: a worker setup hook "
        "pre-importing torch (actors get fresh processes, and every idle worker importing torch at once delayed "
        "the cold run's first ready actor from 5.7 s to 15 s).",
        "3. **`ray.init`** and the session's first dataset: ~5 s + ~2 s, cold runs only.",
        "4. Object store, Arrow ↔ numpy and the atomic part writes: ~10 ms per ingest task, 20–50 ms per part "
        "write — under 2 % of a run. The CPU tasks (decode, align, write) no longer import torch at all.",
    ])
    write_section("pipeline", body)
    print(body)
    big = results["dataset"]
    print(f"pipeline/loop warm: {big['loop'] / big['warm']:.2f}")
    print(f"pipeline/loop cold: {big['loop'] / big['cold']:.2f}")


if __name__ == "__main__":
    main()
