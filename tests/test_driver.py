"""The driver: keys that never collide silently, transient failures retried by a rerun, --retry-failed, versioned
outputs with their history (damage, identity and the index: test_index.py, test_resume.py; the lease: test_lock.py)."""

import json
import os
from pathlib import Path

import numpy as np

from conftest import no_align, read_parts, stored_keys, tensor, write_samples
from ops.invert import InvertConfig
from ops.invert_stage import InvertStage, InvertStageConfig
from pipelines import io
from pipelines.cli import main
from pipelines.driver import RunOptions, run

NO_ALIGN = no_align()

CFG = InvertStageConfig(invert=InvertConfig(steps=2, lpips_net="alex", lpips_backbone="random", optimize_noise=False))
FAST = ["--align", "none", "--lpips-net", "alex", "--lpips-backbone", "random", "--steps", "2"]


def statuses(out: Path) -> dict:
    table = read_parts(out)
    return dict(zip(table.column("key").to_pylist(), zip(table.column("status").to_pylist(),
                                                       table.column("error_code").to_pylist())))


# ----- keys --------------------------------------------------------------------------------------------------------
def test_several_input_folders_keep_every_file_under_its_folder_name(tmp_path):
    write_samples(tmp_path / "day1", 2)
    write_samples(tmp_path / "day2", 2, seed=1)  # the same file names
    out = tmp_path / "out"
    assert main(["invert", "--input", str(tmp_path / "day1"), "--input", str(tmp_path / "day2"), "--output",
                 str(out), *FAST]) == 0
    assert sorted(stored_keys(out)) == ["day1/00.png", "day1/01.png", "day2/00.png", "day2/01.png"]


def test_two_inputs_with_one_key_are_refused_naming_both(tmp_path, capsys):
    write_samples(tmp_path / "a" / "photos", 1)
    write_samples(tmp_path / "b" / "photos", 1)
    out = tmp_path / "out"
    assert main(["invert", "--input", str(tmp_path / "a" / "photos"), "--input", str(tmp_path / "b" / "photos"),
                 "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "a" / "photos" / "00.png") in err and str(tmp_path / "b" / "photos" / "00.png") in err
    assert not out.exists()  # refused before any row


# ----- transient failures ------------------------------------------------------------------------------------------
class OutOfMemoryOnce(InvertStage):
    """Runs out of memory whenever a batch holds `01.png`, while the file `marker` exists (the first run)."""

    marker = ""

    def compute(self, batch):
        if "01.png" in list(batch["key"]) and os.path.exists(self.marker):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().compute(batch)


def test_a_transient_failure_is_retried_by_the_rerun_and_nothing_else_is(tmp_path):
    names = write_samples(tmp_path / "in", 4)
    out, marker = tmp_path / "out", tmp_path / "first-run"
    marker.touch()
    stage = OutOfMemoryOnce(CFG)
    stage.marker = str(marker)

    def once():
        return run(stage, [str(tmp_path / "in")], str(out), photos_config=NO_ALIGN,
                   options=RunOptions(batch_size=2, progress=False))

    first = once()
    # the batch [00, 01] ran out of memory; halved, 00 succeeded alone and 01 failed alone, transiently
    assert statuses(out) == {"00.png": ("ok", ""), "01.png": ("failed", "out_of_memory"), "02.png": ("ok", ""),
                             "03.png": ("ok", "")}
    assert first["by_error"] == {"out_of_memory": 1}
    before = {k: v for k, v in zip(stored_keys(out), tensor(read_parts(out), "wplus"))}
    marker.unlink()
    second = once()
    assert (second["redone"], second["already_done"], second["rows_processed"]) == (1, 3, 1)
    assert sorted(stored_keys(out)) == names and set(statuses(out).values()) == {("ok", "")}
    after = {k: v for k, v in zip(stored_keys(out), tensor(read_parts(out), "wplus"))}
    assert all(np.array_equal(before[k], after[k]) for k in ("00.png", "02.png", "03.png"))
    assert once()["rows_processed"] == 0  # and a third run has nothing left to do


def test_permanent_failures_are_redone_only_with_retry_failed(tmp_path):
    write_samples(tmp_path / "in", 2)
    (tmp_path / "in" / "late.png").write_bytes(b"still uploading")
    out = tmp_path / "out"
    assert main(["invert", "--input", str(tmp_path / "in"), "--output", str(out), *FAST]) == 0
    assert statuses(out)["late.png"] == ("failed", "decode_error")
    assert main(["invert", "--input", str(tmp_path / "in"), "--output", str(out), *FAST]) == 0
    assert statuses(out)["late.png"] == ("failed", "decode_error")  # permanent: a plain rerun keeps it
    assert json.loads((out / "stats.json").read_text())["rows_processed"] == 0
    assert main(["invert", "--input", str(tmp_path / "in"), "--output", str(out), *FAST, "--retry-failed"]) == 0
    assert json.loads((out / "stats.json").read_text())["redone"] == 1  # tried again (and failed again)
    write_samples(tmp_path / "fixed", 1, seed=5)
    (tmp_path / "fixed" / "00.png").replace(tmp_path / "in" / "late.png")  # the upload finished: a new input
    assert main(["invert", "--input", str(tmp_path / "in"), "--output", str(out), *FAST]) == 0
    assert statuses(out)["late.png"] == ("ok", "") and len(stored_keys(out)) == 3
    assert json.loads((out / "stats.json").read_text())["changed"] == 1


# ----- provenance --------------------------------------------------------------------------------------------------
def test_outputs_are_versioned_and_keep_their_history(tmp_path, capsys):
    write_samples(tmp_path / "in", 1)
    out = tmp_path / "out"
    args = ["invert", "--input", str(tmp_path / "in"), "--output", str(out), *FAST]
    assert main(args) == 0 and main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["schema_version"] == io.SCHEMA_VERSION and len(record["runs"]) == 2
    assert all(r["code_version"].startswith("0.1.0") and "finished" in r for r in record["runs"])
    # an output written by a latentray of another schema is never resumed into
    record.update(schema_version=1, fingerprint="0123456789abcdef")
    record.pop("checksum")  # as latentray wrote run.json before schema 3
    (out / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(args) == 2
    assert f"schema 1 (this latentray writes schema {io.SCHEMA_VERSION})" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["runs"][0]["overwritten"]["schema_version"] == 1 and len(record["runs"]) == 2
    assert stored_keys(out) == ["00.png"]
