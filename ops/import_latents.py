"""The import stage: latents of other tools (models/latents.py) -> latentray rows of one generator's W+. No Ray.

Input rows: key, status, error_code, error, `latent` (W+ [L, D], fitted to the generator by `fit`: a w is repeated
on every row). Output: `wplus`; a non-finite latent fails its row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ops import latents
from ops.stage import Context, Plan, Stage, objects


@dataclass(frozen=True)
class ImportConfig:
    generator: str = ""  # the checkpoint the latents belong to (their shapes are checked against it); "": bundled
    keys: str = ""  # file with one key per line for latents that carry no names (e4e latents.pt, .npy)


class ImportStage(Stage):
    name = "import"
    Config = ImportConfig
    help = "latents of other tools (rosinality/NVIDIA projector, e4e/pSp latents.pt, .npy/.npz) -> latentray rows"
    examples = ("latentray import --input projected_w.npz --output out/imported --generator ffhq.pt",
                "latentray import --input latents.pt --keys image_list.txt --output out/e4e --generator ffhq.pt")
    reads_outputs = False
    reads_files = True

    def prepare(self, context: Context) -> Plan:
        from models.checkpoints import load_generator

        G = load_generator(latents.generator_path(self.config.generator))
        return Plan(outputs=latents.columns(G, ("wplus",)), batch_size=256, checkpoints={"generator": G.generator_id},
                    metadata=latents.schema_metadata(G, self.config.generator, ("wplus",), latents.BASE_LEVEL),
                    prepared={"shape": (G.n_latent, G.style_dim)})

    def read_files(self, inputs: list[str], context: Context, plan: Plan) -> tuple[dict, dict]:
        """Every input file's latents, keyed, fitted to the generator (a misfit is refused before any row)."""
        from models.checkpoints import sha256_hex
        from models.latents import fit_latents, load_latent_file

        shape = plan.prepared["shape"]
        keys = [k.strip() for k in context.read_bytes(self.config.keys).decode().splitlines() if k.strip()] \
            if self.config.keys else None
        names, found, sources = [], [], {}
        for path in inputs:
            data = context.read_bytes(path)
            named, values, fmt = load_latent_file(path, keys if len(inputs) == 1 else None, data)
            names += named
            found.append(fit_latents(values, *shape, path))
            sources[path] = {"format": fmt, "sha256": sha256_hex(data), "rows": len(named)}
        if len(set(names)) != len(names):
            raise ValueError(f"the latent files {inputs} share keys: give each run its own files")
        return {"key": objects(names), "latent": np.concatenate(found)}, {"latent_files": sources}

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wplus = np.asarray(batch["latent"], np.float32)
        finite = np.isfinite(wplus.reshape(len(wplus), -1)).all(1)
        return {"wplus": wplus, "error_code": objects(["" if ok else "nonfinite_latent" for ok in finite]),
                "error": objects(["" if ok else "non-finite values in the latent" for ok in finite])}
