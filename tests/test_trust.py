"""Secrets never reach provenance, rows or messages; names from data never become paths (issue 21, items 2 and 4)."""

import functools
import http.server
import io
import json
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest

from conftest import ENV, REPO, S3_SECRET, write_samples
from ops.redact import redact, redact_all
from pipelines.io import safe_name

SENTINELS = {"pw": "SENTINEL-url-password-7f3a", "gone": "SENTINEL-missing-password-91c2",
             "env": "SENTINEL-environment-token-c0de", "out": "SENTINEL-output-secret-5be1"}


def test_redact_masks_every_kind_of_credential(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-123456789")
    monkeypatch.setenv("SHORT_TOKEN", "torture")  # too short to be masked wherever the word appears
    cases = {
        "s3://AKIAXX:abc/def+ghi@bucket/out": "s3://***@bucket/out",
        "https://u:p@host/x.png": "https://***@host/x.png",
        "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential=AK%2F1&X-Amz-Signature=ab12":
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***",
        "https://h/x?token=zz&size=3": "https://h/x?token=***&size=3",
        "https://h/x?sig=zz#frag": "https://h/x?sig=***#frag",
        "error reading gs://b/x with tok-123456789 in 1 s": "error reading gs://b/x with *** in 1 s",
        "s3://torture16/out": "s3://torture16/out",
        "/plain/path/face@2x.png": "/plain/path/face@2x.png",
        "s3://bucket/folder/a@b.png": "s3://bucket/folder/a@b.png",
    }
    for text, expected in cases.items():
        assert redact(text) == expected, text
    assert redact_all({"argv": ["--input", "s3://k:s@b/x"], "n": 3, "s3://k:s@b": None}) == \
        {"argv": ["--input", "s3://***@b/x"], "n": 3, "s3://***@b": None}


def test_names_from_data_become_one_harmless_file_name():
    hostile = ["../../etc/passwd", "..", ".", "/abs/path", "a/b", "a\\b", "C:\\x", "..\\..\\x", "x" * 500, "",
               "new\nline", "nul\x00byte", "ünïcödé", ".hidden", "edit-dir"]
    names = [safe_name(h) for h in hostile]
    assert len(set(names)) == len(names)  # two different names never share a file
    for original, name in zip(hostile, names):
        assert name and len(name) <= 80 and not name.startswith(".")
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name), name
    assert safe_name("edit-dir") == "edit-dir" and safe_name("face.png") == "face.png"  # plain names kept


def test_hostile_edit_names_stay_inside_previews(tmp_path):
    """An edit named like a path writes its grid inside previews/, under a sanitised name."""
    import numpy as np

    from pipelines.cli import main

    from models.default_generator import load_default_generator

    photos = tmp_path / "photos"
    write_samples(photos, 1)

    G = load_default_generator()
    np.save(tmp_path / "d.npy", np.ones(G.style_dim, dtype=np.float32))
    (tmp_path / "edits.yaml").write_text(
        f"- {{kind: direction, name: '../../../escaped', path: {tmp_path / 'd.npy'}, strengths: [1]}}\n"
        f"- {{kind: direction, name: '/abs/x', path: {tmp_path / 'd.npy'}, strengths: [1]}}\n")
    assert main(["invert", "--input", str(photos), "--output", str(tmp_path / "lat"), "--spaces", "wplus",
                 "--steps", "1", "--align", "none", "--lpips-backbone", "random"]) == 0
    assert main(["edit", "--input", str(tmp_path / "lat"), "--output", str(tmp_path / "ed"),
                 "--edits", str(tmp_path / "edits.yaml")]) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png") if "photos" not in p.parts)
    assert not (tmp_path / "escaped.png").exists() and not list(tmp_path.parent.glob("escaped*"))
    grids = [p for p in written if p.parts[:2] == ("ed", "previews") and p.name.startswith("edit-")]
    assert len(grids) == 2 and all(".." not in p.parts for p in written)


class Photos(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet test output
        pass


def read_everything(fs, root: str) -> str:
    """Every byte an output holds, as text: JSON and PNG raw, Parquet decoded (its pages are compressed), values
    and schema metadata."""
    texts = []
    for path in fs.find(root):
        data = fs.cat_file(path)
        if path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            texts.append(json.dumps({k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}))
            texts.append(json.dumps(table.drop_columns([c for c in table.column_names if c.endswith("_png") or
                                                        c in ("image", "photo")]).to_pylist(), default=str))
        else:
            texts.append(data.decode("latin-1"))
    return "\n".join(texts)


def test_no_secret_reaches_run_json_stats_rows_or_messages(tmp_path, s3_server):
    """URLs with credentials, a secret-named environment variable and the S3 secret itself: none is found in
    run.json, stats.json, any row or Parquet metadata, previews, stdout or stderr; the rows still say which bytes
    they came from (the uri, credentials masked)."""
    served = tmp_path / "served"
    write_samples(served, 1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Photos, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    local = tmp_path / "local"
    write_samples(local, 2, seed=3)
    s3_server.create_bucket(Bucket="out")
    env = {**ENV, **{k: v for k, v in __import__("os").environ.items() if k.startswith("AWS_")},
           "MY_TOKEN": SENTINELS["env"]}
    inputs = [str(local), f"http://user:{SENTINELS['pw']}@127.0.0.1:{port}/00.png",
              f"http://user:{SENTINELS['gone']}@127.0.0.1:{port}/gone.png"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    try:
        done = cli("thumbnails", *[a for i in inputs for a in ("--input", i)], "--output", "s3://out/thumbs", "--size", "16")
        refused = cli("thumbnails", "--input", str(local), "--output", f"s3://AKIA:{SENTINELS['out']}@out/x")
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    assert refused.returncode == 2 and "--output s3://***@out/x: credentials in an object-store URL are not used" \
        in refused.stderr, refused.stderr[-2000:]  # refused before any listing could repeat them
    import s3fs

    fs = s3fs.S3FileSystem()
    stored = read_everything(fs, "out/thumbs")
    for text in (stored, done.stdout, done.stderr, refused.stdout, refused.stderr):
        for secret in [*SENTINELS.values(), S3_SECRET]:
            assert secret not in text
    table = pq.read_table(io.BytesIO(fs.cat_file([p for p in fs.find("out/thumbs") if "/part-" in p][0])))
    rows = {r["key"]: r for r in pq.ParquetDataset(
        [p for p in fs.find("out/thumbs") if p.endswith(".parquet") and "/part-" in p], filesystem=fs).read(
        columns=["key", "uri", "status", "error_code"]).to_pylist()}
    assert table.num_rows >= 1 and len(rows) == 4  # every input one row, the missing one failed
    gone = rows[f"http://user:***@127.0.0.1:{port}/gone.png".replace("user:***", "***")]
    assert gone["status"] == "failed" and gone["uri"] == f"http://***@127.0.0.1:{port}/gone.png"
    assert rows[f"http://***@127.0.0.1:{port}/00.png"]["status"] == "ok"
    run = json.loads(fs.cat_file("out/thumbs/run.json"))
    assert any("http://***@127.0.0.1" in a for a in run["runs"][-1]["argv"])
    assert "MY_TOKEN" not in stored  # the environment is never recorded
