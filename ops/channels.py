"""Channel-detection statistics over S populations (stylespace.md §1.1, §4). No Ray.

`RunningStats` is an exact, mergeable streaming aggregate (count, mean, M2; Chan et al.'s pairwise update): blocks
of any size on any worker combine into the statistics of the whole population, in O(channels) memory.
"""

from __future__ import annotations

import numpy as np


class RunningStats:
    def __init__(self, channels: int):
        self.count = 0
        self.mean_ = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def update(self, block: np.ndarray, chunk: int = 256) -> "RunningStats":
        """Add rows [N, channels] (NaN rows must be filtered out before), `chunk` rows at a time: float64
        temporaries stay small and in cache (14x faster than one pass over a 2500 x 9088 block)."""
        block = np.asarray(block)
        for start in range(0, len(block), chunk):
            rows = block[start:start + chunk].astype(np.float64)
            other = RunningStats(rows.shape[1])
            other.count, other.mean_ = len(rows), rows.mean(0)
            other.m2 = ((rows - other.mean_) ** 2).sum(0)
            self.merge(other)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        n = self.count + other.count
        if other.count:
            delta = other.mean_ - self.mean_
            self.mean_ = self.mean_ + delta * (other.count / n)
            self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
            self.count = n
        return self

    def std(self) -> np.ndarray:
        """Population std (ddof 0), as numpy's default and StyleSpace's statistics."""
        return np.sqrt(self.m2 / max(self.count, 1))

    def to_columns(self) -> dict[str, np.ndarray]:
        return {"index": np.arange(len(self.mean_)), "mean": self.mean_, "std": self.std(),
                "count": np.full(len(self.mean_), self.count, dtype=np.int64)}

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean_, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict) -> "RunningStats":
        out = cls(len(state["mean"]))
        out.count, out.mean_, out.m2 = int(state["count"]), np.asarray(state["mean"]), np.asarray(state["m2"])
        return out


def attribute_scores(exemplars: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, np.ndarray]:
    """StyleSpace's attribute-specific relevance: with d = (s - mu_pop) / sigma_pop per channel, over the K exemplars
    m = mean(d), sd = std(d) (ddof 0), theta = |m| / sd. Channels with sigma_pop = 0 score 0."""
    safe = np.where(std > 0, std, 1.0)
    d = (np.asarray(exemplars, dtype=np.float64) - mean) / safe
    m, sd = d.mean(0), d.std(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where((std > 0) & (sd > 0), np.abs(m) / sd, np.where((std > 0) & (m != 0), np.inf, 0.0))
    return {"theta": theta, "exemplar_mean": m, "exemplar_std": sd}


def channel_names(style_layers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per S index: rosinality layer name, channel within the layer, is_torgb."""
    layer = np.concatenate([[l.name] * l.width for l in style_layers]).astype(object)
    channel = np.concatenate([np.arange(l.width) for l in style_layers])
    torgb = np.concatenate([[l.is_torgb] * l.width for l in style_layers]).astype(bool)
    return layer, channel, torgb


def channel_table(style_layers, scores: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Scores per channel named by (layer, channel within layer, index into S, is_torgb), sorted by theta desc."""
    layer, channel, torgb = channel_names(style_layers)
    order = np.argsort(-scores["theta"], kind="stable")
    table = {"layer": layer, "channel": channel, "index": np.arange(len(layer)), "is_torgb": torgb, **scores,
             "n": np.full(len(layer), n, dtype=np.int64)}
    return {k: np.asarray(v)[order] for k, v in table.items()}


# Locally-active channels (stylespace.md §3): gradient maps of the pooled image w.r.t. single S channels, overlapped
# with semantic region masks.

REGIONS = ("background", "face", "brows", "eyes", "nose", "mouth")  # landmark-polygon masks, id = position


def gradient_maps(G, styles, channels, grid: int = 32, chunk: int = 64):
    """|d pooled image / d s_u| averaged over RGB: float [B, len(channels), grid, grid], by batched forward-mode
    derivatives (one JVP per channel, vectorised in chunks), with zero noise so maps are a function of S only."""
    import torch
    import torch.nn.functional as F

    styles = torch.as_tensor(styles, dtype=G.input.input.dtype)
    channels = torch.as_tensor(channels, dtype=torch.long)
    pool = G.size // grid

    def pooled(v):
        return F.avg_pool2d(G.synthesis_from_styles(v[None], noise="zero"), pool)[0]

    out = torch.empty(len(styles), len(channels), grid, grid)
    for b, v in enumerate(styles):
        for start in range(0, len(channels), chunk):
            idx = channels[start:start + chunk]
            basis = torch.zeros(len(idx), len(v))
            basis[torch.arange(len(idx)), idx] = 1
            tangents = torch.func.vmap(lambda t: torch.func.jvp(pooled, (v,), (t,))[1])(basis)
            out[b, start:start + len(idx)] = tangents.abs().mean(1).detach()
    return out.numpy()


def landmark_masks(landmarks, transform, size: int, grid: int = 32):
    """Region label maps [B, grid, grid] (ids index REGIONS) from 68 landmarks in photo coordinates, drawn in the
    aligned frame: face (jaw + brows hull), then brows, eyes, nose, mouth on top. Rows without landmarks are all 0."""
    from PIL import Image, ImageDraw

    from ops.align import to_aligned_frame

    parts = {"face": list(range(0, 17)) + list(range(26, 16, -1)), "brows": [list(range(17, 22)),
             list(range(22, 27))], "eyes": [list(range(36, 42)), list(range(42, 48))],
             "nose": [27, 31, 32, 33, 34, 35], "mouth": list(range(48, 60))}
    scale = grid / size
    masks = np.zeros((len(landmarks), grid, grid), dtype=np.int64)
    for i, (lm, tf) in enumerate(zip(landmarks, transform)):
        if not np.isfinite(lm).all():
            continue
        pts = (to_aligned_frame(lm, tf) + 0.5) * scale
        canvas = Image.new("L", (grid, grid), 0)
        draw = ImageDraw.Draw(canvas)
        for name, idx in parts.items():
            region = REGIONS.index(name)
            for poly in (idx if isinstance(idx[0], list) else [idx]):
                xy = [tuple(p) for p in pts[poly]]
                # brows are lines: give them width; the rest are filled polygons
                draw.line(xy, fill=region, width=max(1, round(grid / 32))) if name == "brows" else \
                    draw.polygon(xy, fill=region)
        masks[i] = np.asarray(canvas)
    return masks


def region_scores(maps: np.ndarray, masks: np.ndarray, n_regions: int) -> np.ndarray:
    """StyleSpace's per-image overlap score n / o^2 for every (image, channel, region): o = region cells, the
    gradient map thresholded at its (1 - o/cells) quantile keeps about o cells, n = cells in both. NaN when the region
    is absent from the image. maps [B, U, g, g], masks [B, g, g] -> [B, U, n_regions]."""
    b, u = maps.shape[:2]
    cells = maps.shape[2] * maps.shape[3]
    flat = maps.reshape(b, u, cells)
    scores = np.full((b, u, n_regions), np.nan)
    for i in range(b):
        for r in range(n_regions):
            region = (masks[i] == r).reshape(cells)
            o = int(region.sum())
            if o == 0:
                continue
            threshold = np.quantile(flat[i], 1 - o / cells, axis=1, method="linear")[:, None]
            n = ((flat[i] >= threshold) & region).sum(1)
            scores[i, :, r] = n / o**2
    return scores


def region_frequency(scores: np.ndarray) -> np.ndarray:
    """F(u, r): images whose top region for channel u is r / images where region r is present. [U, n_regions]"""
    present = np.isfinite(scores[:, 0, :]).sum(0)
    filled = np.where(np.isfinite(scores), scores, -np.inf)
    top = filled.argmax(2)  # [B, U]
    counts = np.stack([(top == r).sum(0) for r in range(scores.shape[2])], axis=1)
    return np.where(present > 0, counts / np.maximum(present, 1), 0.0)


def select_local_channels(freq: np.ndarray, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Channels controlling the target regions: a = sum of F over targets, b = max of F elsewhere; keep a > 0.5 and
    a - b > 0.25, ranked by a (descending). Returns (positions into freq's rows, a)."""
    others = [r for r in range(freq.shape[1]) if r not in targets]
    a = freq[:, targets].sum(1)
    b = freq[:, others].max(1) if others else np.zeros(len(freq))
    keep = np.flatnonzero((a > 0.5) & (a - b > 0.25))
    order = keep[np.argsort(-a[keep], kind="stable")]
    return order, a[order]


def conv_channels(style_layers) -> np.ndarray:
    """S indices of the conv (not ToRGB) layers: StyleSpace's locally-active analysis drops ToRGB."""
    return np.concatenate([np.arange(l.offset, l.offset + l.width) for l in style_layers if not l.is_torgb])


def majority_masks(labels: np.ndarray, grid: int, n_labels: int) -> np.ndarray:
    """Label maps [B, H, W] (H, W multiples of grid) -> [B, grid, grid] by majority vote inside each block
    (stylespace.md §3 step 3; ties go to the lower label)."""
    b, h, w = labels.shape
    blocks = labels.reshape(b, grid, h // grid, grid, w // grid).transpose(0, 1, 3, 2, 4).reshape(b, grid, grid, -1)
    counts = np.stack([(blocks == k).sum(-1) for k in range(n_labels)], axis=-1)
    return counts.argmax(-1)
