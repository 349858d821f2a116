"""`latentray translate` end to end on local Ray with the official small CycleGAN golden generator: photos (with a
bad file) and the `aligned` column of an ingest output, each row translated exactly as the model does alone."""

import io

import numpy as np
import torch
from PIL import Image

from conftest import read_parts, reference_file
from corpus import face_corpus
from models.cyclegan import load_cyclegan
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
    assert main(["translate", "--input", str(photos), "--output", str(out), "--cyclegan", ckpt,
                 "--preprocess", "none", "--batch-size", "4"]) == 0
    table = read_parts(out)
    rows = dict(zip(table.column("key").to_pylist(), range(len(table))))
    assert sorted(rows) == ["0.png", "1.png", "broken.jpg"]
    assert table.column("status").to_pylist()[rows["broken.jpg"]] == "failed"
    G = load_cyclegan(ckpt)
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
     cyclegan: {ckpt}, load-size: 64}}
""")
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    faces = read_parts(tmp_path / "faces_b")
    assert faces.column("status").to_pylist() == ["ok"]
    assert Image.open(io.BytesIO(faces.column("translated_png")[0].as_py())).size == (64, 64)
    assert main(["translate", "--input", str(photos), "--output", str(tmp_path / "x"), "--cyclegan",
                 str(reference_file("cyclegan/small_cases.pt"))]) == 2  # not a generator: refused before any row
