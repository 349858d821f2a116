"""Faults, each proven to have hit work in progress: a run killed with SIGKILL after writing resumes to the rows an
uninterrupted run gives; a worker node removed while the model actors ran there (and only there) loses and
duplicates nothing; a crashing actor fails the job in bounded time with the stage named; a GPU node that joins
after the job started gets the model actors."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ENV, REPO, no_align, read_parts, stored_keys, tensor, wait_for, write_samples
from ops.invert import InvertConfig
from ops.invert_stage import InvertStage, InvertStageConfig
from pipelines.driver import RunOptions, StageFailed, run

FAST = ["--align", "none", "--lpips-net", "alex", "--lpips-backbone", "random", "--batch-size", "2"]
def by_key(out: Path, column: str) -> dict:
    table = read_parts(out)
    return dict(zip(table.column("key").to_pylist(), tensor(table, column)))


def test_sigkill_mid_run_resumes_to_what_an_uninterrupted_run_gives(tmp_path):
    names = write_samples(tmp_path / "in", 10)
    out, whole = tmp_path / "out", tmp_path / "whole"
    cmd = [sys.executable, "-m", "pipelines.cli", "invert", "--input", str(tmp_path / "in"), "--steps", "20", *FAST]
    # A session of its own, so the kill takes the driver and the Ray processes it started, like a lost machine.
    proc = subprocess.Popen([*cmd, "--output", str(out)], cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 1, timeout=240), "no part written"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = stored_keys(out)
    assert 0 < len(partial) < len(names)  # the kill hit a run that had written some rows, not all
    # What a writer killed mid-write leaves behind: a temp file, and on object stores a truncated part.
    (out / ".tmp-part-killed.parquet").write_bytes(b"PAR1 half")
    first = sorted(out.glob("part-*.parquet"))[0]
    (out / "part-truncated.parquet").write_bytes(first.read_bytes()[:100])
    done = subprocess.run([*cmd, "--output", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(stored_keys(out)) == names  # each input exactly once
    assert not list(out.glob(".tmp-*")) and len(list((out / "quarantine").glob("*-part-truncated.parquet"))) == 1
    assert set(read_parts(out).column("status").to_pylist()) == {"ok"}
    subprocess.run([*cmd, "--output", str(whole)], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
    resumed, uninterrupted = by_key(out, "wplus"), by_key(whole, "wplus")
    for name in names:  # batch-invariant on CPU: bit for bit, whichever run and batch computed a row
        assert np.array_equal(resumed[name], uninterrupted[name]), name


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


NO_ALIGN = no_align()
CFG = InvertStageConfig(invert=InvertConfig(steps=20, lpips_net="alex", lpips_backbone="random", optimize_noise=False))


def test_removing_the_node_running_the_actors_keeps_every_row_exactly_once(cluster, tmp_path):
    """The invert actors need a custom resource only the first worker has, so the parts written before it was
    removed were computed there; its replacement (rows counted by node) did the rest; every row once, all ok."""
    import ray

    first = cluster.add_node(num_cpus=2, resources={"pin": 2})
    cluster.wait_for_nodes()
    names = write_samples(tmp_path / "in", 12, seed=1)
    out = tmp_path / "out"
    result = {}
    options = RunOptions(batch_size=2, actors=2, resources={"pin": 1}, progress=False)
    runner = threading.Thread(target=lambda: result.update(stats=run(
        "invert", [str(tmp_path / "in")], out, CFG, NO_ALIGN, options)))
    runner.start()
    assert wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 1, timeout=240)
    written_before = len(stored_keys(out))
    cluster.remove_node(first)  # from the main thread (Ray needs it), while the job runs in the other one
    second = cluster.add_node(num_cpus=2, resources={"pin": 2})
    runner.join(timeout=600)
    assert not runner.is_alive() and "stats" in result
    assert 0 < written_before < len(names)
    assert sorted(stored_keys(out)) == names
    assert set(read_parts(out).column("status").to_pylist()) == {"ok"}
    by_node = result["stats"]["rows_by_node"]
    assert by_node.get(second.node_id, 0) > 0
    assert set(by_node) <= {first.node_id, second.node_id}  # never on the head: it has no "pin"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


class Crasher(InvertStage):
    name = "crasher"

    def compute(self, batch):
        os._exit(1)  # what a segfault or an OOM kill looks like to Ray


def test_a_crashing_actor_fails_the_job_in_bounded_time_naming_the_stage(cluster, tmp_path):
    from pipelines import runtime

    cluster.add_node(num_cpus=2)
    write_samples(tmp_path / "in", 2)
    assert 0 < runtime.RETRIES < 10
    stage = Crasher(CFG)
    t0 = time.time()
    with pytest.raises(StageFailed, match="stage crasher failed"):
        run(stage, [str(tmp_path / "in")], str(tmp_path / "out"), photos_config=NO_ALIGN,
            options=RunOptions(progress=False))
    assert time.time() - t0 < 300
    assert not list((tmp_path / "out").glob("part-*.parquet"))


def test_a_gpu_node_joining_after_the_start_gets_the_model_actors(cluster, tmp_path):
    """--device cuda on a cluster without GPUs: the actors wait for a GPU (what makes an autoscaler add one); a node
    declaring num_gpus=1 joins later and runs them (torch stays on CPU there: no CUDA on this machine)."""
    names = write_samples(tmp_path / "in", 4, seed=2)
    out, result = tmp_path / "out", {}
    runner = threading.Thread(target=lambda: result.update(stats=run(
        "invert", [str(tmp_path / "in")], out, CFG, NO_ALIGN, RunOptions(device="cuda", progress=False))))
    runner.start()
    time.sleep(8)
    assert runner.is_alive() and not list(out.glob("part-*.parquet"))  # nothing can run without a GPU yet
    gpu = cluster.add_node(num_cpus=2, num_gpus=1)
    runner.join(timeout=600)
    assert not runner.is_alive() and sorted(stored_keys(out)) == names
    assert result["stats"]["rows_by_node"] == {gpu.node_id: len(names)}
