"""DualStyleGAN stages on Ray Data: `destylize` (artistic portraits -> paired realistic faces) and `stylize`
(exemplar style transfer onto faces). Portraits/faces are read, decoded and cropped by the ingest tasks (a bad file
or a portrait without a detectable face is a failed row); the models run on the actor pool. Maths: ops/destylize.py
and models/dualstylegan.py."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from models.checkpoints import file_sha256
from ops.align import AlignConfig, check_backend
from ops.destylize import DestylizeConfig
from ops.images import thumbnail
from pipelines import io
from pipelines.invert import (TASK_RETRIES, actor_pool, drain, fingerprint, finish, ingest_align, init_ray, versions,
                              write_batch)

CROP = 256  # portraits and faces enter the encoders at 256 x 256


def images_of(batch: dict, rows):
    """uint8 image rows -> float [N, 3, H, W] in [-1, 1]."""
    import torch

    return torch.from_numpy(np.stack(batch["image"][rows]).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1


class DestylizeActor:
    def __init__(self, generator: str, finetuned: str, encoder: str, identity: str, config: DestylizeConfig,
                 device: str):
        from models.checkpoints import load_generator
        from models.encoders import load_style_encoder
        from models.identity import load_arcface
        from ops.invert_stage import resolve_device

        self.device = resolve_device(device)
        self.g = load_generator(generator).to(self.device)
        self.g_ft = load_generator(finetuned).to(self.device)
        self.encoder = load_style_encoder(encoder).to(self.device)
        self.identity = load_arcface(identity, self.device) if identity else None
        self.config = config

    def __call__(self, batch: dict) -> dict:
        import torch

        from ops.destylize import destylize
        from ops.images import encode_png, to_uint8

        n, g = len(batch["key"]), self.g
        out = {k: np.array(v, copy=True) for k, v in batch.items()}
        codes = {c: np.full((n, g.n_latent, g.style_dim), np.nan, np.float32) for c in ("z_e", "z_hat", "z_i")}
        metrics = {c: np.full(n, np.nan, np.float32) for c in ("lpips", "id_sim")}
        pngs = {c: io.objects([b""] * n) for c in ("portrait_png", "intermediate_png", "face_png")}
        previews = {c: np.zeros((n, g.size, g.size, 3), np.uint8) for c in ("recon_intermediate", "recon_face")}
        rows = np.flatnonzero(out["status"] == "ok")
        result = None
        if rows.size:
            try:
                images = images_of(out, rows).to(self.device)
                result = destylize(g, self.g_ft, self.encoder, images, [str(k) for k in out["key"][rows]],
                                   self.config, self.identity)
                if not all(torch.isfinite(result[c]).all() for c in codes):
                    raise FloatingPointError("non-finite codes")
            except Exception as exc:  # a batch that cannot be destylized fails its rows, never the job
                out["status"][rows], out["error_code"][rows] = "failed", "destylize_error"
                out["error"][rows] = f"{type(exc).__name__}: {exc}"
                result = None
        if result is not None:
            for c in codes:
                codes[c][rows] = result[c].cpu().numpy()
            metrics["lpips"][rows] = result["lpips"].cpu().numpy()
            if "id_sim" in result:
                metrics["id_sim"][rows] = result["id_sim"].cpu().numpy()
            for c, key in (("intermediate", "recon_intermediate"), ("face", "recon_face")):
                pixels = to_uint8(result[c])
                previews[key][rows] = pixels
                for r, p in zip(rows, pixels):
                    pngs[f"{c}_png"][r] = encode_png(p)
            for r in rows:
                pngs["portrait_png"][r] = encode_png(out["image"][r])
        out.update(codes, **metrics, **pngs, **previews,
                   id_weight=np.full(n, self.config.id_weight if self.identity is not None else 0.0, np.float32),
                   lpips_backbone=np.full(n, self.config.lpips_backbone, dtype=object))
        out["original"] = np.stack([thumbnail(a, g.size) for a in out["image"]])
        return out


class StylizeActor:
    def __init__(self, dualstylegan: str, encoder: str, exstyles: str, style_ids: list, weights: list,
                 truncation: float, preserve_color: bool, device: str):
        from models.dualstylegan import load_dualstylegan, load_exstyle_codes
        from models.encoders import load_style_encoder
        from ops.invert_stage import resolve_device

        self.device = resolve_device(device)
        self.model = load_dualstylegan(dualstylegan, self.device)
        self.encoder = load_style_encoder(encoder).to(self.device)
        codes = load_exstyle_codes(exstyles)
        self.styles = resolve_styles(codes, style_ids)
        self.weights, self.truncation, self.preserve_color = weights, truncation, preserve_color

    def __call__(self, batch: dict) -> dict:
        from ops.images import encode_png

        G = self.model.generator
        rows_out = []
        ok = np.flatnonzero(batch["status"] == "ok")
        position = {int(i): p for p, i in enumerate(ok)}
        images, failure = {}, ""
        try:
            self._render(batch, ok, images)
        except Exception as exc:  # a batch that cannot be rendered fails its rows, never the job
            failure = f"{type(exc).__name__}: {exc}"
        for i, key in enumerate(batch["key"]):
            for name in self.styles:
                good = i in position and not failure
                status, code, error = ("ok", "", "") if good else \
                    ("failed", "stylize_error", failure) if i in position else \
                    ("skipped", "source_not_ok", f"source row {batch['status'][i]}: {batch['error'][i]}")
                rows_out.append({"key": f"{key}|{name}", "source_key": key, "style": name, "status": status,
                                 "error_code": code, "error": error,
                                 "image_png": encode_png(images[name][position[i]]) if good else b"",
                                 "original": thumbnail(batch["image"][i], G.size),
                                 "recon_stylized": images[name][position[i]] if good else
                                 np.zeros((G.size, G.size, 3), np.uint8)})
        return io.rows_to_columns(rows_out)

    def _render(self, batch: dict, ok: np.ndarray, images: dict) -> None:
        """Stylized uint8 images of the ok rows, one array per exemplar name."""
        import torch

        from ops.images import to_uint8
        from ops.stylize import stylize

        if ok.size:
            faces = images_of(batch, ok).to(self.device)
            for name, code in self.styles.items():
                images[name] = to_uint8(stylize(self.model, self.encoder, faces, torch.from_numpy(code), self.weights,
                                                self.truncation, self.preserve_color))


def resolve_styles(codes: dict, style_ids: list) -> dict:
    """Exemplars by name or by position in the file (style_transfer.py's --style_id k = k-th entry)."""
    names = list(codes)
    chosen = {}
    for sid in style_ids:
        name = names[int(sid)] if isinstance(sid, int) or str(sid).isdigit() else str(sid)
        if name not in codes:
            raise ValueError(f"exemplar {sid!r} not in the exstyle codes ({len(names)}: {names[:5]}...)")
        chosen[name] = codes[name]
    return chosen


def run_style_stage(stage: str, inputs: list[str], output: str, actor, actor_kwargs: dict, config: dict,
                    digests: dict, align: AlignConfig, preview_columns: tuple[str, ...], rows_per_input: int = 1,
                    batch_size: int = 4, overwrite: bool = False, actors: int | None = None,
                    progress: bool = True) -> dict:
    """Shared driver: photos -> ingest tasks (decode, crop/align to 256) -> model actors -> atomic parts."""
    import ray.data

    from ops.ingest import list_inputs

    t0 = time.time()
    check_backend(align)
    config = {**config, "stage_name": stage, "align": dataclasses.asdict(align)}
    fp = fingerprint(config)
    io.prepare_output(output, fp, overwrite)
    done = io.completed_keys(output, column="source_key" if rows_per_input > 1 else "key")
    io.write_json(output, "run.json", {"stage": stage, "fingerprint": fp, "config": config, "inputs": inputs,
                                       "started": t0, "versions": versions(), "checkpoints_sha256": digests})
    init_ray()
    todo = [{"key": k, "uri": u, "skip": False} for k, u in list_inputs(inputs) if k not in done]
    ds = None
    if todo:
        ds = ray.data.from_items(todo).map_batches(ingest_align, fn_kwargs={"size": CROP, "align": align},
                                                   batch_size=batch_size, num_cpus=1, **TASK_RETRIES)
        ds = ds.map_batches(actor, fn_constructor_kwargs=actor_kwargs, batch_size=batch_size, **actor_pool(actors))
        ds = ds.map_batches(write_batch, fn_kwargs={"output": output, "metadata": {"stage": stage, "fingerprint": fp},
                                                    "preview_columns": preview_columns, "preview_rows": 6},
                            batch_size=None, num_cpus=1, **TASK_RETRIES)
    return finish(output, t0, *drain(ds, stage, len(todo) * rows_per_input, progress), len(done))


def run_destylize(inputs: list[str], output: str, finetuned: str, encoder: str, generator: str = "",
                  identity: str = "", config: DestylizeConfig = DestylizeConfig(), align: AlignConfig = AlignConfig(),
                  device: str = "auto", **kw) -> dict:
    """Portraits -> (portrait, intermediate face, final face) pairs with z_e, z_hat, z_i and metrics."""
    from models.checkpoints import load_generator
    from models.default_generator import DEFAULT_GENERATOR_PATH
    from models.encoders import load_style_encoder
    from models.identity import load_arcface

    generator = generator or str(DEFAULT_GENERATOR_PATH)
    g, g_ft, enc = load_generator(generator), load_generator(finetuned), load_style_encoder(encoder)
    if identity:
        load_arcface(identity)
    if (g.size, g.style_dim, g.n_latent) != (g_ft.size, g_ft.style_dim, g_ft.n_latent) or \
            enc.n_styles != g.n_latent or enc.styles[0].cout != g.style_dim:
        raise ValueError(f"models do not fit together: generator {g.size}px/{g.n_latent}x{g.style_dim}, fine-tuned "
                         f"{g_ft.size}px/{g_ft.n_latent}x{g_ft.style_dim}, encoder {enc.n_styles}x"
                         f"{enc.styles[0].cout}")
    digests = {"generator": g.generator_id, "finetuned": g_ft.generator_id, "encoder": file_sha256(encoder),
               **({"identity": file_sha256(identity)} if identity else {})}
    config_dict = {"destylize": dataclasses.asdict(config), "identity": bool(identity), **digests}
    return run_style_stage("destylize", inputs, output, DestylizeActor,
                           dict(generator=generator, finetuned=finetuned, encoder=encoder, identity=identity,
                                config=config, device=device), config_dict, digests, align,
                           ("original", "recon_intermediate", "recon_face"), **kw)


def run_stylize(inputs: list[str], output: str, dualstylegan: str, encoder: str, exstyles: str, style_ids: list,
                weights: list | None = None, truncation: float = 0.75, preserve_color: bool = False,
                align: AlignConfig = AlignConfig(), device: str = "auto", **kw) -> dict:
    """Faces x exemplars -> stylised images (one row per face and style) and a faces x styles grid per part."""
    from models.dualstylegan import load_dualstylegan, load_exstyle_codes
    from models.encoders import load_style_encoder
    from ops.stylize import DEFAULT_WEIGHTS

    model, enc = load_dualstylegan(dualstylegan), load_style_encoder(encoder)
    n = model.n_latent
    weights = list(weights) if weights is not None else list(DEFAULT_WEIGHTS[:n])
    if len(weights) != n:
        raise ValueError(f"weights need {n} values (one per W+ row: 0-6 structure, 7- colour), got {len(weights)}")
    if enc.n_styles != n or enc.styles[0].cout != model.generator.style_dim:
        raise ValueError(f"encoder emits {enc.n_styles}x{enc.styles[0].cout}, DualStyleGAN needs {n}x"
                         f"{model.generator.style_dim}")
    styles = resolve_styles(load_exstyle_codes(exstyles), style_ids)
    digests = {"dualstylegan": file_sha256(dualstylegan), "encoder": file_sha256(encoder), "exstyles": file_sha256(exstyles)}
    config = {"styles": list(styles), "weights": weights, "truncation": truncation, "preserve_color": preserve_color,
              **digests}
    stats = run_style_stage("stylize", inputs, output, StylizeActor,
                           dict(dualstylegan=dualstylegan, encoder=encoder, exstyles=exstyles, style_ids=list(styles),
                                weights=weights, truncation=truncation, preserve_color=preserve_color, device=device),
                           config, digests, align, ("original", "recon_stylized"), rows_per_input=len(styles), **kw)
    styles_grid(output)
    return stats


def styles_grid(output: str, n_faces: int = 4) -> None:
    """previews/styles.png: rows = the first faces, columns = exemplars (stylize)."""
    from ops.images import png_grid

    table = io.read_dataset(output, ["source_key", "style", "status", "image_png"])
    cells = {(f, s): png for f, s, st, png in zip(*(table.column(c).to_pylist() for c in (
        "source_key", "style", "status", "image_png"))) if st == "ok"}
    grid = png_grid(cells, sorted({f for f, _ in cells})[:n_faces], sorted({s for _, s in cells}))
    if grid is not None:
        io.write_png(output, "previews/styles.png", grid)
