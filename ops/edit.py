"""Latent edits as pure functions on batches (spec: inversion.md §6, stylespace.md §2, bdinvert.md §4). No Ray.

Each takes and returns float tensors with a leading batch dimension; none touches the generator except
`channel_std` (population statistics of S) and `render_edit` (draws the result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ops.geometry import similarity_warp
from ops.latents import SPACE_COLUMNS
from ops.stage import Column, Context, Plan, Resources, Stage, blank, config_dict, objects

EDIT_KINDS = ("direction", "channel", "interpolate", "arithmetic", "mix", "geometric")


@dataclass(frozen=True)
class Edit:
    """One edit of the config: `kind`, the strengths to render, and its parameters.

    direction:   path (.npy/.pt, [style_dim] or [n_latent, style_dim]), layers (start, stop) or None = all rows
    channel:     layer (rosinality name), channel (within the layer); strengths in units of the channel's std
    interpolate: other (key); strengths are lambda
    arithmetic:  a, b (keys: w_target + lambda (w_b - w_a), e.g. neutral and smiling of one person)
    mix:         other (key); strengths are k (rows [0, k) from the row, [k, n) from `other`)
    geometric:   degrees, shift (dx, dy) in image pixels (times the strength), scale (to the power strength);
                 fwplus latents only
    """

    kind: str
    strengths: tuple[float, ...] = (1.0,)
    name: str = ""
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"edit kind must be one of {EDIT_KINDS}, got {self.kind!r}")
        if not self.strengths:
            raise ValueError(f"edit {self.kind}: strengths must not be empty")

    @property
    def label(self) -> str:
        return self.name or self.kind


def move_along_direction(wplus: torch.Tensor, direction: torch.Tensor, strength: float,
                         layers: tuple[int, int] | None = None) -> torch.Tensor:
    """W+ [B, L, D] + strength * direction ([D] broadcast to every row, or [L, D]) on rows [start, stop) only."""
    direction = direction.to(wplus).expand(wplus.shape[1:]) if direction.dim() == 1 else direction.to(wplus)
    if direction.shape != wplus.shape[1:]:
        raise ValueError(f"direction shape {tuple(direction.shape)} does not fit W+ rows {tuple(wplus.shape[1:])}")
    mask = torch.zeros(wplus.shape[1], 1, dtype=wplus.dtype, device=wplus.device)
    start, stop = layers if layers is not None else (0, wplus.shape[1])
    mask[start:stop] = 1
    return wplus + strength * mask * direction


def shift_channel(styles: torch.Tensor, index: int, alpha: float, std: float) -> torch.Tensor:
    """S [B, n_S]: s_index += alpha * std (StyleSpace's single-channel edit; every other channel untouched)."""
    out = styles.clone()
    out[:, index] += alpha * std
    return out


def interpolate(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Morphing: (1 - lam) a + lam b (lam = 0 returns a exactly)."""
    return a if lam == 0 else torch.lerp(a, b.to(a), lam)


def latent_arithmetic(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Expression transfer: target + lam (b - a)."""
    return target + lam * (b.to(target) - a.to(target))


def style_mix(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Crossover of W+ [B, L, D]: rows [0, k) from a, [k, L) from b."""
    if not 0 <= k <= a.shape[1]:
        raise ValueError(f"mix row k={k} outside [0, {a.shape[1]}]")
    return torch.cat([a[:, :k], b.to(a)[:, k:]], dim=1)


def transform_base_code(base: torch.Tensor, image_size: int, degrees: float = 0.0, scale: float = 1.0,
                        shift: tuple[float, float] = (0.0, 0.0), padding: str = "zeros") -> torch.Tensor:
    """Move / rotate / scale the picture by transforming F (bdinvert.md §4.2, our design): the image-space
    similarity (shift in image pixels) becomes the same similarity in F's normalised coordinates, i.e. a shift of
    shift / (image_size / level) F cells; bilinear inverse warp, zeros outside."""
    cell = image_size / base.shape[-1]
    cells = (shift[0] / cell, shift[1] / cell)
    if degrees == 0 and scale == 1 and all(float(c).is_integer() for c in cells) and padding == "zeros":
        return shift_cells(base, int(cells[0]), int(cells[1]))  # exact (the identity included)
    fraction = (shift[0] / image_size, shift[1] / image_size)
    return similarity_warp(base, degrees=degrees, scale=scale, shift=fraction, padding=padding)


def shift_cells(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move a map [B, C, H, W] by whole cells (right/down positive), zeros where it was vacated."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    if abs(dx) < w and abs(dy) < h:
        out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@torch.no_grad()
def channel_std(G, n: int = 10_000, seed: int = 5, psi: float = 0.7, batch: int = 500,
                cache_dir: str | None = None) -> torch.Tensor:
    """Population std (ddof 0) of every S channel over `n` mapped samples, truncated toward w_avg as StyleSpace's
    statistics are (stylespace.md §1.1). float64 [n_S]; cached by generator id when `cache_dir` is given."""
    from ops.channels import RunningStats
    from ops.latents import cached

    def compute():
        stats = RunningStats(G.n_styles)
        gen = torch.Generator().manual_seed(seed)
        w_avg = G.w_avg if G.w_avg is not None else G.mean_latent(10_000)
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), G.style_dim, generator=gen).to(G.device)
            wplus = G.to_wplus(G.mapping(z)).clone()
            wplus[:, :8] = G.truncate(wplus[:, :8], w_avg, psi)  # truncation cutoff 8, as StyleSpace samples
            stats.update(G.styles_to_vector(G.styles(wplus)).double().cpu().numpy())
        return {"std": torch.from_numpy(stats.std())}

    return cached(G, cache_dir, f"s-std-n{n}-s{seed}-psi{psi}", compute)["std"]


# ----- applying a configured edit to a batch of stored latents ---------------------------------------------------
# A batch is described by its latent columns (torch tensors, leading dim B) in one of the stored spaces:
#   wplus:  {"wplus": [B, L, D]}            s: {"styles": [B, n_S]}
#   fwplus: {"fwplus_wplus": [B, L, D], "fwplus_base_code": [B, C, s, s]}
# Referenced keys (interpolate/arithmetic/mix partners) come as `refs[key]` with the same columns, batch dim 1.

APPLICABLE = {"wplus": set(EDIT_KINDS) - {"geometric"}, "fwplus": set(EDIT_KINDS) - {"channel"},
              "s": {"channel", "interpolate", "arithmetic"}}


def _code(space: str, columns: dict) -> torch.Tensor:
    """The vector-like code an edit moves: W+ for wplus/fwplus (the detail code), S for s."""
    return {"wplus": columns.get("wplus"), "fwplus": columns.get("fwplus_wplus"), "s": columns.get("styles")}[space]


def apply_edit(G, edit: Edit, strength: float, space: str, columns: dict, refs: dict, direction=None,
               std: torch.Tensor | None = None) -> dict:
    """Edited latents of a batch: {"wplus" or "styles" or fwplus columns} -> {"styles": S of the result, plus
    "wplus" (or "fwplus_wplus") when the result has a W+ code, "fwplus_base_code" for fwplus}. Raises ValueError when
    the edit does not apply to the space (the stage marks those rows skipped)."""
    if edit.kind not in APPLICABLE[space]:
        raise ValueError(f"{edit.kind} edits do not apply to {space} latents")
    p = edit.params
    code = _code(space, columns)
    base = columns.get("fwplus_base_code")

    def ref(key):
        if key not in refs:
            raise ValueError(f"{edit.label}: key {key!r} is not an ok row of the input")
        return _code(space, refs[key]), refs[key].get("fwplus_base_code")

    styles = None
    if edit.kind == "direction":
        code = move_along_direction(code, direction, strength, tuple(p["layers"]) if p.get("layers") else None)
    elif edit.kind == "channel":
        layer = next((l for l in G.style_layers if l.name == p["layer"]), None)
        if layer is None or not 0 <= int(p["channel"]) < layer.width:
            raise ValueError(f"{edit.label}: no channel {p.get('channel')} in layer {p.get('layer')!r}")
        index = layer.offset + int(p["channel"])
        s = code if space == "s" else G.styles_to_vector(G.styles(code))
        styles, code = shift_channel(s, index, strength, float(std[index])), None
    elif edit.kind == "interpolate":
        other, other_base = ref(p["other"])
        code = interpolate(code, other.expand_as(code), strength)
        base = interpolate(base, other_base.expand_as(base), strength) if base is not None else None
    elif edit.kind == "arithmetic":
        (a, _), (b, _) = ref(p["a"]), ref(p["b"])
        code = latent_arithmetic(code, a, b, strength)
    elif edit.kind == "mix":
        other, _ = ref(p["other"])
        code = style_mix(code, other.expand_as(code), int(strength))
    elif edit.kind == "geometric":
        base = transform_base_code(base, G.size, degrees=float(p.get("degrees", 0.0)) * strength,
                                   scale=float(p.get("scale", 1.0)) ** strength,
                                   shift=tuple(float(v) * strength for v in p.get("shift", (0.0, 0.0))))
    if space == "s":
        styles, code = (code if styles is None else styles), None
    out = {"styles": styles if styles is not None else G.styles_to_vector(G.styles(code))}
    if code is not None:
        out["fwplus_wplus" if space == "fwplus" else "wplus"] = code
    if space == "fwplus":
        out["fwplus_base_code"] = base
    return out


def render_edited(G, space: str, edited: dict, base_level: int) -> torch.Tensor:
    """Images of `apply_edit` results (constant noise, as the inversion that produced the latents)."""
    if space == "fwplus":
        return G.synthesis_from_base_code(edited["fwplus_base_code"], edited["fwplus_wplus"], base_level)
    return G.synthesis_from_styles(edited["styles"]) if "wplus" not in edited else G.synthesis(edited["wplus"])


# ----- the edit stage ------------------------------------------------------------------------------------------------
EDITS_FORMAT = """edits file (YAML list; `strengths` are rendered side by side; `name` defaults to the kind):
  - {kind: direction, name: smile, path: smile.npy, strengths: [-3, 0, 3], layers: [0, 8]}
  - {kind: channel, layer: convs.5, channel: 12, strengths: [-10, 0, 10]}   # alpha in channel stds
  - {kind: interpolate, other: photos/b.jpg, strengths: [0, 0.5, 1]}
  - {kind: arithmetic, a: neutral.jpg, b: smiling.jpg, strengths: [1]}      # + lambda (w_b - w_a)
  - {kind: mix, other: photos/b.jpg, strengths: [4, 8]}                     # rows [0, k) kept
  - {kind: geometric, shift: [16, 0], degrees: 10, strengths: [0, 1]}       # fwplus: transforms F
"""


def parse_edits(text: bytes | str, name: str = "edits") -> list[Edit]:
    """The edits file (EDITS_FORMAT) -> Edit list with distinct names."""
    import yaml

    entries = yaml.safe_load(text)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{name}: expected a YAML list of edits")
    edits = []
    for entry in entries:
        params = dict(entry)
        kind, label = params.pop("kind", None), str(params.pop("name", ""))
        strengths = tuple(float(v) for v in params.pop("strengths", [1.0]))
        edits.append(Edit(kind=kind, strengths=strengths, name=label, params=params))
    labels = [e.label for e in edits]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{name}: edits need distinct names, got {labels}")
    return edits


@dataclass(frozen=True)
class EditConfig:
    edits: str = ""  # YAML list of edits (format below)
    space: Literal["wplus", "s", "fwplus"] = "wplus"  # which stored latents to edit
    generator: str = ""  # checkpoint ("": the one invert recorded; its id is checked either way)
    # a `channels` output whose population std scales channel edits ("": 10k samples of the generator, psi 0.7)
    channel_stats: str = ""
    cache_dir: str | None = None  # where per-generator S statistics are cached


class EditStage(Stage):
    """Every input row once per (edit, strength): key `<key>|<edit>|<strength>`, the edited latents (`styles`,
    the S vector of the result, plus `wplus` or the fwplus columns) and `image_png`, its rendering."""

    name = "edit"
    Config = EditConfig
    required = ("edits",)
    help = "apply latent edits to an invert output; render them"
    examples = ("latentray edit --input out/latents --output out/edits --edits edits.yaml",
                "latentray edit --input out/latents --output out/moved --edits geometric.yaml --space fwplus")
    epilog = EDITS_FORMAT

    def prepare(self, context: Context) -> Plan:
        from models.checkpoints import load_direction, sha256_hex
        from ops.latents import reading_latents

        cfg = self.config
        source, G = reading_latents(context, "edit", cfg.generator)
        if cfg.space not in source.spaces:
            raise ValueError(f"the input holds spaces {list(source.spaces)}, not {cfg.space}")
        edits = parse_edits(context.read_bytes(cfg.edits), cfg.edits)
        files = {e.label: (e.params["path"], context.read_bytes(e.params["path"])) for e in edits
                 if e.kind == "direction"}
        refs_wanted = sorted({e.params[p] for e in edits for p in ("other", "a", "b") if p in e.params})
        columns = SPACE_COLUMNS[cfg.space]
        rows = context.read_input(refs_wanted, ["status", *columns]) if refs_wanted and context.read_input else \
            {"key": []}
        std = None
        if cfg.channel_stats and any(e.kind == "channel" for e in edits) and context.read_table:
            table = context.read_table(cfg.channel_stats.rstrip("/") + "/population_stats.parquet", ["index", "std"])
            std = np.empty(len(table["index"]))
            std[table["index"]] = table["std"]
        prepared = {"edits": edits, "generator": source.generator, "base_level": source.base_level, "std": std,
                    "directions": {label: load_direction(data, path) for label, (path, data) in files.items()},
                    "refs": {k: {c: rows[c][i:i + 1] for c in columns}
                             for i, k in enumerate(rows["key"]) if rows["status"][i] == "ok"}}
        return Plan(inputs=tuple(Column(c, "float32", None) for c in columns),
                    outputs=(*edited_columns(G, cfg.space, source.base_level), Column("image_png", "bytes")),
                    labels=(Column("edit", "str"), Column("kind", "str"), Column("strength", "float64")),
                    resources=Resources(num_cpus=1, num_gpus=1),
                    variants=tuple(f"{e.label}|{s:g}" for e in edits for s in e.strengths),
                    summary=("source_key", "edit", "strength", "status", "image_png"), prepared=prepared,
                    checkpoints={"generator": G.generator_id,
                                 **{f"direction:{label}": sha256_hex(data) for label, (_, data) in files.items()}},
                    fingerprint={"edits": [config_dict(e) for e in edits]})

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from ops.latents import generator_on

        super().setup(plan, device)
        self.edits = plan.prepared["edits"]
        self.G = generator_on(plan.prepared["generator"], device)
        self.std = plan.prepared["std"]
        if self.std is None and any(e.kind == "channel" for e in self.edits):
            self.std = channel_std(self.G, cache_dir=self.config.cache_dir).numpy()

    def variant_columns(self, variant: np.ndarray) -> dict[str, np.ndarray]:
        plan = [(e, s) for e in self.plan.prepared["edits"] for s in e.strengths]
        return {"edit": objects([plan[v][0].label for v in variant]), "kind": objects([plan[v][0].kind for v in variant]),
                "strength": np.array([plan[v][1] for v in variant], dtype=np.float64)}

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ops.images import encode_png, to_uint8

        n = len(batch["key"])
        out = blank(self.plan.outputs, n)
        out.update(error_code=objects([""] * n), error=objects([""] * n), status=objects(["ok"] * n))
        plan = [(e, s) for e in self.edits for s in e.strengths]
        space, device = self.config.space, self.G.device
        std = torch.from_numpy(self.std) if self.std is not None else None
        refs = {k: {c: torch.from_numpy(a).to(device) for c, a in cols.items()}
                for k, cols in self.plan.prepared["refs"].items()}
        for v in np.unique(batch["variant"]):
            rows = np.flatnonzero(batch["variant"] == v)
            edit, strength = plan[v]
            if edit.kind not in APPLICABLE[space]:
                out["status"][rows], out["error_code"][rows] = "skipped", "not_applicable"
                out["error"][rows] = f"{edit.kind} edits do not apply to {space} latents"
                continue
            columns = {c: torch.from_numpy(np.ascontiguousarray(batch[c][rows])).to(device)
                       for c in SPACE_COLUMNS[space]}
            direction = self.plan.prepared["directions"].get(edit.label)
            try:
                with torch.no_grad():
                    result = apply_edit(self.G, edit, strength, space, columns, refs,
                                        torch.from_numpy(direction) if direction is not None else None, std)
                    pixels = to_uint8(render_edited(self.G, space, result, self.plan.prepared["base_level"]))
            except (ValueError, KeyError) as exc:  # a misfit edit fails its own rows, not the others
                out["status"][rows], out["error_code"][rows] = "failed", "edit_error"
                out["error"][rows] = f"{type(exc).__name__}: {exc}"
                continue
            for column in result:
                if column in out:
                    out[column][rows] = result[column].cpu().numpy()
            out["image_png"][rows] = objects([encode_png(p) for p in pixels])
        return out

    def summary_previews(self, table: dict) -> dict[str, np.ndarray]:
        """One grid per edit: rows = the first source images, columns = strengths."""
        from ops.images import png_grid

        cells = {(s, e, float(st)): png for s, e, st, status, png in zip(
            table["source_key"], table["edit"], table["strength"], table["status"], table["image_png"])
            if status == "ok"}
        sources = sorted({s for s, _, _ in cells})
        grids = {}
        for edit in self.plan.prepared["edits"]:
            grid = png_grid({(s, st): png for (s, e, st), png in cells.items() if e == edit.label}, sources,
                            [float(st) for st in edit.strengths])
            if grid is not None:
                grids[f"edit-{edit.label}"] = grid
        return grids


def edited_columns(G, space: str, base_level: int) -> tuple[Column, ...]:
    """The latent columns an edit of `space` writes: S always, the W+ code unless S, the base code for fwplus."""
    from ops import latents

    found = latents.shapes(G, base_level)
    names = ["styles"] + ([] if space == "s" else ["fwplus_wplus" if space == "fwplus" else "wplus"]) + \
        (["fwplus_base_code"] if space == "fwplus" else [])
    return tuple(Column(c, "float32", found[c]) for c in names)