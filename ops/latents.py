"""Latent spaces as stored (DESIGN §4): which columns each space writes, their shapes, how to render them back, which
generator they belong to, and the preamble of every stage that reads an invert or import output. No Ray.

space  columns                               shape per row
w      w                                     [style_dim]
wplus  wplus                                 [n_latent, style_dim]
s      styles                                [n_styles] (conv and ToRGB channels in generator order)
fwplus fwplus_wplus, fwplus_base_code         [n_latent, style_dim], [C, level, level]
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ops.stage import Column, Context

SPACE_COLUMNS = {"w": ("w",), "wplus": ("wplus",), "s": ("styles",), "fwplus": ("fwplus_wplus", "fwplus_base_code")}
BASE_LEVEL = 16  # BDInvert's base-code resolution, the default of every F/W+ stage


def shapes(G, base_level: int = BASE_LEVEL) -> dict[str, tuple[int, ...]]:
    """Per-row shape of every latent column of generator G."""
    return {"w": (G.style_dim,), "wplus": (G.n_latent, G.style_dim), "styles": (G.n_styles,),
            "fwplus_wplus": (G.n_latent, G.style_dim),
            "fwplus_base_code": (G.channels[base_level], base_level, base_level)}


def columns(G, spaces, base_level: int = BASE_LEVEL) -> tuple[Column, ...]:
    """The stored latent columns of these spaces."""
    found = shapes(G, base_level)
    return tuple(Column(c, "float32", found[c]) for space in spaces for c in SPACE_COLUMNS[space])


def render(G, values: dict[str, np.ndarray], space: str, base_level: int = BASE_LEVEL):
    """Latent columns of one space ([N, ...] arrays or tensors) -> images [N, 3, R, R] (constant noise)."""
    import torch

    with torch.no_grad():
        t = {k: torch.as_tensor(np.asarray(v, dtype=np.float32) if isinstance(v, np.ndarray) else v,
                                dtype=torch.float32).to(G.device) for k, v in values.items()}
        if space == "w":
            return G.synthesis(t["w"])
        if space == "wplus":
            return G.synthesis(t["wplus"])
        if space == "s":
            return G.synthesis_from_styles(t["styles"])
        return G.synthesis_from_base_code(t["fwplus_base_code"], t["fwplus_wplus"], base_level)


def generator_path(path: str) -> str:
    from models.default_generator import DEFAULT_GENERATOR_PATH

    return path or str(DEFAULT_GENERATOR_PATH)


def generator_on(path: str, device: str = "cpu"):
    """The generator at `path` ("": the bundled one), frozen, on `device` (auto: cuda when this process sees one)."""
    from models.checkpoints import load_generator
    from ops.stage import resolve_device

    return load_generator(generator_path(path)).to(resolve_device(device))


def schema_metadata(G, generator: str, spaces, base_level: int) -> dict:
    """What a reader needs to interpret the latent columns (Parquet schema metadata, run.json `metadata`)."""
    return {"generator_id": G.generator_id, "generator": generator, "architecture": G.architecture(),
            "spaces": list(spaces), "base_level": base_level,
            "style_layers": [dataclasses.asdict(layer) for layer in G.style_layers]}


@dataclasses.dataclass(frozen=True)
class Latents:
    """What a stage reading latents knows of them: the generator (path, its checked id), spaces, base level."""

    generator: str
    generator_id: str
    spaces: tuple[str, ...]
    base_level: int


def reading_latents(context: Context, stage: str, generator: str = ""):
    """The preamble of a stage that reads an invert or import output: (Latents, G). The generator is the one the
    latents were made with, or the one given, which must be the same checkpoint."""
    from models.checkpoints import load_generator

    upstream = context.upstream
    if not upstream or upstream.get("stage") not in ("invert", "import"):
        found = (upstream or {}).get("stage", "no run.json")
        raise ValueError(f"{stage} reads latents: the output of `latentray invert` or `import` (the input is: "
                         f"{found})")
    meta = upstream["metadata"]
    path = generator or meta["generator"]
    G = load_generator(generator_path(path))
    if G.generator_id != meta["generator_id"]:
        raise ValueError(f"generator {generator_path(path)} (id {G.generator_id[:12]}) is not the one these latents "
                         f"were made with ({meta['generator_id'][:12]})")
    return Latents(path, G.generator_id, tuple(meta["spaces"]), meta["base_level"]), G


def cached(G, cache_dir: str | None, label: str, compute):
    """A statistic derived from generator G (`compute() -> {name: tensor}`), kept per generator id as
    `<cache_dir>/<label>-<id>.pt` when `cache_dir` is given: read with weights_only, written atomically (temp then
    rename); a file that does not load is computed again."""
    from pathlib import Path

    import torch

    from models.checkpoints import CheckpointError, load_state

    if not cache_dir or not getattr(G, "generator_id", None):
        return compute()
    path = Path(cache_dir) / f"{label}-{G.generator_id[:16]}.pt"
    if path.exists():
        try:
            return load_state(str(path))
        except CheckpointError:
            pass
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    torch.save(values, tmp)
    tmp.replace(path)
    return values
