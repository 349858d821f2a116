"""Facial destylization (DualStyleGAN, spec/dualstylegan.md §2): artistic portraits -> realistic faces, as paired
data. Batched and per-image independent: every loss term is computed per image and summed, noise maps are drawn
per image from a generator seeded by (seed, key). No Ray.

1. z_e = E(S) in Z+ (the Z+ pSp encoder).
2. Optimise z (from z_e) and per-image noise maps on the fine-tuned generator g':
   LPIPS(P(g'(z)), S) + id_weight (1 - cos ID) + reg_weight mean_d std_l(z) + noise_weight noise_reg, Adam lr 0.1
   with the projector's ramps, 300 steps, noise re-normalised after each step.
3. Rows >= 8 of the optimised code are restored from z_e (colour).
4. x_d = g(z_hat) with truncation 0.7 toward 0 (the intermediate face); z_i = E(x_d) with rows >= 8 from z_e;
   x_r = g(z_i) (the final face). Same noise maps for both renders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

import torch
import torch.nn.functional as F

from models.perceptual import box_downsample
from models.stylegan2 import batch_invariance, per_sample
from ops.invert import key_generator, per_image_randn, projector_lr, shared_perceptual
from ops.regularizers import noise_regularizer, normalize_noise_
from ops.stage import Column, Context, Plan, Resources, Stage, image_column, objects

CROP = 256  # portraits enter the encoders at 256 x 256


@dataclass(frozen=True)
class DestylizeConfig:
    steps: int = 300  # Adam steps on the fine-tuned generator
    lr: float = 0.1  # peak learning rate (the projector's ramps)
    lpips_net: Literal["vgg", "alex"] = "vgg"  # LPIPS backbone network
    lpips_backbone: Literal["imagenet", "random"] = "imagenet"  # random: explicit offline opt-in, recorded per row
    id_weight: float = 0.1  # weight of 1 - cos(ID); forced to 0 (and recorded) when no identity model is given
    reg_weight: float = 1.0  # weight of the Z+ regulariser mean_d std_l(z)
    noise_weight: float = 1e5  # weight of the noise autocorrelation penalty
    truncation: float = 0.7  # toward 0, for the realistic faces (as every DualStyleGAN script)
    colour_row: int = 8  # W+ rows from this one on keep the encoder's code (colour; destylize.py uses 8)
    seed: int = 0  # combined with each key for the per-image noise maps
    # per-image computations so a pair never depends on its batch (None: on CPU only); False: the batched GPU path
    batch_invariant: bool | None = None


def map_zplus(G, z: torch.Tensor) -> torch.Tensor:
    """Z+ [B, L, D]: every row through the mapping network on its own -> W+ (image by image on CPU, so that the
    mapping GEMM's rounding does not depend on the batch; see per_sample)."""
    return per_sample(lambda t: G.mapping(t.reshape(-1, t.shape[-1])).reshape(t.shape), z)


def compare_size(G, portraits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Generator images are compared at min(G.size, 256): box-averaged down to 256 (the 4x4 block mean at 1024), or
    the 256-px portrait brought to a smaller generator's resolution."""
    size = min(G.size, portraits.shape[-1])
    target = portraits if portraits.shape[-1] == size else F.adaptive_avg_pool2d(portraits, size)
    return size, target


def initial_noise(G, keys: list[str], seed: int, device) -> list[torch.Tensor]:
    gens = [key_generator(seed, f"destylize-noise:{k}") for k in keys]
    return [per_image_randn(gens, b.shape[1:], device) for b in G.make_noise(1)]


def destylize(g, g_ft, encoder, portraits: torch.Tensor, keys: list[str], config: DestylizeConfig = DestylizeConfig(),
              identity=None) -> dict:
    """portraits [B, 3, 256, 256] in [-1, 1] -> codes z_e, z_hat, z_i [B, L, D], faces `intermediate` (from z_hat)
    and `face` (from z_i) [B, 3, R, R], per-image `lpips` (g'(z_hat) vs S), `id_sim` (face vs S, when an identity
    model is given), `id_weight` used, `seconds`."""
    with batch_invariance(config.batch_invariant):
        return _destylize(g, g_ft, encoder, portraits, keys, config, identity)


def _destylize(g, g_ft, encoder, portraits, keys, config, identity) -> dict:
    t0 = time.time()
    device = portraits.device
    id_weight = config.id_weight if identity is not None else 0.0
    perceptual = shared_perceptual(config.lpips_net, config.lpips_backbone)
    size, target = compare_size(g_ft, portraits)
    with torch.no_grad():  # image by image on CPU: conv rounding must not depend on the batch (see per_sample)
        z_e = per_sample(encoder, portraits)
        target_id = per_sample(identity, portraits) if id_weight else None
    z = z_e.clone().requires_grad_(True)
    noises = [n.requires_grad_(True) for n in initial_noise(g_ft, keys, config.seed, device)]
    opt = torch.optim.Adam([z, *noises], lr=config.lr)
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = projector_lr(config.lr, step, config.steps)
        image = box_downsample(g_ft.synthesis(map_zplus(g_ft, z), noise=noises), size)
        loss = perceptual(image, target) + config.reg_weight * z.std(dim=1).mean(dim=1) \
            + config.noise_weight * noise_regularizer(noises)
        if id_weight:
            loss = loss + id_weight * (1 - (per_sample(identity, image) * target_id).sum(dim=1))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # per-image losses summed: images never share a gradient
        opt.step()
        with torch.no_grad():
            normalize_noise_(noises)
    with torch.no_grad():
        z_hat = z.detach().clone()
        z_hat[:, config.colour_row:] = z_e[:, config.colour_row:]
        lpips = perceptual(box_downsample(g_ft.synthesis(map_zplus(g_ft, z_hat), noise=noises), size), target)
        intermediate = g.synthesis(config.truncation * map_zplus(g, z_hat), noise=noises)
        z_i = per_sample(encoder, intermediate)
        z_i[:, config.colour_row:] = z_e[:, config.colour_row:]
        face = g.synthesis(config.truncation * map_zplus(g, z_i), noise=noises)
        out = {"z_e": z_e, "z_hat": z_hat, "z_i": z_i, "intermediate": intermediate, "face": face, "lpips": lpips,
               "id_weight": id_weight, "seconds": torch.full((len(keys),), (time.time() - t0) / len(keys))}
        if identity is not None:
            out["id_sim"] = (per_sample(identity, face) * per_sample(identity, portraits)).sum(dim=1)
    return out


# ----- the destylize stage -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DestylizeStageConfig:
    finetuned: str = ""  # generator fine-tuned on the style (g'), rosinality .pt
    encoder: str = ""  # Z+ pSp encoder (DualStyleGAN's encoder.pt)
    generator: str = ""  # the original generator g ("": the bundled one)
    identity: str = ""  # ArcFace IR-SE50 (model_ir_se50.pth); "": the ID term is off (recorded as id_weight 0)
    destylize: DestylizeConfig = DestylizeConfig()


def load_destylize_models(cfg: DestylizeStageConfig, device="cpu"):
    """(g, g', Z+ encoder, identity or None), checked to fit together."""
    from models.checkpoints import load_generator
    from models.encoders import load_style_encoder
    from models.identity import load_arcface
    from ops.latents import generator_path

    g, g_ft = load_generator(generator_path(cfg.generator)).to(device), load_generator(cfg.finetuned).to(device)
    encoder = load_style_encoder(cfg.encoder).to(device)
    identity = load_arcface(cfg.identity, device) if cfg.identity else None
    if (g.size, g.style_dim, g.n_latent) != (g_ft.size, g_ft.style_dim, g_ft.n_latent) or \
            encoder.n_styles != g.n_latent or encoder.styles[0].cout != g.style_dim:
        raise ValueError(f"models do not fit together: generator {g.size}px/{g.n_latent}x{g.style_dim}, fine-tuned "
                         f"{g_ft.size}px/{g_ft.n_latent}x{g_ft.style_dim}, encoder {encoder.n_styles}x"
                         f"{encoder.styles[0].cout}")
    return g, g_ft, encoder, identity


class DestylizeStage(Stage):
    """Artistic portraits (aligned crops of 256 px) -> paired realistic faces: portrait/intermediate/face PNGs,
    z_e, z_hat, z_i, lpips, id_sim, id_weight."""

    name = "destylize"
    Config = DestylizeStageConfig
    required = ("finetuned", "encoder")
    help = "artistic portraits -> paired realistic faces (DualStyleGAN destylization)"
    examples = ("latentray destylize --input portraits/ --output out/pairs --finetuned g_ft.pt --encoder encoder.pt",
                "latentray destylize --input portraits/ --output out/pairs --finetuned g_ft.pt --encoder encoder.pt "
                "--identity model_ir_se50.pth --align none")
    photos = "ingest"
    reads_outputs = False

    def prepare(self, context: Context) -> Plan:
        from models.checkpoints import file_sha256

        cfg = self.config
        g, g_ft, _, _ = load_destylize_models(cfg)
        shape, size = (g.n_latent, g.style_dim), g.size
        outputs = (*(Column(c, "float32", shape) for c in ("z_e", "z_hat", "z_i")), Column("lpips", "float32"),
                   Column("id_sim", "float32"), *(Column(f"{c}_png", "bytes") for c in ("portrait", "intermediate",
                                                                                       "face")),
                   *(image_column(f"recon_{c}", size, stored=False) for c in ("intermediate", "face")),
                   Column("id_weight", "float32", fill=cfg.destylize.id_weight if cfg.identity else 0.0),
                   Column("lpips_backbone", "str", fill=cfg.destylize.lpips_backbone))
        digests = {"generator": g.generator_id, "finetuned": g_ft.generator_id, "encoder": file_sha256(cfg.encoder),
                   **({"identity": file_sha256(cfg.identity)} if cfg.identity else {})}
        return Plan(outputs=outputs, inputs=(image_column("image", CROP),), resources=Resources(num_cpus=1, num_gpus=1),
                    batch_size=4, image_size=CROP, previews=("original", "recon_intermediate", "recon_face"),
                    checkpoints=digests)

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from ops.stage import resolve_device

        super().setup(plan, device)
        self.g, self.g_ft, self.encoder, self.identity = load_destylize_models(self.config, resolve_device(device))

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ops.images import encode_png, to_tensor, to_uint8

        pixels = np.stack(batch["image"])
        result = destylize(self.g, self.g_ft, self.encoder, to_tensor(pixels, self.g.device),
                           [str(k) for k in batch["key"]], self.config.destylize, self.identity)
        out = {c: result[c].cpu().numpy() for c in ("z_e", "z_hat", "z_i", "lpips")}
        if "id_sim" in result:
            out["id_sim"] = result["id_sim"].cpu().numpy()
        for name in ("intermediate", "face"):
            out[f"recon_{name}"] = to_uint8(result[name])
            out[f"{name}_png"] = objects([encode_png(p) for p in out[f"recon_{name}"]])
        out["portrait_png"] = objects([encode_png(p) for p in pixels])
        finite = np.all([np.isfinite(out[c]).reshape(len(pixels), -1).all(1) for c in ("z_e", "z_hat", "z_i")], 0)
        out["error_code"] = objects(["" if ok else "nonfinite_latent" for ok in finite])
        out["error"] = objects(["" if ok else "non-finite codes" for ok in finite])
        return out
