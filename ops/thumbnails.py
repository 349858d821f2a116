"""`latentray thumbnails`: an image column (or photos) -> small PNG thumbnails, for browsing large outputs. No Ray.

Reads uint8 pixel columns (`aligned` of ingest) and encoded images (`image_png` of edit, `translated_png`, ...)
alike; each thumbnail keeps its image's aspect ratio within `size` x `size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ops.stage import Column, Context, Plan, Stage, blank, image_column, objects


@dataclass(frozen=True)
class ThumbnailsConfig:
    column: str = "aligned"  # image column of a stage output: uint8 pixels or encoded images (photos: the photo)
    size: int = 128  # longest side of a thumbnail (px)


class ThumbnailsStage(Stage):
    """Every row's image as `thumbnail_png`, no side longer than `size`."""

    name = "thumbnails"
    Config = ThumbnailsConfig
    help = "small PNG thumbnails of an image column (or of photos), for browsing large outputs"
    examples = ("latentray thumbnails --input out/aligned --output out/thumbs --size 96",
                "latentray thumbnails --input out/edits --column image_png --output out/edit_thumbs")
    photos = "decode"

    def prepare(self, context: Context) -> Plan:
        cfg = self.config
        if cfg.size < 8:
            raise ValueError(f"--size must be at least 8 px, got {cfg.size}")
        found = (context.columns or {}).get(cfg.column)
        return Plan(inputs=(Column("image", found.dtype if found is not None else "bytes", None),),
                    outputs=(Column("thumbnail_png", "bytes"), image_column("recon_thumbnail", cfg.size, stored=False)),
                    batch_size=64, previews=("recon_thumbnail",),
                    rename={cfg.column: "image"} if context.upstream is not None else {})

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from ops.images import decode_cell, encode_png, thumbnail

        out = blank(self.plan.outputs, len(batch["key"]))
        pngs = []
        for i, cell in enumerate(batch["image"]):
            image = decode_cell(cell)
            small = Image.fromarray(image)
            small.thumbnail((self.config.size, self.config.size), Image.Resampling.LANCZOS)
            pngs.append(encode_png(np.asarray(small)))
            out["recon_thumbnail"][i] = thumbnail(image, self.config.size)
        out["thumbnail_png"] = objects(pngs)
        return out
