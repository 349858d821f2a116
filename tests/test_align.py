"""FFHQ alignment: the quad formula against hand-computed geometry, the crop and its stored transform against a
marked pixel, and the dlib backend on public-domain portraits (geometry with tolerances, never pixels)."""

import sys

import numpy as np
import pytest
from PIL import Image

from corpus import astronaut, grace_hopper, two_faces
from ops.align import (AlignConfig, AlignError, DlibLandmarks, align_ffhq, align_image, crop_quad, face_models_dir,
                       ffhq_quad, quad_transform, to_aligned_frame)


def upright_landmarks() -> np.ndarray:
    lm = np.zeros((68, 2))
    lm[36:42] = (30, 50)  # eye on the image's left
    lm[42:48] = (70, 50)
    lm[48], lm[54] = (35, 90), (65, 90)  # mouth corners
    return lm


def rotation(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def test_quad_of_an_upright_face_by_hand():
    # eye_avg (50, 50), eye_to_eye (40, 0), eye_to_mouth (0, 40): x = (40, 0) + (40, 0) -> unit (1, 0), scaled to
    # max(2*40, 1.8*40) = 80; y = (0, 80); centre = eye_avg + 0.1*eye_to_mouth = (50, 54).
    np.testing.assert_allclose(ffhq_quad(upright_landmarks()), [[-30, -26], [-30, 134], [130, 134], [130, -26]])


def test_quad_turns_with_the_face():
    R, t = rotation(25), np.array([7.0, -3.0])
    turned = ffhq_quad(upright_landmarks() @ R.T + t)
    np.testing.assert_allclose(turned, ffhq_quad(upright_landmarks()) @ R.T + t, atol=1e-9)
    # rotate=False keeps the crop axis-aligned and the same size
    square = ffhq_quad(upright_landmarks() @ R.T + t, rotate=False)
    assert np.allclose(square[0, 0], square[1, 0]) and np.isclose(np.ptp(square[:, 0]), 160)


@pytest.mark.parametrize("quad_centre,degrees", [((60, 50), 20), ((15, 20), -30)])  # inside; crossing the edge
def test_crop_and_transform_map_a_marked_pixel_back(quad_centre, degrees):
    rng = np.random.default_rng(0)
    photo = (rng.random((100, 120, 3)) * 60).astype(np.uint8)
    mark = np.array([64.0, 47.0]) if quad_centre == (60, 50) else np.array([20.0, 24.0])
    photo[int(mark[1]), int(mark[0])] = 255
    R = rotation(degrees)
    quad = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]]) * 30 @ R.T + quad_centre
    aligned = crop_quad(photo, quad, 64)
    assert aligned.shape == (64, 64, 3)
    y, x = np.unravel_index(aligned.sum(2).argmax(), (64, 64))
    found = quad_transform(quad, 64) @ np.array([x, y, 1.0])
    assert np.abs(found - mark).max() <= 1.0  # one aligned pixel is ~0.94 photo pixels here
    np.testing.assert_allclose(to_aligned_frame(found[None], quad_transform(quad, 64))[0], [x, y], atol=1e-9)


def test_models_are_located_without_importing_their_package():
    assert (face_models_dir() / "shape_predictor_68_face_landmarks.dat").is_file()
    assert "face_recognition_models" not in sys.modules


@pytest.fixture(scope="module")
def dlib68():
    return DlibLandmarks()


def quad_geometry(quad):
    centre = quad.mean(0)
    side = np.hypot(*(quad[3] - quad[0]))
    angle = np.degrees(np.arctan2(*(quad[3] - quad[0])[::-1]))
    return centre, side, angle


@pytest.mark.parametrize("degrees", [-20, 20])
def test_rotated_portrait_gives_the_rotated_quad(dlib68, degrees):
    """A known transform of the photo moves the detected quad the same way (notes §2: compare geometry)."""
    photo = astronaut()
    base = align_ffhq(photo, 256, dlib68)
    turned = np.asarray(Image.fromarray(photo).rotate(degrees, Image.BICUBIC))  # counter-clockwise about the centre
    result = align_ffhq(turned, 256, dlib68)
    c = np.array([photo.shape[1], photo.shape[0]]) / 2 - 0.5
    expected = (base.quad - c) @ rotation(-degrees).T + c  # y points down: counter-clockwise is -degrees here
    (c0, s0, a0), (c1, s1, a1) = quad_geometry(expected), quad_geometry(result.quad)
    assert np.hypot(*(c1 - c0)) < 0.03 * s0
    assert abs(s1 / s0 - 1) < 0.05 and abs(a1 - a0) < 3


@pytest.mark.parametrize("photo", [astronaut, grace_hopper])
def test_aligned_crop_puts_the_face_where_ffhq_does(dlib68, photo):
    """Landmarks found again inside the aligned crop sit where the stored transform says, and the eyes come out
    level, centred, at the FFHQ height."""
    result = align_ffhq(photo(), 256, dlib68)
    assert result.image.shape == (256, 256, 3) and result.n_faces == 1 and result.face_score > 0.5
    expected = to_aligned_frame(result.landmarks, result.transform)
    again = dlib68.detect(result.image)[0].landmarks
    assert np.median(np.hypot(*(again - expected).T)) < 0.02 * 256
    eyes = expected[36:48].reshape(2, 6, 2).mean(1)
    assert abs(eyes[0, 1] - eyes[1, 1]) < 0.03 * 256 and abs(eyes.mean(0)[0] - 127.5) < 0.03 * 256
    assert 0.3 * 256 < eyes.mean(0)[1] < 0.5 * 256


def test_face_policies(dlib68):
    with pytest.raises(AlignError) as e:
        align_ffhq(np.full((200, 200, 3), 90, np.uint8), 64, dlib68)
    assert e.value.code == "no_face"
    photo = two_faces()
    best = align_ffhq(photo, 64, dlib68)
    scores = [f.score for f in dlib68.detect(photo)]
    assert best.n_faces == 2 and best.face_score == max(scores)
    with pytest.raises(AlignError) as e:
        align_ffhq(photo, 64, dlib68, strict_faces=True)
    assert e.value.code == "multiple_faces"
    # the mission patch is a weak second "face" (notes §1); the default minimum score drops it
    assert len(DlibLandmarks(min_score=0.0).detect(astronaut())) == 2 and len(dlib68.detect(astronaut())) == 1


def test_align_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="ffhq"):
        AlignConfig(align="mtcnn")
    out = align_image(astronaut(), 32, AlignConfig(align="none"))
    assert out.image.shape == (32, 32, 3) and out.n_faces == -1
