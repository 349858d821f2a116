"""Storage primitives (pipelines/io.py): atomic writes, JSON with its own checksum."""

import pytest

from models import checkpoints
from pipelines import io


def test_json_files_are_replaced_atomically(tmp_path, monkeypatch):
    io.write_json(str(tmp_path), "run.json", {"runs": [1]})

    class Exploding(dict):
        def items(self):
            raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        io.write_json(str(tmp_path), "run.json", {"runs": [1, 2], "x": Exploding(a=1)})
    monkeypatch.setattr(checkpoints, "BACKOFF", 0.0)
    monkeypatch.setattr(io.os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        io.write_json(str(tmp_path), "run.json", {"runs": [1, 2, 3]})
    assert io.read_json(str(tmp_path), "run.json") == {"runs": [1]}


def test_json_carries_its_checksum_and_a_changed_value_is_damage(tmp_path):
    io.write_json(str(tmp_path), "stats.json", {"rows": 3, "by_status": {"ok": 3}})
    text = (tmp_path / "stats.json").read_text()
    assert '"checksum"' in text and io.read_json(str(tmp_path), "stats.json") == {"rows": 3, "by_status": {"ok": 3}}
    (tmp_path / "stats.json").write_text(text.replace('"rows": 3', '"rows": 4'))  # still valid JSON
    with pytest.raises(io.Damaged, match="checksum does not match"):
        io.read_json(str(tmp_path), "stats.json")
    (tmp_path / "old.json").write_text('{"fingerprint": "x"}')  # written before checksums: read as it is
    assert io.read_json(str(tmp_path), "old.json") == {"fingerprint": "x"}
