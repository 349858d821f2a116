"""Faults: a run killed with SIGKILL resumes to exactly one row per input; a worker node removed mid-run loses and
duplicates nothing; a crashing actor is retried a bounded number of times, then the job fails instead of hanging."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.default_generator import load_default_generator
from ops.images import to_uint8
from ops.invert_stage import InvertStageConfig

FAST = ["--align", "none", "--lpips-net", "alex", "--lpips-backbone", "random", "--batch-size", "2"]


def write_samples(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    G = load_default_generator()
    with torch.no_grad():
        images = G.synthesis(G.mapping(torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))))
    names = [f"{i:02d}.png" for i in range(n)]
    for name, a in zip(names, to_uint8(images)):
        Image.fromarray(a).save(folder / name)
    return names


def stored_keys(out: Path) -> list[str]:
    keys = []
    for part in sorted(out.glob("part-*.parquet")):
        keys += pq.read_table(part, columns=["key"]).column("key").to_pylist()
    return keys


def wait_for(predicate, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_sigkill_mid_run_resumes_to_exactly_one_row_per_input(tmp_path):
    names = write_samples(tmp_path / "in", 10)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.cli", "invert", "--input", str(tmp_path / "in"), "--output", str(out),
           "--steps", "40", *FAST]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    repo = Path(__file__).resolve().parents[1]
    # A session of its own, so the kill takes the driver and the Ray processes it started, like a lost machine.
    proc = subprocess.Popen(cmd, cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 1, timeout=240), "no part written"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = stored_keys(out)
    assert 0 < len(partial) < len(names)
    # What a writer killed mid-write leaves behind: a temp file, and on object stores a truncated part.
    (out / ".tmp-part-killed.parquet").write_bytes(b"PAR1 half")
    first = sorted(out.glob("part-*.parquet"))[0]
    (out / "part-truncated.parquet").write_bytes(first.read_bytes()[:100])
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = stored_keys(out)
    assert sorted(keys) == names  # each input exactly once
    assert not list(out.glob(".tmp-*")) and not (out / "part-truncated.parquet").exists()


@pytest.fixture()
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    worker = cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_removing_a_worker_node_mid_run_keeps_every_row_exactly_once(two_nodes, tmp_path):
    import ray

    from pipelines.invert import run_invert

    cluster, worker = two_nodes
    names = write_samples(tmp_path / "in", 12, seed=1)
    out = tmp_path / "out"
    cfg = InvertStageConfig(steps=20, lpips_net="alex", lpips_backbone="random")
    result = {}
    runner = threading.Thread(target=lambda: result.update(stats=run_invert(
        [str(tmp_path / "in")], str(out), cfg, batch_size=2, actors=2, progress=False)))
    runner.start()
    assert wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 1, timeout=240)
    nodes_before = len([n for n in ray.nodes() if n["Alive"]])
    cluster.remove_node(worker)
    runner.join(timeout=600)
    assert not runner.is_alive()
    assert nodes_before == 2 and len([n for n in ray.nodes() if n["Alive"]]) == 1
    assert sorted(stored_keys(out)) == names
    statuses = [s for p in out.glob("part-*.parquet") for s in pq.read_table(p).column("status").to_pylist()]
    assert statuses == ["ok"] * len(names) and "stats" in result


class CrashingActor:
    def __call__(self, batch):
        os._exit(1)  # what a segfault or OOM kill looks like to Ray


def test_a_crashing_actor_is_retried_a_bounded_number_of_times(two_nodes):
    """Our retry settings with an actor that always dies: the job fails in bounded time instead of retrying forever."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipelines.invert import ACTOR_RETRIES, RETRIES

    assert 0 < RETRIES < 10
    ds = ray.data.range(4).map_batches(CrashingActor, batch_size=2, compute=ActorPoolStrategy(size=1), num_cpus=0.5,
                                       **ACTOR_RETRIES)
    with pytest.raises(Exception):
        ds.take_all()
