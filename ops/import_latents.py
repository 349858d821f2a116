"""The import stage: latents of other tools (models/latents.py) -> latentray rows of one generator's W+. No Ray.

Input rows: key, status, error_code, error, `latent` (W+ [L, D], fitted to the generator by `fit`: a w is repeated
on every row). Output: `wplus`; a non-finite latent fails its row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ops.stage import Context, Provenance, Stage, blank_like, objects


@dataclass(frozen=True)
class ImportConfig:
    generator: str = ""  # the checkpoint the latents belong to (their shapes are checked against it); "": bundled
    keys: str = ""  # file with one key per line for latents that carry no names (e4e latents.pt, .npy)


class ImportStage(Stage):
    name = "import"
    Config = ImportConfig
    batch_size = 256

    def prepare(self, context: Context) -> Provenance:
        from models.checkpoints import load_generator
        from ops.invert_stage import generator_path, schema_metadata

        G = load_generator(generator_path(self.config.generator))
        self.shape = (G.n_latent, G.style_dim)
        return Provenance(checkpoints={"generator": G.generator_id},
                          metadata=schema_metadata(G, self.config.generator, ("wplus",), 16))

    def fit(self, latents: np.ndarray, path: str) -> np.ndarray:
        """The file's latents as this generator's W+ (the shape check: a misfit is refused before any row)."""
        from models.latents import fit_latents

        return fit_latents(latents, *self.shape, path)

    def blank(self, n: int) -> dict[str, np.ndarray]:
        return blank_like({"wplus": self.shape}, n)

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wplus = np.asarray(batch["latent"], np.float32)
        finite = np.isfinite(wplus.reshape(len(wplus), -1)).all(1)
        return {"wplus": wplus, "error_code": objects(["" if ok else "nonfinite_latent" for ok in finite]),
                "error": objects(["" if ok else "non-finite values in the latent" for ok in finite])}
