"""`latentray import`: latents saved by other tools (rosinality or NVIDIA projector, e4e/pSp, .npy/.npz) -> rows
of W+ for one generator, read by every stage that reads invert outputs (models/latents.py, ops/import_latents.py)."""

import numpy as np

from models.checkpoints import sha256_hex
from ops.import_latents import ImportStage
from ops.stage import objects
from pipelines import io
from pipelines.runtime import Adapter


def read_latent_files(inputs: list[str], stage) -> tuple[dict, dict]:
    from models.latents import load_latent_file

    keys = [k.strip() for k in io.read_file(stage.config.keys).decode().splitlines() if k.strip()] \
        if stage.config.keys else None
    names, latents, sources = [], [], {}
    for path in inputs:
        data = io.read_file(path)
        found, values, fmt = load_latent_file(path, keys if len(inputs) == 1 else None, data)
        names += found
        latents.append(stage.fit(values, path))
        sources[path] = {"format": fmt, "sha256": sha256_hex(data), "rows": len(found)}
    if len(set(names)) != len(names):
        raise ValueError(f"the latent files {inputs} share keys: give each run its own files")
    return {"key": objects(names), "latent": np.concatenate(latents)}, {"latent_files": sources}


ADAPTER = Adapter(
    ImportStage,
    "latents of other tools (rosinality/NVIDIA projector, e4e/pSp latents.pt, .npy/.npz) -> latentray rows",
    read=read_latent_files, outputs=False,
    examples=("latentray import --input projected_w.npz --output out/imported --generator ffhq.pt",
              "latentray import --input latents.pt --keys image_list.txt --output out/e4e --generator ffhq.pt"))
