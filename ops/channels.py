"""Channel-detection statistics over S populations (stylespace.md §1.1, §4). No Ray.

`RunningStats` is an exact, mergeable streaming aggregate (count, mean, M2; Chan et al.'s pairwise update): blocks
of any size on any worker combine into the statistics of the whole population, in O(channels) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ops.stage import Aggregate, Column, Context, Plan, Resources, Result


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


# ----- the channels stage (an aggregate over an invert output) ------------------------------------------------------
FILTER_OPS = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
              ">=": np.greater_equal}


def parse_filter(expression: str) -> tuple[str, str, object]:
    """`<column> <op> <value>` (op one of == != < <= > >=), e.g. `smile > 0.5` -> (column, op, value)."""
    import yaml

    parts = expression.split(None, 2)
    if len(parts) != 3 or parts[1] not in FILTER_OPS:
        raise ValueError(f"exemplar filter must be `<column> <op> <value>` with op in {list(FILTER_OPS)}, "
                         f"got {expression!r}")
    return parts[0], parts[1], yaml.safe_load(parts[2])


def filter_keys(columns: dict, expression: str) -> list[str]:
    """Keys of the rows of `columns` (key + the filtered column) matching the expression."""
    column, op, value = parse_filter(expression)
    keep = FILTER_OPS[op](np.asarray(list(columns[column])), value)
    return [k for k, good in zip(columns["key"], keep) if good]


def batch_styles(values: np.ndarray, column: str, G=None) -> np.ndarray:
    """S vectors of latent rows: the stored `styles` column as is, or computed from `wplus` with G."""
    values = np.asarray(values, dtype=np.float32)
    if column == "styles":
        return values
    import torch

    with torch.no_grad():
        wplus = torch.from_numpy(values).to(G.device)
        return G.styles_to_vector(G.styles(wplus)).cpu().numpy()


@dataclass(frozen=True)
class ChannelsConfig:
    exemplars: str = ""  # file with one key per line: the attribute's exemplar rows
    exemplar_column: str = ""  # boolean column of the input marking exemplar rows
    exemplar_filter: str = ""  # exemplar rows by a condition on a column, e.g. "smile > 0.5"
    local_sample: int = 0  # ok rows with landmarks (or a mask column) for locally-active channels (0: none)
    mask_column: str = ""  # label-map column [H, W] for locally-active channels ("": masks from the landmarks)
    mask_labels: int = 0  # number of labels in the --mask-column maps
    grid: int = 32  # gradient-map resolution (StyleSpace: 32)
    top: int = 30  # channels in the bar chart
    generator: str = ""  # checkpoint ("": the one invert recorded; its id is checked either way)


class ChannelsStage(Aggregate):
    """One streaming pass over an invert output: per-channel population mean/std of S (exact, mergeable), the
    exemplars' S rows for attribute-specific channels, and region scores of the sampled rows for locally-active
    channels. Needs the generator (an actor pool) only for W+ rows or gradient maps."""

    name = "channels"
    Config = ChannelsConfig
    help = "StyleSpace channel statistics of an invert output (population, attribute, local channels)"
    examples = ("latentray channels --input out/latents --output out/channels --exemplars smiling_keys.txt",
                "latentray channels --input out/latents --output out/channels --local-sample 200")

    def prepare(self, context: Context) -> Plan:
        from ops.latents import reading_latents

        cfg = self.config
        source, G = reading_latents(context, "channels", cfg.generator)
        column = "styles" if "s" in source.spaces else "wplus" if "wplus" in source.spaces else None
        if column is None:
            raise ValueError(f"the input has no S or W+ latents (spaces {list(source.spaces)}); channels need one of "
                             "them")
        if cfg.mask_column and cfg.mask_labels < 2:
            raise ValueError("--mask-column needs --mask-labels N (the number of labels in the maps)")
        exemplar_keys = self.choose_exemplars(context)
        local_keys = self.choose_local_sample(context)
        masks = ((Column(cfg.mask_column, None, None),) if cfg.mask_column else
                 (Column("landmarks", "float32", (68, 2)), Column("align_transform", "float32", (2, 3)))) \
            if cfg.local_sample else ()
        models = column == "wplus" or bool(local_keys)
        return Plan(kind="aggregate", inputs=(Column(column, "float32", None), *masks), batch_size=64,
                    resources=Resources(num_cpus=1, num_gpus=1 if models else 0),
                    checkpoints={"generator": G.generator_id},
                    fingerprint={"exemplar_keys": sorted(exemplar_keys or []), "local_keys": sorted(local_keys)},
                    prepared={"column": column, "generator": source.generator, "style_layers": G.style_layers,
                              "width": G.n_styles, "exemplar_keys": exemplar_keys, "local_keys": local_keys})

    def choose_exemplars(self, context: Context) -> set[str] | None:
        cfg = self.config
        if (cfg.exemplar_filter or cfg.exemplar_column) and context.read_input is None:
            return set()  # the input does not exist yet (a pipeline file checked before it runs)
        if cfg.exemplar_filter:
            column = parse_filter(cfg.exemplar_filter)[0]
            return set(filter_keys(context.read_input(None, [column]), cfg.exemplar_filter))
        if cfg.exemplar_column:
            table = context.read_input(None, [cfg.exemplar_column])
            return {k for k, v in zip(table["key"], table[cfg.exemplar_column]) if v}
        if cfg.exemplars:
            return {line.strip() for line in context.read_bytes(cfg.exemplars).decode().splitlines() if line.strip()}
        return None

    def choose_local_sample(self, context: Context) -> set[str]:
        """The first `local_sample` ok rows by key that have landmarks (or any ok rows, with a mask column)."""
        cfg = self.config
        if not cfg.local_sample or context.read_input is None:
            return set()
        table = context.read_input(None, ["status", "landmarks"] if not cfg.mask_column else ["status"])
        usable = [k for i, k in enumerate(table["key"]) if table["status"][i] == "ok" and
                  (cfg.mask_column or np.isfinite(table["landmarks"][i]).all())]
        if not usable:
            raise ValueError("locally-active channels need ok rows with landmarks (run invert with --align ffhq) "
                             "or a --mask-column")
        return set(sorted(usable)[:cfg.local_sample])

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from ops.latents import generator_on

        super().setup(plan, device)
        self.G = generator_on(plan.prepared["generator"], device) if plan.on_actors else None

    # what prepare found, as the plan carries it
    column = property(lambda self: self.plan.prepared["column"])
    style_layers = property(lambda self: self.plan.prepared["style_layers"])
    width = property(lambda self: self.plan.prepared["width"])
    exemplar_keys = property(lambda self: self.plan.prepared["exemplar_keys"])
    local_keys = property(lambda self: self.plan.prepared["local_keys"])

    def partial(self, batch: dict[str, np.ndarray]) -> dict:
        ok = np.flatnonzero(np.asarray(batch["status"]) == "ok")
        keys = [str(k) for k in np.asarray(batch["key"])[ok]]
        s = batch_styles(np.asarray(batch[self.column])[ok], self.column, self.G) if ok.size else \
            np.zeros((0, self.width), np.float32)
        state = {"stats": RunningStats(self.width).update(s), "exemplars": {}, "local": {}}
        if self.exemplar_keys is not None:
            state["exemplars"] = {k: s[i] for i, k in enumerate(keys) if k in self.exemplar_keys}
        local = [i for i, k in enumerate(keys) if k in self.local_keys]
        if local:
            state["local"] = dict(zip([keys[i] for i in local], self.local_scores(batch, ok[local], s[local])))
        return state

    def local_scores(self, batch: dict, rows: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Region scores [N, conv channels, regions] of rows: gradient maps overlapped with their region masks."""
        cfg, G = self.config, self.G
        if cfg.mask_column:
            masks = majority_masks(np.stack(batch[cfg.mask_column][rows]).astype(np.int64), cfg.grid,
                                   cfg.mask_labels)
        else:
            masks = landmark_masks(np.asarray(batch["landmarks"])[rows], np.asarray(batch["align_transform"])[rows],
                                   G.size, cfg.grid)
        maps = gradient_maps(G, s, conv_channels(self.style_layers), cfg.grid)
        return region_scores(maps, masks, cfg.mask_labels if cfg.mask_column else len(REGIONS))

    def merge(self, a: dict, b: dict) -> dict:
        return {"stats": a["stats"].merge(b["stats"]), "exemplars": {**a["exemplars"], **b["exemplars"]},
                "local": {**a["local"], **b["local"]}}

    def finish(self, state: dict | None) -> Result:
        from ops.images import bar_chart, heat_map

        cfg = self.config
        population = state["stats"] if state else RunningStats(self.width)
        if population.count == 0:
            raise ValueError("the input has no ok rows")
        result = Result(tables={"population_stats": population.to_columns()}, stats={"population": population.count})
        if self.exemplar_keys is not None:
            if not state["exemplars"]:
                raise ValueError("none of the exemplar keys is an ok row of the input")
            s = np.stack([state["exemplars"][k] for k in sorted(state["exemplars"])])
            table = channel_table(self.style_layers, attribute_scores(s, population.mean_, population.std()), len(s))
            result.tables["attribute_channels"] = table
            head = slice(0, cfg.top)
            labels = [f"{l}[{c}]{' rgb' if t else ''}" for l, c, t in zip(table["layer"][head],
                                                                          table["channel"][head],
                                                                          table["is_torgb"][head])]
            result.previews["attribute_channels"] = bar_chart(labels, table["theta"][head])
            result.stats["exemplars"] = len(s)
        if self.local_keys:
            scores = np.stack([state["local"][k] for k in sorted(state["local"])])
            table, picked = local_channel_table(self.style_layers, scores, cfg.mask_labels if cfg.mask_column else 0)
            result.tables["local_channels"] = table
            if picked:
                regions = [c[len("freq_"):] for c in table if c.startswith("freq_")]
                freq = np.stack([table[f"freq_{r}"] for r in regions], axis=1)
                result.previews["local_channels"] = heat_map(
                    freq[picked], [f"{table['layer'][r]}[{table['channel'][r]}]" for r in picked], regions)
            result.stats["local_images"] = len(scores)
        return result


def local_channel_table(style_layers, scores: np.ndarray, mask_labels: int) -> tuple[dict, list[int]]:
    """Per conv channel: layer, channel, S index, region frequencies and, per region, the rank of the channels
    StyleSpace's rule selects (-1: not selected). Also returns up to five selected rows per region (heat map)."""
    freq = region_frequency(scores)
    index = conv_channels(style_layers)
    layer, channel, _ = channel_names(style_layers)
    regions = [f"label_{k}" for k in range(mask_labels)] if mask_labels else list(REGIONS)
    table = {"layer": layer[index], "channel": channel[index], "index": index,
             **{f"freq_{r}": freq[:, i] for i, r in enumerate(regions)}}
    shown = []
    for i, region in enumerate(regions[1:], start=1):  # region 0 is the background
        picked, _ = select_local_channels(freq, [i])
        rank = np.full(len(index), -1)
        rank[picked] = np.arange(len(picked))
        table[f"rank_{region}"] = rank
        shown += list(picked[:5])
    return table, shown
