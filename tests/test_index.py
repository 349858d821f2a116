"""The output index without Ray: any damage is found and quarantined with its bytes, storage errors are never taken
for damage, one copy of each key for every reader (an ok row wins, the newest input wins), replace-then-remove and
compaction survive a crash between any two steps, a resume reads the index instead of the parts."""

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from ops.stage import objects
from models import checkpoints
from pipelines import driver, index, io
from pipelines.lock import OutputLock

FP = "fingerprint0"


def write(out: Path, lock: OutputLock, keys, status="ok", made_from="a", units=None, value=0.0) -> str:
    """One part through the runtime's own writer (as a Ray write task calls it); returns its name."""
    n = len(keys)
    batch = {"key": objects(keys), "status": objects([status] * n),
             "error_code": objects(["" if status == "ok" else "io_error"] * n), "error": objects([""] * n),
             "input_id": objects([f"{made_from}-{k}" for k in keys]), "value": np.full(n, value, np.float32)}
    if units is not None:
        batch["source_key"] = objects(units)
    rows = driver.write_batch(batch, str(out), {"fingerprint": FP, "stage": "test"}, (), lock.ticket,
                               "source_key" if units is not None else "key")
    return rows["part"][0]


def index_everything(out: Path, lock: OutputLock) -> None:
    index.consolidate(str(out), index.load(str(out), fingerprint=FP), lock.gen)


def seen(out: Path) -> dict:
    """key -> (status, value) as every reader sees the output."""
    table = index.read_dataset(str(out), ["key", "status", "value"])
    return {k: (s, v) for k, s, v in zip(*(table.column(c).to_pylist() for c in ("key", "status", "value")))}


def flip(path: Path, at: int, width: int = 1, value: int | None = None) -> bytes:
    data = bytearray(path.read_bytes())
    for i in range(at, at + width):
        data[i] = value if value is not None else data[i] ^ 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def page_offset(path: Path) -> int:
    """Somewhere inside the first data page of the `value` column (not the header, not the footer)."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    column = meta.row_group(0).column(names.index("value"))
    return column.data_page_offset + column.total_compressed_size // 2


# ----- damage --------------------------------------------------------------------------------------------------------
def truncate(path: Path) -> bytes:
    data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    return data


DAMAGE = {
    "truncated": truncate,
    "a flipped byte in a data page": lambda p: flip(p, page_offset(p)),
    "zeroed footer (thrift)": lambda p: flip(p, len(p.read_bytes()) - 200, 100, value=0),
    "a flipped magic byte": lambda p: flip(p, 1),
}


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("indexed", [False, True])
def test_any_damage_to_a_part_is_quarantined_with_its_bytes(tmp_path, kind, indexed):
    out = tmp_path / "out"
    with OutputLock(str(out)) as lock:
        good = write(out, lock, ["a", "b"])
        bad = write(out, lock, ["c", "d"])
        if indexed:
            index_everything(out, lock)
        damaged = DAMAGE[kind](out / bad)
        state = index.load(str(out), repair=True, fingerprint=FP)
    assert [Path(p).name for p, _ in state.damaged] == [bad]
    kept = [p for p in (out / "quarantine").iterdir()]
    assert len(kept) == 1 and kept[0].name.endswith(bad) and kept[0].read_bytes() == damaged
    assert not (out / bad).exists() and (out / good).exists()
    assert sorted(state.winners.column("key").to_pylist()) == ["a", "b"]  # c, d are to be redone


def test_damage_that_keeps_size_and_mtime_is_found_by_verify(tmp_path, capsys):
    out = tmp_path / "out"
    with OutputLock(str(out)) as lock:
        name = write(out, lock, ["a", "b", "c"])
        index_everything(out, lock)
        io.write_json(str(out), "run.json", {"fingerprint": FP})
    stat = os.stat(out / name)
    damaged = flip(out / name, page_offset(out / name))
    os.utime(out / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot: the listing sees no change
    assert sorted(index.load(str(out)).winners.column("key").to_pylist()) == ["a", "b", "c"]  # trusted (cheap)
    from pipelines.cli import main

    assert main(["verify", str(out), "--no-repair"]) == 1 and (out / name).exists()  # report only
    assert main(["verify", str(out)]) == 1
    assert [p.read_bytes() for p in (out / "quarantine").iterdir()] == [damaged]
    assert index.load(str(out)).winners.num_rows == 0  # its rows are now to be redone
    assert main(["verify", str(out)]) == 0 and "clean" in capsys.readouterr().out


def test_damaged_index_and_json_are_quarantined_and_the_parts_read_instead(tmp_path):
    out = tmp_path / "out"
    with OutputLock(str(out)) as lock:
        write(out, lock, ["a", "b"])
        index_everything(out, lock)
        io.write_json(str(out), "run.json", {"fingerprint": FP})
    segment = next((out / index.INDEX).iterdir())
    flip(segment, len(segment.read_bytes()) // 2)
    raw = (out / "run.json").read_text().replace(FP, FP[:-1] + "1")  # still valid JSON: only the checksum knows
    (out / "run.json").write_text(raw)
    state = index.load(str(out), repair=True)
    assert sorted(state.winners.column("key").to_pylist()) == ["a", "b"] and state.uncovered
    assert driver.read_own_json(str(out), "run.json", repair=True) is None
    assert sorted(p.name.split("-", 2)[2] for p in (out / "quarantine").iterdir()) == ["run.json", segment.name]


def test_quarantined_files_never_overwrite_each_other(tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    for content in (b"first damaged copy", b"second damaged copy"):
        (out / "part-x.parquet").write_bytes(content)
        index.load(str(out), repair=True)
    assert sorted(p.read_bytes() for p in (out / "quarantine").iterdir()) == [b"first damaged copy",
                                                                            b"second damaged copy"]


def test_storage_errors_are_retried_and_never_taken_for_damage(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with OutputLock(str(out)) as lock:
        write(out, lock, ["a"])
        write(out, lock, ["b"])
    monkeypatch.setattr(checkpoints, "BACKOFF", 0.0)
    real, calls = LocalFileSystem.cat_file, {"n": 0}

    def flaky(self, path, *a, **kw):  # a throttled store: two timeouts, then an answer
        calls["n"] += 1
        if calls["n"] <= 2:
            raise TimeoutError("read timed out")
        return real(self, path, *a, **kw)

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky)
    state = index.load(str(out), repair=True)
    assert calls["n"] > 2 and len(state.parts) == 2 and not state.damaged

    def short(self, path, *a, **kw):  # a connection dropped mid-body: a short read is never damage
        return real(self, path, *a, **kw)[:10]

    monkeypatch.setattr(LocalFileSystem, "cat_file", short)
    with pytest.raises(io.StorageError, match="short read.*nothing was changed"):
        index.load(str(out), repair=True)

    def forbidden(self, path, *a, **kw):  # a store that keeps refusing (403)
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(LocalFileSystem, "cat_file", forbidden)
    with pytest.raises(io.StorageError, match="403 Forbidden.*nothing was changed"):
        index.load(str(out), repair=True)
    assert len(list(out.glob("part-*"))) == 2 and not (out / "quarantine").exists()


# ----- one copy per key ------------------------------------------------------------------------------------------
def test_the_winning_copy_does_not_depend_on_the_order_found():
    import itertools

    copies = [(1, "p1", "ok", "x"), (2, "p2", "failed", "x"), (2, "p3", "ok", "x")]  # (gen, part, status, input)
    for order in itertools.permutations(copies):
        assert order[index.winner(list(order))] == (2, "p3", "ok", "x")  # ok, then the newest
    changed = [(1, "p1", "ok", "old photo"), (2, "p2", "failed", "new photo")]
    assert changed[index.winner(changed)] == (2, "p2", "failed", "new photo")  # a changed input's row wins
    retried = [(3, "p1", "ok", "x"), (3, "p2", "failed", "x")]
    assert retried[index.winner(retried)][2] == "ok"  # within one run too


def test_every_reader_sees_one_copy_of_a_key_found_twice(tmp_path, capsys):
    out = tmp_path / "out"
    with OutputLock(str(out)) as lock:
        write(out, lock, ["a", "b"], value=1.0)
    with OutputLock(str(out)) as lock:  # a newer run: b again (ok, same input), c; a failed retry of a
        write(out, lock, ["b", "c"], value=2.0)
        write(out, lock, ["a"], status="failed", value=3.0)
    assert seen(out) == {"a": ("ok", 1.0), "b": ("ok", 2.0), "c": ("ok", 2.0)}
    io.write_json(str(out), "run.json", {"fingerprint": FP})
    from pipelines.cli import main

    assert main(["describe", "--input", str(out)]) == 0
    assert '"rows": 3' in capsys.readouterr().out


# ----- crash safety of replace-then-remove and compaction ----------------------------------------------------------
class Crash(BaseException):  # a kill: nothing catches it
    pass


def crash_at(monkeypatch, n: int):
    """The n-th storage write or removal of the process raises (a kill at that moment)."""
    count = {"n": 0}
    real_write, real_rm = io.write_bytes, LocalFileSystem.rm

    def step():
        count["n"] += 1
        if count["n"] == n:
            raise Crash(f"killed at step {n}")

    def write_bytes(*a, **kw):
        step()
        return real_write(*a, **kw)

    def rm(self, *a, **kw):
        step()
        return real_rm(self, *a, **kw)

    monkeypatch.setattr(io, "write_bytes", write_bytes)
    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    return count


def build(out: Path) -> dict:
    """An output with losing copies (a failed and a superseded row) and small parts; what readers see."""
    with OutputLock(str(out)) as lock:
        for i in range(6):
            write(out, lock, [f"k{i}", f"k{i + 1}"], value=float(i))
        write(out, lock, ["k0"], status="failed", value=9.0)
    return seen(out)


@pytest.mark.parametrize("step", range(1, 12))  # tidying this output takes 11 storage steps
def test_tidying_can_be_killed_at_any_step_and_loses_nothing(tmp_path, monkeypatch, step):
    out = tmp_path / "out"
    before = build(out)
    lock = OutputLock(str(out))
    lock.acquire()
    count = crash_at(monkeypatch, step)
    try:
        index.tidy(str(out), index.load(str(out), repair=True, fingerprint=FP), lock.gen, lock.check,
                   target=1 << 20)
        finished = True
    except Crash:
        finished = False
    monkeypatch.undo()
    lock.release()  # as the lease of a killed run goes stale
    assert not finished and count["n"] == step
    assert seen(out) == before  # killed between any two steps: every reader sees the same rows
    with OutputLock(str(out)) as lock:  # the next run repairs and finishes the job
        index.tidy(str(out), index.load(str(out), repair=True, fingerprint=FP), lock.gen, lock.check)
    assert seen(out) == before
    assert len(list(out.glob("part-*.parquet"))) == 1 and len(list((out / index.INDEX).iterdir())) == 1
    assert index.verify(str(out), repair=False)["clean"]
    assert not (out / "quarantine").exists()


def test_replace_then_remove_is_repaired_after_a_kill_between_the_two_steps(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = build(out)
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    monkeypatch.setattr(index, "write_segment", lambda *a, **kw: (_ for _ in ()).throw(Crash("killed")))
    with OutputLock(str(out)) as lock, pytest.raises(Crash):
        state = index.load(str(out), repair=True, fingerprint=FP)
        index.rewrite(str(out), state, parts, lock.gen, lock.check)
    monkeypatch.undo()
    merged = sorted(set(p.name for p in out.glob("part-*.parquet")) - set(parts))
    assert len(merged) == 1 and all((out / p).exists() for p in parts)  # the replacement and the originals
    state = index.load(str(out), fingerprint=FP)
    assert sorted(state.stale) == parts and seen(out) == before  # the originals are stale: never read twice
    with OutputLock(str(out)) as lock:
        index.tidy(str(out), index.load(str(out), repair=True, fingerprint=FP), lock.gen, lock.check)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == merged and seen(out) == before


def test_a_resume_reads_the_index_not_the_parts(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with OutputLock(str(out)) as lock:
        for i in range(20):
            write(out, lock, [f"k{i}"])
        index_everything(out, lock)
        write(out, lock, ["late"])  # written after the index: read whole
    fetched = []
    real = io.fetch
    monkeypatch.setattr(io, "fetch", lambda fs, path, size=None: fetched.append(Path(path).name) or real(fs, path,
                                                                                                         size))
    state = index.load(str(out), fingerprint=FP)
    assert len(state.winners) == 21 and state.uncovered == [n for n in fetched if n.startswith("part-")]
    assert len(state.uncovered) == 1 and sum(n.startswith("seg-") for n in fetched) == 1


def test_a_fan_out_unit_is_done_only_when_whole_and_from_one_input(tmp_path):
    out = tmp_path / "out"

    def write_unit(lock, unit, labels, made_from="photo"):
        keys = [f"{unit}|{v}" for v in labels]
        n = len(keys)
        batch = {"key": objects(keys), "source_key": objects([unit] * n), "status": objects(["ok"] * n),
                 "error_code": objects([""] * n), "error": objects([""] * n),
                 "input_id": objects([f"{made_from}-{unit}"] * n)}
        driver.write_batch(batch, str(out), {"fingerprint": FP}, (), lock.ticket, "source_key")

    with OutputLock(str(out)) as lock:
        write_unit(lock, "u", "xy")  # one batch's output, split over two parts by Ray
        write_unit(lock, "u", "z")
        write_unit(lock, "v", "xy")  # v|z never written: killed
        write_unit(lock, "w", "xyz")
        write_unit(lock, "w", "x", made_from="new")  # w's input changed; killed after one of its rows
        write_unit(lock, "m", "xyz", made_from="new")  # m's input changed since, nothing redone yet
    state = index.load(str(out), fingerprint=FP)
    current = {"u": "photo-u", "v": "photo-v", "w": "new-w", "m": "newer-m"}
    plan = driver.plan_units(state, current, None, False, 3)
    assert plan.done == {"u"} and plan.redo == {"v", "w"} and plan.changed == {"m"}
