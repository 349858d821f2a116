"""DualStyleGAN exemplar style transfer (spec/dualstylegan.md §3.2, style_transfer.py). No Ray."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.stylegan2 import per_sample
from ops.destylize import map_zplus
from ops.stage import Column, Context, Plan, Resources, Stage, blank, image_column, objects

DEFAULT_WEIGHTS = (0.75,) * 7 + (1.0,) * 11  # structure 0.75 (rows 0-6), colour 1 (rows 7-17); cut to n_latent


@torch.no_grad()
def stylize(model, encoder, faces: torch.Tensor, exstyle: torch.Tensor, weights, truncation: float = 0.75,
            preserve_color: bool = False) -> torch.Tensor:
    """faces [B, 3, 256, 256] in [-1, 1], one exemplar's Z+ code [1 or B, L, D] -> images [B, 3, R, R] clamped to
    [-1, 1]: G([E(face)], map(exstyle), z_plus_latent, truncation toward 0, fixed noise). `preserve_color` takes the
    colour rows (7-) of the extrinsic code from the face, before mapping."""
    content = per_sample(encoder, faces)  # Z+
    ex_z = exstyle.to(content).expand(len(faces), -1, -1).clone()
    if preserve_color:
        ex_z[:, 7:] = content[:, 7:]
    out, _ = model([content], map_zplus(model.generator, ex_z), z_plus_latent=True, truncation=truncation,
                   truncation_latent=0, use_res=True, randomize_noise=False, interp_weights=list(weights))
    return out.clamp(-1, 1)


# ----- the stylize stage ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StylizeConfig:
    dualstylegan: str = ""  # DualStyleGAN generator.pt
    encoder: str = ""  # Z+ pSp encoder (DualStyleGAN's encoder.pt)
    exstyles: str = ""  # exstyle_code.npy (or refined_exstyle_code.npy)
    styles: tuple[str, ...] = ("0",)  # exemplar names, or positions in the exstyles file
    weights: tuple[float, ...] | None = None  # one per W+ row (None: 0.75 for rows 0-6, structure; 1 after, colour)
    truncation: float = 0.75  # toward 0
    preserve_color: bool = False  # keep the face's colours (rows 7- of the extrinsic code come from it)


def resolve_styles(codes: dict, style_ids) -> dict:
    """Exemplars by name or by position in the file (style_transfer.py's --style_id k = k-th entry)."""
    names = list(codes)
    chosen = {}
    for sid in style_ids:
        name = names[int(sid)] if isinstance(sid, int) or str(sid).isdigit() else str(sid)
        if name not in codes:
            raise ValueError(f"exemplar {sid!r} not in the exstyle codes ({len(names)}: {names[:5]}...)")
        chosen[name] = codes[name]
    return chosen


def load_stylize_models(cfg: StylizeConfig, device="cpu"):
    """(DualStyleGAN, Z+ encoder, {exemplar name: code}, weights), checked to fit together."""
    from models.dualstylegan import load_dualstylegan, load_exstyle_codes
    from models.encoders import load_style_encoder

    model, encoder = load_dualstylegan(cfg.dualstylegan, device), load_style_encoder(cfg.encoder).to(device)
    n = model.n_latent
    weights = tuple(cfg.weights) if cfg.weights is not None else DEFAULT_WEIGHTS[:n]
    if len(weights) != n:
        raise ValueError(f"weights need {n} values (one per W+ row: 0-6 structure, 7- colour), got {len(weights)}")
    if encoder.n_styles != n or encoder.styles[0].cout != model.generator.style_dim:
        raise ValueError(f"encoder emits {encoder.n_styles}x{encoder.styles[0].cout}, DualStyleGAN needs {n}x"
                         f"{model.generator.style_dim}")
    return model, encoder, resolve_styles(load_exstyle_codes(cfg.exstyles), cfg.styles), weights


class StylizeStage(Stage):
    """Every face once per exemplar: key `<key>|<style>`, `style`, `image_png` (the official call's output)."""

    name = "stylize"
    Config = StylizeConfig
    required = ("dualstylegan", "encoder", "exstyles")
    help = "DualStyleGAN exemplar style transfer onto faces"
    examples = ("latentray stylize --input faces/ --output out/cartoon --dualstylegan generator.pt --encoder "
                "encoder.pt --exstyles exstyle_code.npy --styles 53,26",
                "latentray stylize --input faces/ --output out/cartoon --dualstylegan generator.pt --encoder "
                "encoder.pt --exstyles exstyle_code.npy --preserve-color")
    photos = "ingest"
    reads_outputs = False

    def prepare(self, context: Context) -> Plan:
        from models.checkpoints import file_sha256

        cfg = self.config
        model, _, styles, _ = load_stylize_models(cfg)
        names, size = tuple(styles), model.generator.size
        return Plan(outputs=(Column("image_png", "bytes"), image_column("recon_stylized", size, stored=False)),
                    inputs=(image_column("image", 256),), resources=Resources(num_cpus=1, num_gpus=1),
                    batch_size=4, image_size=256, variants=names, labels=(Column("style", "str"),),
                    previews=("original", "recon_stylized"), summary=("source_key", "style", "status", "image_png"),
                    checkpoints={c: file_sha256(getattr(cfg, c)) for c in ("dualstylegan", "encoder", "exstyles")},
                    fingerprint={"styles": list(names)})

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from ops.stage import resolve_device

        super().setup(plan, device)
        self.model, self.encoder, self.codes, self.weights = load_stylize_models(self.config, resolve_device(device))

    def variant_columns(self, variant: np.ndarray) -> dict[str, np.ndarray]:
        return {"style": objects([self.plan.variants[v] for v in variant])}

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ops.images import encode_png, to_tensor, to_uint8

        out = blank(self.plan.outputs, len(batch["key"]))
        device = self.model.generator.device
        for v in np.unique(batch["variant"]):
            rows = np.flatnonzero(batch["variant"] == v)
            code = torch.from_numpy(self.codes[self.plan.variants[v]])
            pixels = to_uint8(stylize(self.model, self.encoder, to_tensor(np.stack(batch["image"][rows]), device),
                                      code, self.weights, self.config.truncation, self.config.preserve_color))
            out["recon_stylized"][rows] = pixels
            out["image_png"][rows] = objects([encode_png(p) for p in pixels])
        return out

    def summary_previews(self, table: dict) -> dict[str, np.ndarray]:
        """styles.png: rows = the first faces, columns = exemplars."""
        from ops.images import png_grid

        cells = {(f, s): png for f, s, st, png in zip(table["source_key"], table["style"], table["status"],
                                                      table["image_png"]) if st == "ok"}
        grid = png_grid(cells, sorted({f for f, _ in cells}), list(self.plan.variants))
        return {"styles": grid} if grid is not None else {}
