"""`latentray translate` end to end on local Ray with the official small CycleGAN golden generator: photos (with a
bad file) and the `aligned` column of an ingest output, each row translated exactly as the model does alone."""

import io

import numpy as np
import torch
from PIL import Image

from conftest import read_parts, reference_file
from corpus import face_corpus
from models.translation import load_translator
from ops.translate import preprocess, to_uint8_truncated
from pipelines.cli import main


def test_translate_photos_and_an_ingest_output(tmp_path):
    ckpt = str(reference_file("cyclegan/small_net_G_A.pth"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(40, 52, 3), (64, 64, 3)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(photos / f"{i}.png")
    (photos / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "translated"
    assert main(["translate", "--input", str(photos), "--output", str(out), "--translator", ckpt,
                 "--preprocess", "none", "--batch-size", "4"]) == 0
    table = read_parts(out)
    rows = dict(zip(table.column("key").to_pylist(), range(len(table))))
    assert sorted(rows) == ["0.png", "1.png", "broken.jpg"]
    assert table.column("status").to_pylist()[rows["broken.jpg"]] == "failed"
    G = load_translator(ckpt)
    for name in ("0.png", "1.png"):
        got = np.asarray(Image.open(io.BytesIO(table.column("translated_png")[rows[name]].as_py())))
        with torch.no_grad():
            want = to_uint8_truncated(G(preprocess(np.asarray(Image.open(photos / name)), "none")[None]))[0]
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
    assert list((out / "previews").glob("*.png"))
    # an ingest output's aligned crops, chained in a run file
    (photos / "face.png").write_bytes(face_corpus()["face.png"][0])
    (tmp_path / "p.yaml").write_text(f"""
stages:
  - {{stage: ingest, input: {photos / 'face.png'}, output: {tmp_path / 'aligned'}, size: 64}}
  - {{stage: translate, input: {tmp_path / 'aligned'}, output: {tmp_path / 'faces_b'}, column: aligned,
     translator: {ckpt}, load-size: 64}}
""")
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    faces = read_parts(tmp_path / "faces_b")
    assert faces.column("status").to_pylist() == ["ok"]
    assert Image.open(io.BytesIO(faces.column("translated_png")[0].as_py())).size == (64, 64)
    assert main(["translate", "--input", str(photos), "--output", str(tmp_path / "x"), "--translator",
                 str(reference_file("cyclegan/small_cases.pt"))]) == 2  # not a generator: refused before any row


def test_translate_with_a_pix2pix_unet_as_test_py_runs_it(tmp_path):
    """The U-Net golden through the stage with test.py's default behaviour (batch statistics, dropout on, seeded
    per row): each row equals the model run on that row alone with its key's generator, whatever its batch."""
    from models.translation import translate
    from ops.invert import key_generator

    ckpt = str(reference_file("pix2pix/unet_batch_dropout_net_G.pth"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    options = ["--translator", ckpt, "--load-size", "64", "--batch-stats", "--dropout"]
    for out, batch in ((tmp_path / "b3", "3"), (tmp_path / "b1", "1")):
        assert main(["translate", "--input", str(photos), "--output", str(out), *options, "--batch-size", batch]) == 0
    tables = [read_parts(tmp_path / name) for name in ("b3", "b1")]
    G = load_translator(ckpt, batch_stats=True, dropout=True)
    for name in ("0.png", "1.png", "2.png"):
        got = [np.asarray(Image.open(io.BytesIO(t.column("translated_png")[t.column("key").to_pylist().index(name)]
                                                .as_py()))) for t in tables]
        with torch.no_grad():
            x = preprocess(np.asarray(Image.open(photos / name)), "resize_and_crop", 64)[None]
            want = to_uint8_truncated(translate(G, x, [key_generator(0, f"dropout:{name}")]))[0]
        assert np.array_equal(got[0], want) and np.array_equal(got[1], want)
    run = __import__("json").loads((tmp_path / "b3" / "run.json").read_text())
    assert run["network"]["kind"] == "unet" and run["config"]["dropout"] is True
