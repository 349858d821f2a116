"""The invert stage (stage contract, ops/stage.py): images -> latents of a pretrained StyleGAN2, per space.

Input columns: key, status, error_code, error, image (uint8 [B, R, R, 3]; R above the generator's resolution is
Lanczos-reduced to it, as FFHQ's 1024 crops are for smaller models).
Output: the same rows in the same order plus, per space, `recon_<space>` (uint8 previews, not stored), the latent
columns and `<space>_{mse,psnr,lpips,steps,seconds}` of DESIGN §4, and `lpips_net`, `lpips_backbone` (`none` when
LPIPS is off). A non-finite latent fails its row with `nonfinite_latent`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ops.invert import InvertConfig
from ops.stage import Context, Provenance, Resources, Stage, blank_like, objects

LATENT_COLUMNS = {"w": ("w",), "wplus": ("wplus",), "s": ("styles",), "fwplus": ("fwplus_wplus", "fwplus_base_code")}
METRICS = ("mse", "psnr", "lpips", "steps", "seconds")
GPU_PROBE_LIMIT = 64  # the largest inversion batch a GPU actor probes for (Ray batches above it run in chunks)


@dataclass(frozen=True)
class InvertStageConfig:
    generator: str = ""  # checkpoint path or URI (rosinality .pt, NVIDIA .pkl, latentray .pt); "": the bundled one
    spaces: tuple[str, ...] = ("wplus",)  # any of w, wplus, s, fwplus: one column group each
    basecode_encoder: str = ""  # BDInvert base-code encoder for fwplus starts ("": G.base_code(w_avg))
    # input column of known-pixel masks (uint8, 255 known), when present: losses and metrics see only those pixels
    # and the reconstruction fills the rest (Image2StyleGAN++ inpainting); ingest --masks writes `mask`
    mask_column: str = "mask"
    # Noise maps are not stored, so the stage keeps the generator's constant noise (optimize_noise False) and a
    # stored latent alone reproduces its row's reconstruction and metrics.
    invert: InvertConfig = InvertConfig(optimize_noise=False)


def generator_path(path: str) -> str:
    from models.default_generator import DEFAULT_GENERATOR_PATH

    return path or str(DEFAULT_GENERATOR_PATH)


def generator_on(path: str, device: str = "cpu"):
    """The generator at `path` ("": the bundled one), frozen, on `device` (auto: cuda when this process sees one)."""
    from models.checkpoints import load_generator
    from ops.stage import resolve_device

    return load_generator(generator_path(path)).to(resolve_device(device))


def latent_shapes(G, spaces, base_level: int) -> dict[str, tuple[int, ...]]:
    """The stored latent columns of these spaces and their per-row shapes."""
    shapes = {"w": (G.style_dim,), "wplus": (G.n_latent, G.style_dim), "styles": (G.n_styles,),
              "fwplus_wplus": (G.n_latent, G.style_dim),
              "fwplus_base_code": (G.channels[base_level], base_level, base_level)}
    return {c: shapes[c] for space in spaces for c in LATENT_COLUMNS[space]}


def schema_metadata(G, generator: str, spaces, base_level: int) -> dict:
    """What a reader needs to interpret the latent columns (Parquet schema metadata, run.json `metadata`)."""
    return {"generator_id": G.generator_id, "generator": generator, "architecture": G.architecture(),
            "spaces": list(spaces), "base_level": base_level,
            "style_layers": [dataclasses.asdict(layer) for layer in G.style_layers]}


class InvertStage(Stage):
    name = "invert"
    Config = InvertStageConfig
    resources = Resources(num_cpus=1, num_gpus=1)
    batch_size = 8
    uses_models = True

    def __init__(self, config: InvertStageConfig | None = None):
        super().__init__(config)
        unknown = set(self.config.spaces) - set(LATENT_COLUMNS)
        if unknown or not self.config.spaces:
            raise ValueError(f"spaces must be a non-empty subset of {sorted(LATENT_COLUMNS)}, got "
                             f"{self.config.spaces}")
        for space in self.config.spaces:  # a bad recipe (unknown space, no image loss) fails before any row
            dataclasses.replace(self.config.invert, space=space).resolved()
        self.G = None

    def prepare(self, context: Context) -> Provenance:
        from models.checkpoints import file_sha256, load_generator

        cfg = self.config
        G = load_generator(generator_path(cfg.generator))
        if "fwplus" in cfg.spaces:
            G._check_level(cfg.invert.base_level)
        upstream_size = ((context.upstream or {}).get("config") or {}).get("size")
        if upstream_size is not None and upstream_size < G.size:
            raise ValueError(f"the input was aligned at {upstream_size} px, below the generator's {G.size}; "
                             f"ingest it again with --size {G.size}")
        self.image_size = G.size
        self._shapes = latent_shapes(G, cfg.spaces, cfg.invert.base_level)
        checkpoints = {"generator": G.generator_id}
        if cfg.basecode_encoder and "fwplus" in cfg.spaces:
            checkpoints["basecode_encoder"] = file_sha256(cfg.basecode_encoder)
        return Provenance(checkpoints=checkpoints,
                          metadata=schema_metadata(G, cfg.generator, cfg.spaces, cfg.invert.base_level))

    def setup(self, device: str = "cpu") -> None:
        from ops.invert import Inverter

        cfg = self.config
        self.G = generator_on(cfg.generator, device)
        self.image_size = self.G.size
        self._shapes = latent_shapes(self.G, cfg.spaces, cfg.invert.base_level)
        encoder = None
        if cfg.basecode_encoder and "fwplus" in cfg.spaces:
            from models.encoders import load_basecode_encoder

            encoder = load_basecode_encoder(cfg.basecode_encoder, generator=self.G).to(self.G.input.input.device)
        self.inverters = {space: Inverter(self.G, dataclasses.replace(cfg.invert, space=space),
                                          encoder=encoder if space == "fwplus" else None)
                          for space in cfg.spaces}
        if self.G.input.input.device.type == "cuda":  # the largest batch that fits this GPU, by a one-step probe
            from ops.stage import largest_fitting_batch

            self.chunk = largest_fitting_batch(self.probe, GPU_PROBE_LIMIT)

    def probe(self, n: int) -> None:
        """One step of every space's inversion on n blank images (raises out-of-memory when n does not fit)."""
        import torch

        images = torch.zeros(n, 3, self.G.size, self.G.size, device=self.G.input.input.device)
        try:
            for inverter in self.inverters.values():
                inverter.run(images, [f"probe{i}" for i in range(n)], steps=1)
        finally:
            torch.cuda.empty_cache()

    def preview_columns(self) -> tuple[str, ...]:
        return ("original", "image", *(f"recon_{s}" for s in self.config.spaces))

    def blank(self, n: int) -> dict[str, np.ndarray]:
        size = self.image_size
        out = blank_like(self._shapes, n)
        out.update(blank_like({f"{s}_{m}": () for s in self.config.spaces for m in METRICS}, n))
        out.update({f"recon_{s}": np.zeros((n, size, size, 3), np.uint8) for s in self.config.spaces})
        out["lpips_net"] = objects([self.config.invert.lpips_net] * n)
        out["lpips_backbone"] = objects([self.lpips_backbone()] * n)
        return out

    def lpips_backbone(self) -> str:
        inverters = getattr(self, "inverters", None)
        if inverters:
            return next(iter(inverters.values())).lpips_backbone
        return "none" if self.config.invert.lpips_weight == 0 else self.config.invert.lpips_backbone

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ops.images import resize_square, to_uint8

        pixels = resize_square(np.stack(batch["image"]), self.G.size)
        images = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
        masks = None
        if self.config.mask_column and self.config.mask_column in batch:
            known = np.repeat(np.stack(batch[self.config.mask_column])[..., None], 3, axis=3)
            masks = torch.from_numpy(resize_square(known, self.G.size)[..., :1].astype(np.float32) / 255)
            masks = masks.permute(0, 3, 1, 2)
        keys = [str(k) for k in batch["key"]]
        out = {}
        for space, inverter in self.inverters.items():
            result = inverter.run(images, keys, masks=masks)
            for column, value in latent_values(space, result).items():
                out[column] = value.cpu().numpy()
            for m in METRICS:
                out[f"{space}_{m}"] = result[m].float().cpu().numpy()
            out[f"recon_{space}"] = to_uint8(result["recon"])
        finite = np.ones(len(keys), dtype=bool)
        for column in self._shapes:
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


def latent_source(upstream: dict | None, stage: str) -> dict:
    """What a stage reading latents needs from their run.json: generator path and id, spaces, base level."""
    if not upstream or upstream.get("stage") not in ("invert", "import"):
        found = (upstream or {}).get("stage", "no run.json")
        raise ValueError(f"{stage} reads latents: the output of `latentray invert` or `import` (the input is: "
                         f"{found})")
    meta = upstream["metadata"]
    return {"generator": meta["generator"], "generator_id": meta["generator_id"], "spaces": tuple(meta["spaces"]),
            "base_level": meta["base_level"]}


def load_checked_generator(path: str, expected_id: str):
    """The generator latents were made with (or the one given, which must be the same file)."""
    from models.checkpoints import load_generator

    G = load_generator(generator_path(path))
    if G.generator_id != expected_id:
        raise ValueError(f"generator {generator_path(path)} (id {G.generator_id[:12]}) is not the one these latents "
                         f"were made with ({expected_id[:12]})")
    return G
