"""The invert stage (stage contract, ops/stage.py): images -> latents of a pretrained StyleGAN2, per space.

Input columns: key, status, error_code, error, image (uint8 [B, R, R, 3]; R above the generator's resolution is
Lanczos-reduced to it, as FFHQ's 1024 crops are for smaller models).
Output: the same rows in the same order plus, per space, `recon_<space>` (uint8 previews, not stored), the latent
columns and `<space>_{mse,psnr,lpips,steps,seconds}` of DESIGN §4, `<space>_start` (how the optimisation started:
`w_avg`, or the encoder and the first 12 hex digits of its file's sha256), and `lpips_net`, `lpips_backbone` (`none`
when LPIPS is off). A non-finite latent fails its row with `nonfinite_latent`.

With `--encoder E.pt` (pSp/e4e, official or from `latentray train-encoder`) every space starts from the encoder's
W+ and `--steps K` refines it (default: the hybrid recipe's 200 steps; 0: the encoder's answer alone).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ops.invert import InvertConfig
from ops import latents
from ops.latents import SPACE_COLUMNS, generator_path
from ops.stage import Column, Context, Plan, Resources, Stage, image_column, objects

METRICS = ("mse", "psnr", "lpips", "steps", "seconds")
GPU_PROBE_LIMIT = 64  # the largest inversion batch a GPU actor probes for (Ray batches above it run in chunks)


@dataclass(frozen=True)
class InvertStageConfig:
    generator: str = ""  # checkpoint path or URI (rosinality .pt, NVIDIA .pkl, latentray .pt); "": the bundled one
    spaces: tuple[str, ...] = ("wplus",)  # any of w, wplus, s, fwplus: one column group each
    # pSp/e4e W+ encoder (official checkpoint or `latentray train-encoder`'s encoder.pt): every space starts from
    # its W+ and `steps` refines it (None: the hybrid recipe's 200; 0: encoder only)
    encoder: str = ""
    basecode_encoder: str = ""  # BDInvert base-code encoder for fwplus starts ("": G.base_code of the start W+)
    # input column of known-pixel masks (uint8, 255 known), when present: losses and metrics see only those pixels
    # and the reconstruction fills the rest (Image2StyleGAN++ inpainting); ingest --masks writes `mask`
    mask_column: str = "mask"
    # Noise maps are not stored, so the stage keeps the generator's constant noise (optimize_noise False) and a
    # stored latent alone reproduces its row's reconstruction and metrics.
    invert: InvertConfig = InvertConfig(optimize_noise=False)


class InvertStage(Stage):
    name = "invert"
    Config = InvertStageConfig
    help = "ingest + align + invert images into latents (Parquet)"
    examples = ("latentray invert --input photos/ --output out/latents --generator ffhq.pt --spaces wplus,fwplus",
                "latentray invert --input s3://bucket/aligned --output s3://bucket/latents --set steps=300")
    photos = "ingest"

    def __init__(self, config: InvertStageConfig | None = None):
        super().__init__(config)
        unknown = set(self.config.spaces) - set(SPACE_COLUMNS)
        if unknown or not self.config.spaces:
            raise ValueError(f"spaces must be a non-empty subset of {sorted(SPACE_COLUMNS)}, got "
                             f"{self.config.spaces}")
        for space in self.config.spaces:  # a bad recipe (unknown space, no image loss) fails before any row
            dataclasses.replace(self.config.invert, space=space).resolved()
        self.G = None

    def lpips_backbone(self) -> str:
        return "none" if self.config.invert.lpips_weight == 0 else self.config.invert.lpips_backbone

    def prepare(self, context: Context) -> Plan:
        from models.checkpoints import file_sha256, load_generator

        cfg = self.config
        G = load_generator(generator_path(cfg.generator))
        if "fwplus" in cfg.spaces:
            G._check_level(cfg.invert.base_level)
        upstream_size = ((context.upstream or {}).get("config") or {}).get("size")
        if upstream_size is not None and upstream_size < G.size:
            raise ValueError(f"the input was aligned at {upstream_size} px, below the generator's {G.size}; "
                             f"ingest it again with --size {G.size}")
        checkpoints = {"generator": G.generator_id}
        if cfg.invert.lpips_weight != 0 and cfg.invert.lpips_backbone == "imagenet":  # refused here when missing
            from models.perceptual import backbone_bytes

            checkpoints["lpips_backbone"] = backbone_bytes(cfg.invert.lpips_net)[1]
        if cfg.basecode_encoder and "fwplus" in cfg.spaces:
            checkpoints["basecode_encoder"] = file_sha256(cfg.basecode_encoder)
        if cfg.encoder:
            from models.encoders import load_style_encoder

            check_encoder_fits(load_style_encoder(cfg.encoder), G, cfg.encoder)
            checkpoints["encoder"] = file_sha256(cfg.encoder)
        starts = self.starts(checkpoints)
        outputs = (*latents.columns(G, cfg.spaces, cfg.invert.base_level),
                   *(Column(f"{s}_{m}", "float32") for s in cfg.spaces for m in METRICS),
                   *(Column(f"{s}_start", "str", fill=starts[s]) for s in cfg.spaces),
                   *(image_column(f"recon_{s}", G.size, stored=False) for s in cfg.spaces),
                   Column("lpips_net", "str", fill=cfg.invert.lpips_net),
                   Column("lpips_backbone", "str", fill=self.lpips_backbone()))
        masked = bool(cfg.mask_column and context.columns and cfg.mask_column in context.columns)
        inputs = (image_column("image"), *((Column(cfg.mask_column, "uint8", None),) if masked else ()))
        if masked:  # previews show what the inversion saw: the target with its unknown pixels grey
            outputs += (image_column("masked", G.size, stored=False),)
        return Plan(outputs=outputs, inputs=inputs, carry=True, resources=Resources(num_cpus=1, num_gpus=1),
                    image_size=G.size,
                    previews=("original", "image", *(("masked",) if masked else ()),
                              *(f"recon_{s}" for s in cfg.spaces)),
                    rename={"aligned": "image"}, checkpoints=checkpoints,
                    metadata=latents.schema_metadata(G, cfg.generator, cfg.spaces, cfg.invert.base_level))

    def starts(self, checkpoints: dict) -> dict[str, str]:
        """Per space, how its optimisation starts (recorded in every row)."""
        encoder = f"encoder {checkpoints['encoder'][:12]}" if "encoder" in checkpoints else "w_avg"
        base = (f"basecode_encoder {checkpoints['basecode_encoder'][:12]}" if "basecode_encoder" in checkpoints
                else f"base_code({'encoder' if 'encoder' in checkpoints else 'w_avg'})")
        return {s: f"{encoder}, F from {base}" if s == "fwplus" else encoder for s in self.config.spaces}

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from ops.invert import Inverter

        super().setup(plan, device)
        cfg = self.config
        self.G = latents.generator_on(cfg.generator, device)
        base_encoder = wplus_encoder = None
        if cfg.basecode_encoder and "fwplus" in cfg.spaces:
            from models.encoders import load_basecode_encoder

            base_encoder = load_basecode_encoder(cfg.basecode_encoder, generator=self.G).to(self.G.device)
        if cfg.encoder:
            from models.encoders import load_style_encoder

            wplus_encoder = load_style_encoder(cfg.encoder).to(self.G.device)
        self.start = self.starts(plan.checkpoints)
        self.inverters = {space: Inverter(self.G, dataclasses.replace(cfg.invert, space=space),
                                          encoder=[wplus_encoder, base_encoder if space == "fwplus" else None])
                          for space in cfg.spaces}
        if self.G.device.type == "cuda":  # the largest batch that fits this GPU, by a one-step probe
            from ops.stage import largest_fitting_batch

            self.chunk = largest_fitting_batch(self.probe, GPU_PROBE_LIMIT)

    def probe(self, n: int) -> None:
        """One step of every space's inversion on n blank images (raises out-of-memory when n does not fit)."""
        import torch

        images = torch.zeros(n, 3, self.G.size, self.G.size, device=self.G.device)
        try:
            for inverter in self.inverters.values():
                inverter.run(images, [f"probe{i}" for i in range(n)], steps=1)
        finally:
            torch.cuda.empty_cache()

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ops.images import resize_square, to_tensor, to_uint8

        images = to_tensor(resize_square(np.stack(batch["image"]), self.G.size))
        masks = None
        if self.config.mask_column and self.config.mask_column in batch:
            known = np.repeat(np.stack(batch[self.config.mask_column])[..., None], 3, axis=3)
            masks = torch.from_numpy(resize_square(known, self.G.size)[..., :1].astype(np.float32) / 255)
            masks = masks.permute(0, 3, 1, 2)
        keys = [str(k) for k in batch["key"]]
        out = {"lpips_backbone": objects([next(iter(self.inverters.values())).lpips_backbone] * len(keys))}
        if masks is not None:
            known = masks.permute(0, 2, 3, 1).numpy()
            out["masked"] = (to_uint8(images) * known + 128 * (1 - known)).round().astype(np.uint8)
        for space, inverter in self.inverters.items():
            result = inverter.run(images, keys, masks=masks)
            for column, value in latent_values(space, result).items():
                out[column] = value.cpu().numpy()
            for m in METRICS:
                out[f"{space}_{m}"] = result[m].float().cpu().numpy()
            out[f"{space}_start"] = objects([self.start[space]] * len(keys))
            out[f"recon_{space}"] = to_uint8(result["recon"])
        finite = np.ones(len(keys), dtype=bool)
        for space in self.config.spaces:
            for column in SPACE_COLUMNS[space]:
                finite &= np.isfinite(out[column].reshape(len(keys), -1)).all(axis=1)
        out["error_code"] = objects(["" if ok else "nonfinite_latent" for ok in finite])
        out["error"] = objects(["" if ok else "non-finite values in the latents" for ok in finite])
        return out


def latent_values(space: str, result: dict):
    """The stored columns of one space from an inversion result."""
    if space == "w":
        return {"w": result["wplus"][:, 0]}
    if space == "wplus":
        return {"wplus": result["wplus"]}
    if space == "s":
        return {"styles": result["styles"]}
    return {"fwplus_wplus": result["wplus"], "fwplus_base_code": result["base_code"]}


def check_encoder_fits(encoder, G, path: str) -> None:
    """An encoder whose W+ does not fit the generator, or one trained for another generator, is refused."""
    from models.checkpoints import CheckpointError

    if (encoder.n_styles, encoder.style_dim) != (G.n_latent, G.style_dim):
        raise CheckpointError(f"{path}: the encoder gives W+ [{encoder.n_styles}, {encoder.style_dim}], the generator "
                              f"needs [{G.n_latent}, {G.style_dim}]")
    if encoder.generator_id is not None and encoder.generator_id != G.generator_id:
        raise CheckpointError(f"{path}: this encoder was trained for generator {encoder.generator_id[:12]}, not "
                              f"{G.generator_id[:12]}")
