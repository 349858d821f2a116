"""junyanz CycleGAN / pix2pix test-time conventions (shared/reference/cyclegan/README.md): pre-processing and the
uint8 conversion, and the translate stage. No Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ops.stage import Column, Context, Plan, Resources, Stage, blank, image_column

PREPROCESS = ("resize_and_crop", "none")


def preprocess(image: np.ndarray, mode: str = "resize_and_crop", size: int = 256) -> torch.Tensor:
    """uint8 [H, W, 3] -> [3, H', W'] in [-1, 1]. resize_and_crop (official test default): squash to size x size
    with PIL bicubic (the crop is then a no-op); none: each side rounded to the nearest multiple of 4 (bicubic,
    only when needed)."""
    if mode not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {mode!r}")
    im = Image.fromarray(image)
    target = (size, size) if mode == "resize_and_crop" else \
        tuple(max(4, int(round(side / 4)) * 4) for side in im.size)
    if im.size != target:
        im = im.resize(target, Image.BICUBIC)
    v = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return v * 2 - 1


def to_uint8_truncated(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] as upstream's tensor2im: (x + 1) / 2 * 255 truncated toward
    zero (no rounding, no clamping beyond what tanh already guarantees)."""
    return ((x.detach().float().cpu().permute(0, 2, 3, 1).numpy() + 1) / 2 * 255).astype(np.uint8)


# ----- the translate stage -------------------------------------------------------------------------------------------
THUMB = 64  # preview tiles


@dataclass(frozen=True)
class TranslateConfig:
    # junyanz generator checkpoint: CycleGAN ResNet (latest_net_G_A.pth: A->B) or pix2pix U-Net (latest_net_G.pth)
    translator: str = ""
    column: str = ""  # image column of a stage output to translate (aligned of ingest, image_png of edit, ...)
    # official test pre-processing: squash to load_size (resize_and_crop), or sides rounded to multiples of 4 (none)
    preprocess: Literal["resize_and_crop", "none"] = "resize_and_crop"
    load_size: int = 256  # resize_and_crop size in px
    # BatchNorm with each image's own statistics, as the official test.py without --eval (pix2pix; off: --eval)
    batch_stats: bool = False
    dropout: bool = False  # keep dropout active (the official test.py without --eval), masks seeded per row
    seed: int = 0  # combined with each key for the dropout masks


class TranslateStage(Stage):
    """Photos, or an image column of a stage output, through a CycleGAN or pix2pix generator: `translated_png`."""

    name = "translate"
    Config = TranslateConfig
    required = ("translator",)
    help = "CycleGAN or pix2pix translation of photos or of a stage's images"
    examples = ("latentray translate --input photos/ --output out/zebra --translator latest_net_G_A.pth",
                "latentray translate --input out/aligned --column aligned --output out/b --translator "
                "latest_net_G.pth --batch-stats --dropout")
    photos = "decode"

    def prepare(self, context: Context) -> Plan:
        from models.checkpoints import file_sha256
        from models.translation import load_translator

        cfg = self.config
        G = load_translator(cfg.translator, batch_stats=cfg.batch_stats, dropout=cfg.dropout)  # fails before rows
        if context.upstream is not None and not cfg.column:
            raise ValueError("the input is a stage output: name its image column with --column (e.g. aligned, "
                             "image_png)")
        found = (context.columns or {}).get(cfg.column)  # pixels (uint8 [H, W, 3]) or encoded images: both decode
        image = Column("image", found.dtype if found is not None else "bytes", None)
        return Plan(outputs=(Column("translated_png", "bytes"), image_column("original", THUMB, stored=False),
                             image_column("recon_translated", THUMB, stored=False)),
                    inputs=(image,), resources=Resources(num_cpus=1, num_gpus=1),
                    previews=("original", "recon_translated"), rename={cfg.column: "image"} if cfg.column else {},
                    checkpoints={"translator": file_sha256(cfg.translator)},
                    fingerprint={"network": {"kind": G.kind, **G.config}})

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from models.translation import load_translator
        from ops.stage import resolve_device

        super().setup(plan, device)
        cfg = self.config
        self.device = resolve_device(device)
        self.G = load_translator(cfg.translator, self.device, batch_stats=cfg.batch_stats, dropout=cfg.dropout)

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from models.translation import translate
        from ops.images import decode_cell, encode_png, thumbnail
        from ops.invert import key_generator

        out = blank(self.plan.outputs, len(batch["key"]))
        tensors = []
        for i, cell in enumerate(batch["image"]):
            image = decode_cell(cell)
            out["original"][i] = thumbnail(image, THUMB)
            tensors.append(preprocess(image, self.config.preprocess, self.config.load_size))
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):  # `--preprocess none` keeps sizes: each size runs as its own batch
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for rows in by_shape.values():
            generators = [key_generator(self.config.seed, f"dropout:{batch['key'][i]}") for i in rows]
            with torch.no_grad():
                x = torch.stack([tensors[i] for i in rows]).to(self.device)
                images = to_uint8_truncated(translate(self.G, x, generators))
            for i, image in zip(rows, images):
                out["translated_png"][i], out["recon_translated"][i] = encode_png(image), thumbnail(image, THUMB)
        return out
