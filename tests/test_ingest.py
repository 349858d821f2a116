"""Ingest: listing, robust decoding of the bad-input corpus, exact conversions."""

import numpy as np
import pytest

from corpus import bad_input_corpus
from ops.ingest import DecodeConfig, decode_image, decode_row, list_inputs


@pytest.fixture(scope="module")
def corpus():
    return bad_input_corpus()


def test_every_corpus_file_becomes_exactly_one_row_with_the_expected_status(corpus):
    for name, (data, status, code) in corpus.items():
        row = decode_row(name, data)
        assert (row["status"], row["error_code"]) == (status, code), (name, row["error"])
        if status == "ok":
            assert row["image"].dtype == np.uint8 and row["image"].shape == (row["height"], row["width"], 3)
        else:
            assert row["image"] is None and row["error"]


def test_bomb_is_refused_from_the_header_with_a_clear_message(corpus):
    row = decode_row("bomb.png", corpus["bomb.png"][0])
    assert "400000000 pixels" in row["error"] and "not decoded" in row["error"]


def test_conversions(corpus):
    img, fmt = decode_image(corpus["exif_rotated.jpg"][0])
    assert fmt == "JPEG" and img.shape == (48, 32, 3)  # 48x32 stored, displayed rotated
    grey, _ = decode_image(corpus["grey16.png"][0])
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255 and np.all(grey[..., 0] == grey[..., 2])
    rgba, _ = decode_image(corpus["rgba.png"][0])
    ok, _ = decode_image(corpus["ok.jpg"][0])
    assert rgba.shape == (32, 48, 3)
    anim, fmt = decode_image(corpus["animated.gif"][0])
    assert fmt == "GIF" and anim[:, 0, 0].mean() < anim[:, -1, 0].mean()  # first frame: red grows to the right
    cmyk, _ = decode_image(corpus["cmyk.jpg"][0])
    assert cmyk.shape == (32, 48, 3)
    with pytest.raises(Exception, match="exceeds the limits"):
        decode_image(corpus["ok.jpg"][0], DecodeConfig(max_pixels=100))


def test_row_records_provenance(corpus):
    import hashlib

    data = corpus["ok.jpg"][0]
    row = decode_row("a/ok.jpg", data)
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert (row["width"], row["height"], row["format"]) == (48, 32, "JPEG")
    missing = decode_row("gone.jpg", None, read_error="FileNotFoundError: gone.jpg")
    assert (missing["status"], missing["error_code"]) == ("failed", "read_error")


def test_list_inputs_keys(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for rel in ("d/a.jpg", "d/sub/b.PNG", "d/notes.txt", "c.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    listed = list_inputs([str(tmp_path / "d")])
    assert [k for k, _ in listed] == ["a.jpg", "sub/b.PNG"]
    assert listed[1][1] == str(tmp_path / "d" / "sub" / "b.PNG")
    assert list_inputs([str(tmp_path / "c.jpg")]) == [(str(tmp_path / "c.jpg"), str(tmp_path / "c.jpg"))]
    globbed = list_inputs([str(tmp_path / "d" / "*.jpg")])
    assert globbed == [(str(tmp_path / "d" / "a.jpg"),) * 2]


def test_a_failed_row_still_names_the_bytes_it_came_from(corpus, tmp_path):
    """A photo that does not decode is a failed row that still records the sha256 of its bytes."""
    from ops.align import AlignConfig
    from ops.ingest import IngestConfig, IngestStage
    from ops.stage import objects

    names = sorted(corpus)
    for name in names:
        (tmp_path / name).write_bytes(corpus[name][0])
    n = len(names)
    batch = {"key": objects(names), "uri": objects([str(tmp_path / k) for k in names]), "status": objects(["ok"] * n),
             "error_code": objects([""] * n), "error": objects([""] * n)}
    out = IngestStage(IngestConfig(alignment=AlignConfig("none"))).ready().process(batch)
    assert {"ok", "failed"} <= set(out["status"])
    import hashlib

    assert list(out["sha256"]) == [hashlib.sha256(corpus[k][0]).hexdigest() for k in names]
