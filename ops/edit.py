"""Latent edits as pure functions on batches (spec: inversion.md §6, stylespace.md §2, bdinvert.md §4). No Ray.

Each takes and returns float tensors with a leading batch dimension; none touches the generator except
`channel_std` (population statistics of S) and `render_edit` (draws the result).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ops.geometry import similarity_warp

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
    from pathlib import Path

    import numpy as np

    from ops.channels import RunningStats

    path = None
    if cache_dir and getattr(G, "generator_id", None):
        path = Path(cache_dir) / f"s-std-{G.generator_id[:16]}-n{n}-s{seed}-psi{psi}.npy"
        if path.exists():
            return torch.from_numpy(np.load(path))

    stats = RunningStats(G.n_styles)
    gen = torch.Generator().manual_seed(seed)
    device = G.input.input.device
    w_avg = G.w_avg if G.w_avg is not None else G.mean_latent(10_000)
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), G.style_dim, generator=gen).to(device)
        wplus = G.to_wplus(G.mapping(z)).clone()
        wplus[:, :8] = G.truncate(wplus[:, :8], w_avg, psi)  # truncation cutoff 8, as StyleSpace samples
        stats.update(G.styles_to_vector(G.styles(wplus)).double().cpu().numpy())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, stats.std())
    return torch.from_numpy(stats.std())


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
