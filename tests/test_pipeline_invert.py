"""End to end on local Ray: the bad-input corpus and generator samples through `latentray invert`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_parts
from corpus import bad_input_corpus, face_corpus
from models.default_generator import load_default_generator
from ops.images import to_uint8
from pipelines import io
from pipelines.cli import main

ARGS = ["--align", "none", "--spaces", "wplus,fwplus", "--base-level", "8", "--steps", "3", "--batch-size", "4",
        "--lpips-net", "alex", "--lpips-backbone", "random"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name, (data, _, _) in bad_input_corpus().items():
        (root / name).write_bytes(data)
    G = load_default_generator()
    with torch.no_grad():
        img = G.synthesis(G.mapping(torch.randn(3, G.style_dim, generator=torch.Generator().manual_seed(0))))
    (root / "gen").mkdir()
    for i, a in enumerate(to_uint8(img)):
        Image.fromarray(a).save(root / "gen" / f"{i}.png")
    return root


def test_invert_accounts_for_every_input_once_and_resumes(photo_dir, tmp_path, capsys):
    out = tmp_path / "latents"
    assert main(["invert", "--input", str(photo_dir), "--output", str(out), *ARGS]) == 0
    table = read_parts(out)
    keys = table.column("key").to_pylist()
    expected = bad_input_corpus()
    assert sorted(keys) == sorted([*expected, "gen/0.png", "gen/1.png", "gen/2.png"])
    status = dict(zip(keys, table.column("status").to_pylist()))
    codes = dict(zip(keys, table.column("error_code").to_pylist()))
    for name, (_, st, code) in expected.items():
        assert (status[name], codes[name]) == (st, code), name
    wplus = table.column("wplus").combine_chunks().to_numpy_ndarray()
    ok = np.array([s == "ok" for s in status.values()])
    assert wplus.shape == (len(keys), 10, 128) and wplus.dtype == np.float32
    assert np.isfinite(wplus[ok]).all() and np.isnan(wplus[~ok]).all()
    assert table.column("fwplus_base_code").combine_chunks().to_numpy_ndarray().shape[1:] == (128, 8, 8)
    assert set(table.column("lpips_backbone").to_pylist()) == {"random"}
    assert b"latentray" in table.schema.metadata
    # the stored latents reproduce the stored metrics (rendered back with plain pyarrow columns)
    from ops import metrics
    from ops.latents import render

    gen = [i for i, k in enumerate(keys) if k.startswith("gen/")]
    G = load_default_generator()
    targets = torch.stack([torch.from_numpy(np.array(Image.open(photo_dir / keys[i]))) for i in gen])
    targets = targets.permute(0, 3, 1, 2).float() / 127.5 - 1
    base = table.column("fwplus_base_code").combine_chunks().to_numpy_ndarray()[gen]
    fw = table.column("fwplus_wplus").combine_chunks().to_numpy_ndarray()[gen]
    rendered = render(G, {"fwplus_base_code": base, "fwplus_wplus": fw}, "fwplus", base_level=8)
    stored = table.column("fwplus_psnr").to_numpy()[gen]
    np.testing.assert_allclose(metrics.psnr(rendered, targets).numpy(), stored, atol=1e-3)
    rendered = render(G, {"wplus": table.column("wplus").combine_chunks().to_numpy_ndarray()[gen]}, "wplus")
    np.testing.assert_allclose(metrics.psnr(rendered, targets).numpy(), table.column("wplus_psnr").to_numpy()[gen],
                               atol=1e-3)
    # export for other tools: only ok rows
    assert main(["export", "--input", str(out), "--output", str(tmp_path / "w.npz")]) == 0
    exported = np.load(tmp_path / "w.npz")
    assert list(exported["keys"]) == [k for k, s in zip(keys, status.values()) if s == "ok"]
    np.testing.assert_array_equal(exported["w"], wplus[ok])
    assert main(["export", "--input", str(out), "--output", str(tmp_path / "w.pt")]) == 0
    assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == set(exported["keys"])
    # a dry run says so without touching anything; a fresh output would process every input
    capsys.readouterr()
    assert main(["invert", "--input", str(photo_dir), "--output", str(out), *ARGS, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["inputs"], plan["already_done"], plan["to_do"]) == (len(keys), len(keys), 0)
    assert main(["invert", "--input", str(photo_dir), "--output", str(tmp_path / "fresh"), *ARGS, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["to_do"] == len(keys) and not (tmp_path / "fresh").exists()
    # rerun: nothing left to do
    assert main(["invert", "--input", str(photo_dir), "--output", str(out), *ARGS]) == 0
    assert sorted(read_parts(out).column("key").to_pylist()) == sorted(keys)
    assert json.loads((out / "stats.json").read_text())["rows_processed"] == 0
    # a different configuration refuses to resume
    assert main(["invert", "--input", str(photo_dir), "--output", str(out), *ARGS[:-2], "--lpips-backbone",
                 "random", "--seed", "1"]) == 2


def test_limit_marks_the_rest_skipped(photo_dir, tmp_path):
    out = tmp_path / "limited"
    assert main(["invert", "--input", str(photo_dir / "gen"), "--output", str(out), "--limit", "1", *ARGS]) == 0
    table = read_parts(out)
    assert sorted(zip(table.column("key").to_pylist(), table.column("status").to_pylist())) == \
        [("0.png", "ok"), ("1.png", "skipped"), ("2.png", "skipped")]


def test_ffhq_alignment_accounts_for_faces_and_no_faces(tmp_path):
    """The corpus plus two public-domain portraits under --align ffhq: every input once; photos without a face fail
    as no_face; the two-face photo aligns its best face (n_faces 2) or fails as multiple_faces with --strict-faces;
    landmarks, quad and transform are stored; previews and provenance are written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    corpus = face_corpus()
    for name, (data, _, _) in corpus.items():
        (photos / name).write_bytes(data)
    fast = ARGS[2:]  # without "--align none"
    out = tmp_path / "faces"
    assert main(["invert", "--input", str(photos), "--output", str(out), "--align", "ffhq", *fast]) == 0
    table = read_parts(out)
    rows = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    assert sorted(rows) == sorted(corpus)
    status, codes = table.column("status").to_pylist(), table.column("error_code").to_pylist()
    for name, (_, st, code) in corpus.items():
        assert (status[rows[name]], codes[rows[name]]) == (st, code), name
    n_faces = table.column("n_faces").to_pylist()
    assert n_faces[rows["face.png"]] == 1 and n_faces[rows["two_faces.jpg"]] == 2
    landmarks = table.column("landmarks").combine_chunks().to_numpy_ndarray()
    transform = table.column("align_transform").combine_chunks().to_numpy_ndarray()
    assert landmarks.shape == (len(rows), 68, 2) and transform.shape == (len(rows), 2, 3)
    face = rows["face.png"]
    assert np.isfinite(landmarks[face]).all() and np.isnan(landmarks[rows["ok.jpg"]]).all()
    # the aligned crop's centre maps into the astronaut's face box
    cx, cy = transform[face] @ np.array([31.5, 31.5, 1.0])
    assert 175 < cx < 265 and 76 < cy < 190
    assert list((out / "previews").glob("*.png"))
    run = json.loads((out / "run.json").read_text())
    assert run["prepare"]["config"]["alignment"]["align"] == "ffhq"
    assert len(run["prepare_checkpoints"]["landmarks"]) == 64
    assert {"torch", "ray", "dlib-bin"} <= set(run["runs"][-1]["versions"]) and run["schema_version"] == io.SCHEMA_VERSION
    strict = tmp_path / "strict"
    assert main(["invert", "--input", str(photos / "two_faces.jpg"), "--output", str(strict), "--align", "ffhq",
                 "--strict-faces", *fast]) == 0
    table = read_parts(strict)
    assert table.column("error_code").to_pylist() == ["multiple_faces"]


def test_run_file_chains_ingest_then_invert(tmp_path):
    """`latentray run`: ingest (FFHQ alignment, aligned pixels stored) then invert reading that output."""
    photos = tmp_path / "photos"
    photos.mkdir()
    corpus = {k: v for k, v in face_corpus().items() if k in ("face.png", "two_faces.jpg", "ok.jpg", "text.jpg")}
    for name, (data, _, _) in corpus.items():
        (photos / name).write_bytes(data)
    aligned, latents = tmp_path / "aligned", tmp_path / "latents"
    (tmp_path / "pipeline.yaml").write_text(f"""
stages:
  - stage: ingest
    input: {photos}
    output: {aligned}
    align: ffhq
  - stage: invert
    input: {aligned}
    output: {latents}
    spaces: wplus
    steps: 3
    limit: 3
    lpips-net: alex
    lpips-backbone: random
""")
    assert main(["run", str(tmp_path / "pipeline.yaml")]) == 0
    ingested = read_parts(aligned)
    pixels = ingested.column("aligned").combine_chunks().to_numpy_ndarray()
    assert pixels.shape == (4, 64, 64, 3) and pixels.dtype == np.uint8
    table = read_parts(latents)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(corpus)
    status = dict(zip(keys, zip(table.column("status").to_pylist(), table.column("error_code").to_pylist())))
    # sorted keys: face.png, ok.jpg, text.jpg | two_faces.jpg is past --limit 3; failures of ingest are kept
    assert status == {"face.png": ("ok", ""), "ok.jpg": ("failed", "no_face"), "text.jpg": ("failed", "decode_error"),
                      "two_faces.jpg": ("skipped", "limit")}
    i = keys.index("face.png")
    assert np.isfinite(table.column("wplus").combine_chunks().to_numpy_ndarray()[i]).all()
    assert table.column("n_faces").to_pylist()[i] == 1
    assert "aligned" not in table.column_names
