"""One writer per output: a second run is refused naming the holder (or waits), a stale lease is taken over by
exactly one of the runs that want it, a run that lost its lease stops and writes nothing more, leases on S3 are
created conditionally."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import io, lock
from pipelines.cli import main
from pipelines.lock import LeaseLost, OutputLock, OutputLocked, fence
from conftest import ENV, REPO, stored_keys, wait_for, write_samples

FAST = ["--align", "none", "--lpips-net", "alex", "--lpips-backbone", "random"]


def plant_lease(out: Path, gen: int, pid: int, content: bytes | None = None, host: str | None = None) -> Path:
    folder = out / lock.LEASES
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{gen:012d}.json"
    path.write_bytes(content if content is not None else json.dumps(
        {"pid": pid, "host": host or lock.host_name(), "started": time.time(), "refreshed": time.time(),
         "token": "other"}).encode())
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_naming_the_holder_and_a_run_that_lost_its_lease_writes_nothing_more(
        tmp_path, capsys):
    names = write_samples(tmp_path / "in", 6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.cli", "invert", "--input", str(tmp_path / "in"), "--output", str(out),
           *FAST, "--steps", "20", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 1, timeout=240)
        assert main(["invert", "--input", str(tmp_path / "in"), "--output", str(out), *FAST, "--steps", "20"]) == 3
        err = capsys.readouterr().err
        assert f"in use by another run: pid {proc.pid} on" in err and "--wait" in err
        assert proc.poll() is None  # the first run was still writing when the second was refused
        # another run takes the output (as one on another machine would, having judged this lease stale)
        holder = max(lock.leases(str(out)))
        taken = time.time()
        plant_lease(out, holder + 1, 999999, host="elsewhere")
        written = {p.name: p.stat().st_mtime for p in out.iterdir() if p.is_file()}
        assert proc.wait(timeout=600) == 3
        assert "another run took the output" in proc.stderr.read()
    finally:
        proc.kill()
    assert not (out / "stats.json").exists() and (out / "run.json").stat().st_mtime < taken
    later = [p.name for p in out.glob("part-*.parquet") if p.stat().st_mtime > taken + 0.5]
    assert later == [] and len(stored_keys(out)) < len(names)  # it stopped with work left
    assert {p.name for p in out.glob("part-*.parquet")} >= {n for n in written if n.startswith("part-")}


def test_a_stale_lease_is_taken_over_and_wait_waits(tmp_path):
    out = tmp_path / "out"
    plant_lease(out, 7, dead_pid())
    with OutputLock(str(out)) as holder:  # the holder's process is gone: taken over by the next generation
        assert holder.gen == 8 and sorted(lock.leases(str(out))) == [8]
        with pytest.raises(OutputLocked, match="in use"):
            OutputLock(str(out)).acquire()
        waiter = OutputLock(str(out), wait=True, poll=0.05)
        thread = threading.Thread(target=waiter.acquire)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting while held
    thread.join(5)
    assert not thread.is_alive() and waiter.gen == 9
    waiter.release()
    # another host that has not refreshed for longer than the TTL is stale; a damaged lease of a dead process too
    assert lock.is_stale({"host": "elsewhere", "pid": 1, "refreshed": time.time() - 61}, ttl=60)
    assert not lock.is_stale({"host": "elsewhere", "pid": 1, "refreshed": time.time() - 30}, ttl=60)
    damaged = tmp_path / "damaged"  # a lease whose content is damaged: stale once unchanged for the TTL
    path = plant_lease(damaged, 3, dead_pid(), content=b"\x00garbage{")
    with pytest.raises(OutputLocked, match="unreadable"):
        OutputLock(str(damaged)).acquire()
    os.utime(path, (time.time() - lock.TTL - 1,) * 2)
    with OutputLock(str(damaged)) as holder:
        assert holder.gen == 4


TAKER = """
import json, sys, time
from pipelines.lock import OutputLock, OutputLocked
out, start, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if time.time() > start:
    sys.exit(9)  # too late to start together with the others: the test would prove nothing
time.sleep(start - time.time())
lease = OutputLock(out)
try:
    lease.acquire()
except OutputLocked:
    sys.exit(3)
got = time.time()
time.sleep(1.5)
lease.release()
with open(log, "a") as f:
    f.write(json.dumps([lease.gen, got, time.time()]) + "\\n")
"""


def test_runs_starting_together_on_a_stale_lease_hold_the_output_one_at_a_time(tmp_path):
    out, log = tmp_path / "out", tmp_path / "holders.jsonl"
    plant_lease(out, 1, dead_pid())
    start = time.time() + 8.0  # every process imports first, then they all try at once
    procs = [subprocess.Popen([sys.executable, "-c", TAKER, str(out), str(start), str(log)], cwd=REPO)
             for _ in range(6)]
    codes = [p.wait(timeout=120) for p in procs]
    held = sorted(json.loads(line) for line in log.read_text().splitlines())
    assert set(codes) <= {0, 3} and codes.count(0) == len(held) >= 1 and held[0][0] == 2
    assert len({gen for gen, _, _ in held}) == len(held)
    for (_, _, end), (_, begin, _) in zip(held, held[1:]):
        assert end <= begin  # never two holders at once (a late starter may take it after a release)


def test_a_holder_that_cannot_refresh_its_lease_stops(tmp_path, monkeypatch):
    out = tmp_path / "out"
    holder = OutputLock(str(out), ttl=0.8)
    with holder:
        fence(holder.ticket)
        monkeypatch.setattr(io, "write_bytes", lambda *a, **kw: (_ for _ in ()).throw(TimeoutError("S3 hiccup")))
        assert wait_for(lambda: holder.lost is not None, timeout=5)
        with pytest.raises(LeaseLost, match="could not refresh"):
            holder.check()
        with pytest.raises(LeaseLost, match="not refreshed"):
            fence(holder.ticket)  # what a part-writing task checks before it writes
        monkeypatch.undo()


def test_leases_on_s3_are_created_conditionally(s3_server):
    s3_server.create_bucket(Bucket="out")
    fs, path = io.url_to_fs("s3://out/x/_lease/000000000001-1-h.json")
    assert io.create_exclusive(fs, path, b"first") and not io.create_exclusive(fs, path, b"second")
    assert fs.cat_file(path) == b"first"
    with OutputLock("s3://out/y") as first:
        with pytest.raises(OutputLocked):
            OutputLock("s3://out/y").acquire()
    with OutputLock("s3://out/y") as second:
        assert (first.gen, second.gen) == (1, 2)


def test_a_listing_that_missed_a_newer_lease_never_takes_an_older_generation(tmp_path, monkeypatch):
    """A directory read while another run creates its generation and removes the one before can miss both (CI saw
    a generation 1 taken beside a live 2): the lease just created is checked against a fresh listing and given up."""
    out = tmp_path / "out"
    plant_lease(out, 2, os.getpid())  # a live holder
    real, calls = lock.leases, []

    def stale_first(out_dir):
        calls.append(out_dir)
        return {} if len(calls) == 1 else real(out_dir)

    monkeypatch.setattr(lock, "leases", stale_first)
    with pytest.raises(OutputLocked):
        OutputLock(str(out)).acquire()
    assert sorted(p.name for p in (out / lock.LEASES).iterdir()) == [f"{2:012d}.json"]
