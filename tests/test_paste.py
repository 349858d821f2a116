"""Paste-back: an unedited aligned crop pasted through its stored transform gives the photo back inside the face,
and the photo's pixels outside the mask are untouched bit for bit; edited faces land where the face was."""

import io

import numpy as np
from PIL import Image

from conftest import read_parts
from corpus import face_corpus
from ops.align import AlignConfig, align_image
from ops.paste import face_mask, paste_face
from pipelines.cli import main


def photo() -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(face_corpus()["face.png"][0])).convert("RGB"))


def test_the_identity_paste_reproduces_the_face_and_leaves_the_rest_untouched():
    image = photo()
    aligned = align_image(image, 256, AlignConfig("ffhq"))
    from ops.align import to_aligned_frame

    mask = face_mask(256, to_aligned_frame(aligned.landmarks, aligned.transform), 0.08)
    pasted = paste_face(image, aligned.image, aligned.transform, mask)
    # where the mask reaches in the photo: the pixels it touches, and its solid core
    A, t = aligned.transform[:, :2], aligned.transform[:, 2]
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    a = (np.stack([xs.ravel(), ys.ravel()], 1) - t) @ np.linalg.inv(A).T
    inside = (a >= 0).all(1) & (a <= 255).all(1)
    m = np.zeros(len(a))
    idx = np.round(a[inside]).astype(int)
    m[inside] = mask[idx[:, 1], idx[:, 0]]
    m = m.reshape(ys.shape)
    core, untouched = m > 0.99, ~(m > 0)
    assert core.sum() > 2000  # a real face region (the astronaut's face is ~70 px wide)
    error = np.abs(pasted.astype(int) - image.astype(int))[core]
    assert error.mean() < 4 and np.percentile(error, 99) < 40  # resampling twice, nothing else
    assert np.array_equal(pasted[untouched & (m == 0)], image[untouched & (m == 0)])
    changed = np.any(pasted != image, axis=2)
    assert not changed[m == 0].any()  # no pixel outside the mask's support changed at all


def test_paste_stage_puts_edited_faces_back_into_their_photos(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("face.png", "ok.jpg"):  # ok.jpg has no face: its row keeps the ingest failure
        (photos / name).write_bytes(face_corpus()[name][0])
    assert main(["ingest", "--input", str(photos), "--output", str(tmp_path / "aligned"), "--size", "128"]) == 0
    assert main(["paste", "--input", str(tmp_path / "aligned"), "--column", "aligned", "--output",
                 str(tmp_path / "pasted")]) == 0
    table = read_parts(tmp_path / "pasted")
    rows = dict(zip(table.column("key").to_pylist(), range(len(table))))
    assert table.column("error_code").to_pylist()[rows["ok.jpg"]] == "no_face"
    pasted = np.asarray(Image.open(io.BytesIO(table.column("pasted_png")[rows["face.png"]].as_py())))
    original = photo()
    assert pasted.shape == original.shape
    changed = np.any(pasted != original, axis=2)
    assert 0 < changed.mean() < 0.5  # only around the face
    ingest = read_parts(tmp_path / "aligned")
    i = ingest.column("key").to_pylist().index("face.png")
    transform = ingest.column("align_transform").combine_chunks().to_numpy_ndarray()[i]
    # exactly the paste of this row's own crop, through its own transform and landmarks, with the default feather
    # (paste_face itself is checked against the photo above): the stage joined the right photo, row and geometry
    from ops.align import to_aligned_frame

    crop = ingest.column("aligned").combine_chunks().to_numpy_ndarray()[i]
    landmarks = ingest.column("landmarks").combine_chunks().to_numpy_ndarray()[i].astype(np.float64)
    mask = face_mask(crop.shape[0], to_aligned_frame(landmarks, transform.astype(np.float64)), 0.08)
    assert np.array_equal(pasted, paste_face(original, crop, transform.astype(np.float64), mask))
    assert np.abs(pasted.astype(int) - original.astype(int))[changed].mean() < 6  # an unedited face: the photo
    cy, cx = np.argwhere(changed).mean(0)
    fx, fy = transform @ np.array([63.5, 63.5, 1.0])  # the crop's centre in the photo
    assert abs(cx - fx) < 25 and abs(cy - fy) < 40
    assert list((tmp_path / "pasted" / "previews").glob("*.png"))
