"""Every input exactly one row describing the bytes now at its uri, end to end: another folder into the same output,
a photo replaced in place or removed, a part damaged in the middle of a page, --overwrite keeping the quarantine."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from conftest import read_parts
from pipelines import index
from pipelines.cli import main
from conftest import write_samples

FAST = ["--align", "none", "--lpips-net", "alex", "--lpips-backbone", "random", "--steps", "2"]


def rows(out: Path) -> dict:
    """key -> (uri, sha256, status) of every row physically in the parts (no duplicates allowed)."""
    table = read_parts(out)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key is stored twice"
    return {k: (u, s, st) for k, u, s, st in zip(keys, *(table.column(c).to_pylist() for c in (
        "uri", "sha256", "status")))}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def test_rows_follow_the_inputs_another_folder_a_replaced_photo_a_removed_one(tmp_path):
    write_samples(tmp_path / "day1", 3)
    write_samples(tmp_path / "day2", 3, seed=7)  # the same file names, other pictures
    out = tmp_path / "out"
    assert main(["invert", "--input", str(tmp_path / "day1"), "--output", str(out), *FAST]) == 0
    assert main(["invert", "--input", str(tmp_path / "day2"), "--output", str(out), *FAST]) == 0
    assert (stats(out)["changed"], stats(out)["already_done"], stats(out)["rows_processed"]) == (3, 0, 3)
    day2 = tmp_path / "day2"
    assert rows(out) == {n: (str(day2 / n), sha(day2 / n), "ok") for n in ("00.png", "01.png", "02.png")}
    # a photo replaced in place, another removed
    write_samples(tmp_path / "new", 1, seed=11)
    shutil.copyfile(tmp_path / "new" / "00.png", day2 / "01.png")
    (day2 / "02.png").unlink()
    assert main(["invert", "--input", str(day2), "--output", str(out), *FAST]) == 0
    assert (stats(out)["changed"], stats(out)["already_done"], stats(out)["missing_inputs"]) == (1, 1, 1)
    found = rows(out)
    assert found["01.png"] == (str(day2 / "01.png"), sha(day2 / "01.png"), "ok")
    assert found["02.png"][0] == str(day2 / "02.png")  # its input is gone: the row stays, counted, never dropped
    assert main(["invert", "--input", str(day2), "--output", str(out), *FAST]) == 0
    assert stats(out)["rows_processed"] == 0  # and a rerun is a no-op
    assert main(["verify", str(out)]) == 0


def test_a_part_damaged_mid_page_is_quarantined_its_rows_redone_and_overwrite_keeps_the_quarantine(tmp_path):
    names = write_samples(tmp_path / "in", 4)
    out = tmp_path / "out"
    args = ["invert", "--input", str(tmp_path / "in"), "--output", str(out), *FAST]
    assert main(args) == 0
    part = next(out.glob("part-*.parquet"))
    meta = pq.ParquetFile(part).metadata
    columns = [meta.schema.column(i).path for i in range(meta.num_columns)]
    latent = next(i for i, c in enumerate(columns) if c.startswith("wplus"))
    chunk = meta.row_group(0).column(latent)  # a latent page: never read by a key-only scan
    data = bytearray(part.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x55
    part.write_bytes(bytes(data))
    assert main(args) == 0
    kept = list((out / "quarantine").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(data)
    assert stats(out)["quarantined"] == [str(kept[0])] and stats(out)["rows_processed"] == len(names)
    assert sorted(rows(out)) == names and {r[2] for r in rows(out).values()} == {"ok"}
    assert main([*args[:-1], "3", "--overwrite"]) == 0  # another configuration, started over
    assert [p.read_bytes() for p in (out / "quarantine").iterdir()] == [bytes(data)]
    assert index.verify(str(out), repair=False)["clean"]

