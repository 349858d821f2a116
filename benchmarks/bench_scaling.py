"""How the pipeline scales, measured before renting GPUs: rows/s of `invert` with 1, 2 and 4 actors on a simulated
multi-node `ray.cluster_utils.Cluster` (a head for the tasks, four 1-CPU worker nodes for the actors), and with
batch size 1/4/8/16 on one node. Writes BENCHMARKS.md's section and benchmarks/scaling.png.

Every node of the simulated cluster shares this machine's cores, so the actor curve shows the runtime's overhead
per actor (a flat curve = no overhead lost; a real cluster's nodes each bring their own cores and GPUs)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGES, STEPS = 32, 20
PLOT = ROOT / "benchmarks" / "scaling.png"


def rows_per_second(inputs: list[str], out: str, actors: int, batch_size: int) -> float:
    from ops.align import AlignConfig
    from ops.ingest import IngestConfig
    from ops.invert import InvertConfig
    from ops.invert_stage import InvertStageConfig
    from pipelines import driver

    cfg = InvertStageConfig(invert=InvertConfig(steps=STEPS, lpips_net="alex", lpips_backbone="random",
                                                optimize_noise=False))
    t0 = time.perf_counter()
    stats = driver.run("invert", inputs, out, cfg, IngestConfig(alignment=AlignConfig("none")),
                       driver.RunOptions(batch_size=batch_size, actors=actors, progress=False))
    assert stats["by_status"] == {"ok": IMAGES}, stats
    return IMAGES / (time.perf_counter() - t0)


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.report import machine_line, write_section
    from pipelines.demo import write_synthetic
    from pipelines.runtime import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp) / "in", n=IMAGES // 2)
        inputs = [str(Path(tmp) / "in")]
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        for _ in range(4):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        init_ray()
        rows_per_second(inputs, f"{tmp}/warmup", 1, 4)  # the first dataset of a session warms Ray Data up
        by_actors = {a: rows_per_second(inputs, f"{tmp}/actors{a}", a, 4) for a in (1, 2, 4)}
        print("actors", by_actors, flush=True)
        ray.shutdown()
        cluster.shutdown()
        init_ray()
        rows_per_second(inputs, f"{tmp}/warmup2", 1, 4)
        by_batch = {b: rows_per_second(inputs, f"{tmp}/batch{b}", 1, b) for b in (1, 4, 8, 16)}
        print("batch", by_batch, flush=True)
        ray.shutdown()
    plot(by_actors, by_batch)
    body = "\n".join([
        "## Scaling curve (`benchmarks/bench_scaling.py`)",
        "",
        f"Machine: {machine_line()}. `invert`, W+, {IMAGES} images (64×64), {STEPS} steps, LPIPS-alex (random "
        "backbone), warm Ray (the session's first dataset excluded); whole runs timed (start-up included).",
        "",
        "| actors (simulated cluster: head 2 CPUs + 4 nodes of 1 CPU, batch 4) | rows/s |",
        "|---:|---:|",
        *[f"| {a} | {r:.2f} |" for a, r in by_actors.items()],
        "",
        "| batch size (one node, 1 actor) | rows/s |",
        "|---:|---:|",
        *[f"| {b} | {r:.2f} |" for b, r in by_batch.items()],
        "",
        "![rows/s by actors and by batch size](benchmarks/scaling.png)",
        "",
        "All the simulated nodes share this machine's 2 cores, so more actors cannot add compute here: the actor "
        "curve shows what the runtime costs per actor (start-up, one intra-op thread each instead of two), not "
        "the scaling of real nodes, which each bring their own cores or GPU. The batch curve is the per-batch "
        "overhead against the batched maths (the CPU's invariant path computes images one by one, so it flattens "
        "early; on a GPU the batched path keeps gaining, see `benchmarks/device_check.py`).",
    ])
    write_section("scaling", body)
    print(body)


def plot(by_actors: dict, by_batch: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(list(by_actors), list(by_actors.values()), "o-")
    a.set(xlabel="actors (simulated nodes)", ylabel="rows/s", xticks=list(by_actors), ylim=(0, None),
          title="actors")
    b.plot(list(by_batch), list(by_batch.values()), "o-")
    b.set(xlabel="batch size", ylabel="rows/s", xticks=list(by_batch), ylim=(0, None), title="batch size, 1 actor")
    fig.suptitle(f"latentray invert, {IMAGES} images x {STEPS} W+ steps, 2-core machine", fontsize=9)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)


if __name__ == "__main__":
    main()
