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

from ops.latents import SPACE_COLUMNS
from ops.stage import Column, Context, Plan, Resources, Stage, blank, image_column, objects

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


GEOMETRY = (Column("uri", "str"), Column("align_transform", "float32", (2, 3)),
            Column("landmarks", "float32", (68, 2)))


class PasteStage(Stage):
    """Rows of an edit (or invert, ingest, translate) output -> `pasted_png`, the whole photo with the face put
    back. Rows without usable geometry (align none has no face: the whole crop is pasted) still paste."""

    name = "paste"
    Config = PasteConfig
    help = "put edited (or reconstructed) aligned faces back into the original photos"
    examples = ("latentray paste --input out/edits --photos out/latents --output out/pasted",
                "latentray paste --input out/latents --space wplus --output out/reconstructed_in_photo")

    def prepare(self, context: Context) -> Plan:
        cfg = self.config
        key_source = "source_key" if (context.upstream or {}).get("stage") in ("edit", "stylize") else "key"
        geometry = None
        if cfg.photos and context.read_output:  # the photos' geometry, keyed by the photo's key
            table = context.read_output(cfg.photos, [c.name for c in GEOMETRY])
            geometry = {str(k): {c.name: table[c.name][i] for c in GEOMETRY} for i, k in enumerate(table["key"])}
        inputs = [Column(key_source, "str"), *(() if cfg.photos else GEOMETRY)]
        checkpoints, prepared = {}, {"key_source": key_source, "geometry": geometry}
        if cfg.space:
            from ops.latents import reading_latents

            source, G = reading_latents(context, "paste --space", cfg.generator)
            prepared.update(generator=source.generator, base_level=source.base_level)
            checkpoints["generator"] = G.generator_id
            inputs += [Column(c, "float32", None) for c in SPACE_COLUMNS[cfg.space]]
        else:
            inputs.append(Column(cfg.column, (context.columns or {}).get(cfg.column, Column("", "bytes")).dtype, None))
        return Plan(outputs=(Column("pasted_png", "bytes"), image_column("original", THUMB, stored=False),
                             image_column("recon_pasted", THUMB, stored=False)),
                    inputs=tuple(inputs), resources=Resources(num_cpus=1, num_gpus=1 if cfg.space else 0),
                    previews=("original", "recon_pasted"), checkpoints=checkpoints, prepared=prepared)

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from ops.latents import generator_on

        super().setup(plan, device)
        self.G = generator_on(plan.prepared["generator"], device) if self.config.space else None

    def faces(self, batch: dict) -> list[np.ndarray]:
        from ops.images import decode_cell, to_uint8

        if not self.config.space:
            return [decode_cell(cell) for cell in batch[self.config.column]]
        from ops.latents import render

        columns = {c: batch[c] for c in SPACE_COLUMNS[self.config.space]}
        return list(to_uint8(render(self.G, columns, self.config.space, self.plan.prepared["base_level"])))

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ops.align import to_aligned_frame
        from ops.images import encode_png, thumbnail
        from models.checkpoints import read_bytes
        from ops.ingest import decode_image

        n = len(batch["key"])
        out = {**blank(self.plan.outputs, n), "error_code": objects([""] * n), "error": objects([""] * n)}
        known = self.plan.prepared["geometry"]
        for i, face in enumerate(self.faces(batch)):
            source = str(batch[self.plan.prepared["key_source"]][i])
            geometry = known.get(source) if known is not None else {c.name: batch[c.name][i] for c in GEOMETRY}
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
