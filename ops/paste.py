"""Paste-back: an aligned face (reconstructed or edited) put back into the photo it was cut from, through the stored
`align_transform` (aligned pixel -> photo pixel) and a feathered face mask. No Ray.

The mask is drawn in the aligned frame: with landmarks, the face polygon (jaw line closed over the brows, raised by
a fifth of the brow-to-chin height to take in the forehead), otherwise the whole crop; its edge fades over
`feather` of the crop. Each photo pixel p takes the face at a = A^-1 (p - t) (bilinear; pixel i's centre at i, as
ops/align.py) blended by the mask there: out = photo (1 - m) + face m. Where m is 0 the photo's pixel is kept as
it is, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ops.stage import Context, Provenance, Resources, Stage, objects

THUMB = 128  # preview tiles


def face_mask(size: int, landmarks: np.ndarray | None, feather: float) -> np.ndarray:
    """float [size, size] in [0, 1] in the aligned frame."""
    from PIL import Image, ImageDraw
    from scipy.ndimage import gaussian_filter

    sigma = feather * size / 2
    if landmarks is None or not np.isfinite(landmarks).all():
        mask = np.zeros((size, size))
        inset = int(round(feather * size))
        mask[inset:size - inset, inset:size - inset] = 1
    else:
        jaw, brows = landmarks[0:17], landmarks[26:16:-1]
        lift = 0.2 * (jaw[8, 1] - brows[:, 1].mean())
        polygon = np.concatenate([jaw, brows - [0, lift]])
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon + 0.5], fill=255)
        mask = np.asarray(canvas, dtype=np.float64) / 255
    mask = gaussian_filter(mask, sigma) if sigma > 0 else mask
    return np.clip(mask, 0, 1)


def paste_face(photo: np.ndarray, face: np.ndarray, transform: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 photo [H, W, 3] with `face` (uint8 [s, s, 3], aligned frame) pasted through `transform` [2, 3]."""
    from scipy.ndimage import map_coordinates

    A, t = np.asarray(transform[:, :2], np.float64), np.asarray(transform[:, 2], np.float64)
    size = face.shape[0]
    corners = np.array([[0, 0], [0, size - 1], [size - 1, 0], [size - 1, size - 1]], np.float64) @ A.T + t
    h, w = photo.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, [w, h])
    out = photo.copy()
    if x0 >= x1 or y0 >= y1:
        return out
    ys, xs = np.mgrid[y0:y1, x0:x1]
    aligned = (np.stack([xs.ravel(), ys.ravel()], 1) - t) @ np.linalg.inv(A).T  # (x, y) in the aligned frame
    coords = [aligned[:, 1], aligned[:, 0]]
    m = map_coordinates(mask, coords, order=1, mode="constant", cval=0.0).reshape(ys.shape)
    region = out[y0:y1, x0:x1].astype(np.float64)
    for c in range(3):
        pasted = map_coordinates(face[..., c].astype(np.float64), coords, order=1, mode="nearest").reshape(ys.shape)
        region[..., c] = region[..., c] * (1 - m) + pasted * m
    blended = np.clip(np.rint(region), 0, 255).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where((m > 0)[..., None], blended, out[y0:y1, x0:x1])
    return out


@dataclass(frozen=True)
class PasteConfig:
    # the stage output holding each photo's uri, align_transform and landmarks (an ingest or invert output of the
    # photos; "": the input's own columns)
    photos: str = ""
    column: str = "image_png"  # the input's aligned-face column: image_png (edit), aligned (ingest), ...
    space: Literal["", "wplus", "s", "fwplus"] = ""  # render this space's latents instead (invert outputs)
    feather: float = 0.08  # width of the mask's soft edge, as a fraction of the aligned crop
    generator: str = ""  # checkpoint for --space ("": the one the latents were made with)


SPACE_COLUMNS = {"wplus": ("wplus",), "s": ("styles",), "fwplus": ("fwplus_wplus", "fwplus_base_code")}
GEOMETRY = ("uri", "align_transform", "landmarks")


class PasteStage(Stage):
    """Rows of an edit (or invert, ingest, translate) output -> `pasted_png`, the whole photo with the face put
    back. Rows without usable geometry (align none has no face: the whole crop is pasted) still paste."""

    name = "paste"
    Config = PasteConfig
    resources = Resources(num_cpus=1, num_gpus=1)
    batch_size = 8

    def prepare(self, context: Context) -> Provenance:
        cfg = self.config
        self.uses_models = bool(cfg.space)
        self.key_source = "source_key" if (context.upstream or {}).get("stage") in ("edit", "stylize") else "key"
        image = SPACE_COLUMNS[cfg.space] if cfg.space else (cfg.column,)
        self.geometry = None
        if cfg.photos:  # the photos' geometry, keyed by the photo's key
            table = context.read_output(cfg.photos, list(GEOMETRY))
            self.geometry = {str(k): {c: table[c][i] for c in GEOMETRY} for i, k in enumerate(table["key"])}
        self.input_columns = ("key", "status", "error_code", "error", *image,
                              *(("source_key",) if self.key_source == "source_key" else ()),
                              *(() if cfg.photos else GEOMETRY))
        checkpoints = {}
        if cfg.space:
            from ops.invert_stage import latent_source, load_checked_generator

            source = latent_source(context.upstream, "paste --space")
            self.generator, self.base_level = cfg.generator or source["generator"], source["base_level"]
            checkpoints["generator"] = load_checked_generator(self.generator, source["generator_id"]).generator_id
        return Provenance(checkpoints=checkpoints)

    def setup(self, device: str = "cpu") -> None:
        from ops.invert_stage import generator_on

        self.G = generator_on(self.generator, device) if self.config.space else None

    def preview_columns(self) -> tuple[str, ...]:
        return ("original", "recon_pasted")

    def blank(self, n: int) -> dict[str, np.ndarray]:
        return {"pasted_png": objects([b""] * n), "original": np.zeros((n, THUMB, THUMB, 3), np.uint8),
                "recon_pasted": np.zeros((n, THUMB, THUMB, 3), np.uint8)}

    def faces(self, batch: dict) -> list[np.ndarray]:
        from ops.images import decode_cell, to_uint8

        if not self.config.space:
            return [decode_cell(cell) for cell in batch[self.config.column]]
        from ops.render import render

        columns = {c: batch[c] for c in SPACE_COLUMNS[self.config.space]}
        return list(to_uint8(render(self.G, columns, self.config.space, self.base_level)))

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ops.align import to_aligned_frame
        from ops.images import encode_png, thumbnail
        from ops.ingest import decode_image, read_bytes

        n = len(batch["key"])
        out = {**self.blank(n), "error_code": objects([""] * n), "error": objects([""] * n)}
        for i, face in enumerate(self.faces(batch)):
            source = str(batch[self.key_source][i])
            geometry = self.geometry.get(source) if self.geometry is not None else \
                {c: batch[c][i] for c in GEOMETRY}
            if geometry is None or not np.isfinite(np.asarray(geometry["align_transform"], float)).all():
                out["error_code"][i], out["error"][i] = "no_geometry", f"no photo geometry for {source!r}"
                continue
            photo, _ = decode_image(read_bytes(str(geometry["uri"])))
            transform = np.asarray(geometry["align_transform"], np.float64)
            landmarks = np.asarray(geometry["landmarks"], np.float64)
            local = to_aligned_frame(landmarks, transform) if np.isfinite(landmarks).all() else None
            pasted = paste_face(photo, face, transform, face_mask(face.shape[0], local, self.config.feather))
            out["pasted_png"][i] = encode_png(pasted)
            out["original"][i], out["recon_pasted"][i] = thumbnail(photo, THUMB), thumbnail(pasted, THUMB)
        return out
