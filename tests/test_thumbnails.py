"""`latentray thumbnails`, the stage added in one file (ops/thumbnails.py): every row once, each thumbnail the
image itself scaled to fit `size` (aspect kept, never enlarged), failed rows passed through; photos or any image
column of a stage output."""

import io

import numpy as np
from PIL import Image

from conftest import read_parts
from corpus import face_corpus
from pipelines.cli import main


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_thumbnails_of_photos_and_of_an_ingest_output(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    corpus = {k: v for k, v in face_corpus().items() if k in ("face.png", "ok.jpg", "text.jpg")}
    for name, (data, _, _) in corpus.items():
        (photos / name).write_bytes(data)
    assert main(["thumbnails", "--input", str(photos), "--output", str(tmp_path / "t"), "--size", "32"]) == 0
    table = read_parts(tmp_path / "t")
    rows = dict(zip(table.column("key").to_pylist(), zip(table.column("status").to_pylist(),
                                                         table.column("thumbnail_png").to_pylist())))
    assert sorted(rows) == sorted(corpus) and rows["text.jpg"] == ("failed", b"")
    for name in ("face.png", "ok.jpg"):
        photo = np.asarray(Image.open(io.BytesIO(corpus[name][0])).convert("RGB"))
        thumb = decode(rows[name][1])
        assert max(thumb.shape[:2]) == 32  # the longest side scaled to the size, the aspect kept within a pixel
        assert abs(thumb.shape[1] / thumb.shape[0] - photo.shape[1] / photo.shape[0]) < 2 / 32 * 2
        expected = np.asarray(Image.fromarray(photo).resize(thumb.shape[1::-1], Image.Resampling.LANCZOS))
        assert np.abs(thumb.astype(int) - expected).mean() < 3  # the same picture, reduced
    assert "recon_thumbnail" not in table.column_names and list((tmp_path / "t" / "previews").glob("*.png"))
    # an image column of a stage output: the aligned crops of an ingest, smaller than --size: never enlarged
    assert main(["ingest", "--input", str(photos), "--output", str(tmp_path / "aligned"), "--align", "none"]) == 0
    assert main(["thumbnails", "--input", str(tmp_path / "aligned"), "--output", str(tmp_path / "ta"),
                 "--size", "128"]) == 0
    aligned, thumbs = read_parts(tmp_path / "aligned"), read_parts(tmp_path / "ta")
    crops = dict(zip(aligned.column("key").to_pylist(), aligned.column("aligned").combine_chunks().to_numpy_ndarray()))
    for key, status, png in zip(*(thumbs.column(c).to_pylist() for c in ("key", "status", "thumbnail_png"))):
        if status == "ok":
            assert np.array_equal(decode(png), crops[key])  # 64 px crops fit 128: kept as they are, losslessly


def test_a_missing_image_column_is_refused_before_any_row_naming_it(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "face.png").write_bytes(face_corpus()["face.png"][0])
    assert main(["ingest", "--input", str(photos), "--output", str(tmp_path / "aligned"), "--align", "none"]) == 0
    capsys.readouterr()
    assert main(["thumbnails", "--input", str(tmp_path / "aligned"), "--output", str(tmp_path / "t"),
                 "--column", "image_png"]) == 2
    err = capsys.readouterr().err
    assert "thumbnails: the input" in err and "has no column `image_png`" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()
