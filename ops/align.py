"""Face alignment: FFHQ-style (landmarks -> oriented quad -> crop) or `none` (BDInvert's out-of-range setting).

FFHQ alignment is written from the published description of NVlabs/ffhq-dataset's method (steps and constants in
shared notes/face-alignment-notes.md §2); no code of that CC BY-NC-SA script is used. Landmarks come from a
swappable backend; the default, dlib's HOG detector + 68-point predictor, is what FFHQ itself was aligned with.
Licence: dlib's 68-point model was trained on iBUG 300-W, whose licence excludes commercial use; treat it as
non-commercial unless cleared.

Geometry conventions: points are (x, y) in pixel-index coordinates of the photo (pixel i's centre is at i).
`quad` is the aligned crop's corners in the photo: top-left, bottom-left, bottom-right, top-right.
`transform` is the 2x3 affine taking an aligned pixel (x, y, 1) to its point in the photo.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"


class AlignError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Face:
    score: float  # detector confidence; faces are chosen by it, never by box size (notes §1)
    box: tuple[float, float, float, float]  # left, top, right, bottom
    landmarks: np.ndarray  # [68, 2] iBUG order


class LandmarkBackend(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """uint8 [H, W, 3] RGB -> faces, highest score first."""


@dataclass
class Aligned:
    image: np.ndarray  # uint8 [size, size, 3]
    quad: np.ndarray  # [4, 2]
    transform: np.ndarray  # [2, 3]
    n_faces: int = -1  # faces detected; -1 when no detection ran (align none)
    face_score: float = float("nan")
    landmarks: np.ndarray | None = None  # [68, 2] in the photo


def face_models_dir() -> Path:
    """The model folder of `face-recognition-models`, found without importing it (its __init__ needs pkg_resources,
    which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("dlib landmark models not installed: pip install face-recognition-models==0.3.0 "
                                "(or pass model_dir= a folder holding shape_predictor_68_face_landmarks.dat)")
    return Path(spec.origin).parent / "models"


class DlibLandmarks:
    """dlib HOG frontal detector + 68-point shape predictor (CPU, one thread: parallelise across processes)."""

    name = "dlib68"

    def __init__(self, upsample: int = 1, min_score: float = 0.5, model_dir: str | None = None):
        import dlib

        path = Path(model_dir) / LANDMARKS_68 if model_dir else face_models_dir() / LANDMARKS_68
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: pip install face-recognition-models==0.3.0")
        self.upsample = upsample
        # HOG fires on face-like patterns (the astronaut's mission patch scores 0.12-0.18, real faces 0.9-1.2).
        self.min_score = min_score
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(path))

    def detect(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        boxes, scores, _ = self.detector.run(image, self.upsample, self.min_score)
        faces = []
        for box, score in zip(boxes, scores):
            shape = self.predictor(image, box)
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append(Face(float(score), (box.left(), box.top(), box.right(), box.bottom()), points))
        return sorted(faces, key=lambda f: -f.score)


@functools.lru_cache(maxsize=4)
def cached_backend(name: str = "dlib68", **options) -> LandmarkBackend:
    """One backend per worker process: loading the 68-point model takes about a second."""
    if name != "dlib68":
        raise ValueError(f"unknown landmark backend {name!r} (available: dlib68)")
    return DlibLandmarks(**options)


def ffhq_quad(landmarks: np.ndarray, rotate: bool = True) -> np.ndarray:
    """68 landmarks -> the FFHQ crop quad [4, 2] (TL, BL, BR, TR) in the same coordinates."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg, eye_to_eye = (eye_left + eye_right) / 2, eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    # Horizontal axis: across the eyes blended with the perpendicular of the eye-to-mouth line.
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]]) if rotate else np.array([1.0, 0.0])
    x = x / np.hypot(*x) * max(2.0 * np.hypot(*eye_to_eye), 1.8 * np.hypot(*eye_to_mouth))
    y = np.array([-x[1], x[0]])
    c = eye_avg + 0.1 * eye_to_mouth
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def quad_transform(quad: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine: aligned pixel (x, y) of a size x size crop -> the photo's pixel coordinates."""
    q0 = np.asarray(quad[0], dtype=np.float64)
    ex, ey = (quad[3] - quad[0]) / size, (quad[1] - quad[0]) / size
    return np.array([[ex[0], ey[0], q0[0] + 0.5 * (ex[0] + ey[0])],
                     [ex[1], ey[1], q0[1] + 0.5 * (ex[1] + ey[1])]])


def to_aligned_frame(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Photo points [N, 2] -> aligned-crop pixel coordinates (the inverse of `transform`)."""
    A, t = transform[:, :2], transform[:, 2]
    return (np.asarray(points, dtype=np.float64) - t) @ np.linalg.inv(A).T


def _reflect_pad_with_fade(img: np.ndarray, pad: tuple[int, int, int, int], qsize: float) -> np.ndarray:
    """Reflect-pad float [H, W, 3] by (left, top, right, bottom), then blur the padding (and a thin band inside)
    and fade it toward the median colour, so the generator never sees a mirrored copy of the face."""
    from scipy.ndimage import gaussian_filter

    left, top, right, bottom = pad
    img = np.pad(img, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w, _ = img.shape
    ys, xs = np.arange(h, dtype=np.float32)[:, None, None], np.arange(w, dtype=np.float32)[None, :, None]
    # 1 at the outer edge of the padding, 0 at the original image edge, negative inside.
    ramp_x = 1.0 - np.minimum(xs / left, (w - 1 - xs) / right)
    ramp_y = 1.0 - np.minimum(ys / top, (h - 1 - ys) / bottom)
    mask = np.maximum(ramp_x, ramp_y)
    sigma = qsize * 0.02
    img = img + (gaussian_filter(img, [sigma, sigma, 0]) - img) * np.clip(3.0 * mask + 1.0, 0.0, 1.0)
    img = img + (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def crop_quad(image: np.ndarray, quad: np.ndarray, size: int, transform_size: int | None = None,
              pad: bool = True) -> np.ndarray:
    """Crop an oriented quad out of uint8 [H, W, 3] to uint8 [size, size, 3], FFHQ-style: pre-shrink big photos,
    crop to the quad's neighbourhood, pad (reflect + blur + fade) where the quad leaves the photo, warp with
    supersampling `transform_size` (default 4x the output; FFHQ used 4096), Lanczos down to `size`."""
    transform_size = transform_size or 4 * size
    img = Image.fromarray(image)
    quad = np.array(quad, dtype=np.float64)
    qsize = float(np.hypot(*(quad[3] - quad[0])))
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:  # antialias once instead of warping from a huge photo
        img = img.resize((int(np.rint(img.width / shrink)), int(np.rint(img.height / shrink))), Image.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    box = (max(lo[0] - border, 0), max(lo[1] - border, 0), min(hi[0] + border, img.width),
           min(hi[1] + border, img.height))
    if box[2] - box[0] < img.width or box[3] - box[1] < img.height:
        img = img.crop(box)
        quad = quad - box[:2]
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    need = (max(border - lo[0], 0), max(border - lo[1], 0), max(hi[0] - img.width + border, 0),
            max(hi[1] - img.height + border, 0))
    if pad and max(need) > border - 4:
        margin = int(np.rint(qsize * 0.3))
        need = tuple(max(n, margin) for n in need)
        img = Image.fromarray(_reflect_pad_with_fade(np.asarray(img, dtype=np.float32), need, qsize))
        quad = quad + need[:2]
    img = img.transform((transform_size, transform_size), Image.QUAD, tuple((quad + 0.5).flatten()), Image.BILINEAR)
    if size < transform_size:
        img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def center_crop_resize(image: np.ndarray, size: int) -> Aligned:
    """`--align none`: the central square, Lanczos-resized to size x size; nothing else."""
    h, w = image.shape[:2]
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    out = Image.fromarray(image).crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    corners = np.array([[left, top], [left, top + side], [left + side, top + side], [left + side, top]], float) - 0.5
    return Aligned(np.asarray(out, dtype=np.uint8), corners, quad_transform(corners, size))


def align_ffhq(image: np.ndarray, size: int, backend: LandmarkBackend, strict_faces: bool = False,
               transform_size: int | None = None) -> Aligned:
    """Detect, take the highest-scoring face, crop its FFHQ quad. No face -> AlignError(no_face); several faces ->
    the best one (n_faces records how many), or AlignError(multiple_faces) when strict."""
    faces = backend.detect(image)
    if not faces:
        raise AlignError("no_face", f"no face found by {backend.name}")
    if strict_faces and len(faces) > 1:
        raise AlignError("multiple_faces", f"{len(faces)} faces found (scores "
                         f"{', '.join(f'{f.score:.2f}' for f in faces)}) and strict_faces is set")
    face = faces[0]
    quad = ffhq_quad(face.landmarks)
    return Aligned(crop_quad(image, quad, size, transform_size), quad, quad_transform(quad, size), len(faces),
                   face.score, face.landmarks)


@dataclass(frozen=True)
class AlignConfig:
    # ffhq: dlib's 68 landmarks -> FFHQ crop (the landmark model is non-commercial); none: centre square, resized
    align: Literal["ffhq", "none"] = "ffhq"
    strict_faces: bool = False  # a photo with several faces fails (multiple_faces) instead of aligning the best one
    min_face_score: float = 0.5  # detections scoring below are ignored
    transform_size: int | None = None  # FFHQ warp supersampling in px (None: 4x the output; 4096: FFHQ-exact, slow)
    landmark_backend: str = "dlib68"  # landmark detector (dlib68: HOG detector + 68-point predictor)
    upsample: int = 1  # dlib HOG upsampling: 1 finds faces down to ~40 px (FFHQ used 1)

    def __post_init__(self):
        if self.align not in ("ffhq", "none"):
            raise ValueError(f"align must be 'ffhq' or 'none', got {self.align!r}")

    def backend(self) -> LandmarkBackend:
        return cached_backend(self.landmark_backend, upsample=self.upsample, min_score=self.min_face_score)


def align_image(image: np.ndarray, size: int, config: AlignConfig) -> Aligned:
    """One decoded photo -> its aligned crop; raises AlignError for no_face / multiple_faces."""
    if config.align == "none":
        return center_crop_resize(image, size)
    return align_ffhq(image, size, config.backend(), config.strict_faces, config.transform_size)


def check_backend(config: AlignConfig) -> None:
    """Fail fast (before any row) when the configured landmark backend cannot load."""
    if config.align == "ffhq":
        config.backend()
