"""The invert stage as plain Python (stage contract, DESIGN §2): config, setup() once per worker, process(batch).

Input columns: key, status, error_code, error, image (uint8 [B, R, R, 3] at the generator's resolution).
Output: the same rows in the same order plus, per space, `recon_<space>` (uint8 previews, not stored), the latent
columns and `<space>_{mse,psnr,lpips,steps,seconds}` of DESIGN §4, and `lpips_net`, `lpips_backbone`. Rows already
failed pass through untouched (their tensors NaN); a batch whose inversion raises fails its rows with `invert_error`,
a non-finite latent with `nonfinite_latent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ops.images import to_uint8
from ops.invert import InvertConfig, Inverter

LATENT_COLUMNS = {"w": ("w",), "wplus": ("wplus",), "s": ("styles",), "fwplus": ("fwplus_wplus", "fwplus_base_code")}
METRICS = ("mse", "psnr", "lpips", "steps", "seconds")


@dataclass(frozen=True)
class InvertStageConfig:
    generator: str = ""  # checkpoint path or URI; "" = the bundled default generator
    spaces: tuple[str, ...] = ("wplus",)  # any of w, wplus, s, fwplus; one column group each
    steps: int | None = None  # None = each space's default
    lpips_net: str = "vgg"  # vgg | alex
    lpips_backbone: str = "imagenet"  # imagenet | random (explicit opt-in, recorded per row)
    base_level: int = 16  # fwplus base-code resolution
    basecode_encoder: str = ""  # BDInvert encoder checkpoint for fwplus starts ("" = start from G.base_code(w_avg))
    seed: int = 0  # per-row randomness = f(seed, key)
    # Noise maps are not stored, so by default they stay the generator's constant buffers and a stored latent alone
    # reproduces its row's reconstruction and metrics (True: the projector's per-image noise optimisation).
    optimize_noise: bool = False
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: str | None = None  # derived statistics (P-space) cached by generator id
    extra: dict = field(default_factory=dict)  # further InvertConfig fields, e.g. {"lr": 0.05}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class InvertStage:
    name = "invert"
    batch_size = 8

    def __init__(self, config: InvertStageConfig):
        unknown = set(config.spaces) - set(LATENT_COLUMNS)
        if unknown or not config.spaces:
            raise ValueError(f"spaces must be a non-empty subset of {sorted(LATENT_COLUMNS)}, got {config.spaces}")
        self.config = config
        self.G = None

    def setup(self) -> None:
        from models.checkpoints import load_generator
        from models.default_generator import DEFAULT_GENERATOR_PATH

        cfg = self.config
        self.G = load_generator(cfg.generator or str(DEFAULT_GENERATOR_PATH)).to(resolve_device(cfg.device))
        encoder = None
        if cfg.basecode_encoder and "fwplus" in cfg.spaces:
            from models.encoders import load_basecode_encoder

            encoder = load_basecode_encoder(cfg.basecode_encoder, generator=self.G).to(self.G.input.input.device)
        self.inverters = {}
        for space in cfg.spaces:
            icfg = InvertConfig(space=space, steps=cfg.steps, lpips_net=cfg.lpips_net, lpips_backbone=cfg.lpips_backbone,
                                base_level=cfg.base_level, seed=cfg.seed, cache_dir=cfg.cache_dir,
                                optimize_noise=cfg.optimize_noise, **cfg.extra)
            self.inverters[space] = Inverter(self.G, icfg, encoder=encoder if space == "fwplus" else None)

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        G = self.G
        shapes = {"w": (G.style_dim,), "wplus": (G.n_latent, G.style_dim), "styles": (G.n_styles,),
                  "fwplus_wplus": (G.n_latent, G.style_dim),
                  "fwplus_base_code": (G.channels[self.config.base_level], self.config.base_level,
                                       self.config.base_level)}
        return {c: shapes[c] for space in self.config.spaces for c in LATENT_COLUMNS[space]}

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        out = {k: np.array(v, copy=True) for k, v in batch.items()}
        for column, shape in self.output_shapes().items():
            out[column] = np.full((n, *shape), np.nan, dtype=np.float32)
        for space in self.config.spaces:
            for m in METRICS:
                out[f"{space}_{m}"] = np.full(n, np.nan, dtype=np.float32)
        for space in self.config.spaces:  # for previews; not stored (pipelines/io.py NOT_STORED)
            out[f"recon_{space}"] = np.zeros((n, self.G.size, self.G.size, 3), dtype=np.uint8)
        out["lpips_net"] = np.full(n, self.config.lpips_net, dtype=object)
        out["lpips_backbone"] = np.full(n, next(iter(self.inverters.values())).perceptual.backbone, dtype=object)
        ok = np.flatnonzero(out["status"] == "ok")
        if ok.size:
            self._invert_rows(out, ok)
        return out

    def _invert_rows(self, out: dict[str, np.ndarray], rows: np.ndarray) -> None:
        images = torch.from_numpy(np.stack(out["image"][rows]).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
        keys = [str(k) for k in out["key"][rows]]
        for space, inverter in self.inverters.items():
            try:
                result = inverter.run(images, keys)
            except Exception as exc:  # a batch-level failure fails its rows, never the job
                self._fail(out, rows, "invert_error", f"{space} inversion failed: {type(exc).__name__}: {exc}")
                return
            for column, value in latent_values(space, result).items():
                out[column][rows] = value.cpu().numpy()
            for m in METRICS:
                out[f"{space}_{m}"][rows] = result[m].float().cpu().numpy()
            out[f"recon_{space}"][rows] = to_uint8(result["recon"])
        for column in self.output_shapes():
            values = out[column][rows].reshape(len(rows), -1)
            bad = rows[~np.isfinite(values).all(axis=1) & (out["status"][rows] == "ok")]
            self._fail(out, bad, "nonfinite_latent", f"non-finite values in {column}")

    def _fail(self, out, rows, code, message) -> None:
        """Mark rows failed and blank everything this stage wrote for them (NaN, never null)."""
        out["status"][rows] = "failed"
        out["error_code"][rows] = code
        out["error"][rows] = message
        for column in [*self.output_shapes(), *(f"{s}_{m}" for s in self.config.spaces for m in METRICS)]:
            out[column][rows] = np.nan


def latent_values(space: str, result: dict) -> dict[str, torch.Tensor]:
    """The stored columns of one space from an inversion result."""
    if space == "w":
        return {"w": result["wplus"][:, 0]}
    if space == "wplus":
        return {"wplus": result["wplus"]}
    if space == "s":
        return {"styles": result["styles"]}
    return {"fwplus_wplus": result["wplus"], "fwplus_base_code": result["base_code"]}
