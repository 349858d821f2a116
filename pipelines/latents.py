"""Stages on latent datasets (the output of `invert`): `edit` and `channels`. Ray Data plumbing only; the maths is
in ops/edit.py and ops/channels.py, storage in pipelines/io.py."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa

from ops.edit import APPLICABLE, Edit
from pipelines import io
from pipelines.invert import (TASK_RETRIES, actor_pool, drain, fingerprint, finish, init_ray, read_stage, versions,
                              write_batch)

SPACE_COLUMNS = {"wplus": ("wplus",), "s": ("styles",), "fwplus": ("fwplus_wplus", "fwplus_base_code")}


def invert_run(input: str) -> dict:
    run = io.read_json(input, "run.json")
    if not run or run.get("stage") != "invert":
        raise ValueError(f"{input} is not the output of `latentray invert` (no invert run.json)")
    return run


def load_generator_of(run: dict, generator: str = ""):
    """The generator a latent dataset was made with (or the one given), checked against the stored id."""
    from models.checkpoints import load_generator
    from models.default_generator import DEFAULT_GENERATOR_PATH

    path = generator or run["config"]["stage"]["generator"] or str(DEFAULT_GENERATOR_PATH)
    G = load_generator(path)
    if G.generator_id != run["config"]["generator_id"]:
        raise ValueError(f"generator {path} (id {G.generator_id[:12]}) is not the one these latents were made with "
                         f"({run['config']['generator_id'][:12]})")
    return G, path


def load_direction(path: str) -> np.ndarray:
    """A direction file (.npy, or .pt holding a tensor; loaded without executing code)."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False).astype(np.float32)
    import torch

    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} must hold a single tensor")
    return value.float().numpy()


class EditActor:
    """Loads the generator once; turns each source row into one output row per (edit, strength)."""

    def __init__(self, generator: str, space: str, edits: list[Edit], refs: dict, directions: dict, base_level: int,
                 cache_dir: str | None, channel_stats: str | None):
        import torch

        from models.checkpoints import load_generator
        from ops.edit import channel_std

        self.torch = torch
        self.G = load_generator(generator)
        self.space, self.edits, self.base_level = space, edits, base_level
        self.refs = {k: {c: torch.from_numpy(v) for c, v in cols.items()} for k, cols in refs.items()}
        self.directions = {k: torch.from_numpy(v) for k, v in directions.items()}
        self.std = None
        if any(e.kind == "channel" for e in edits):  # alpha is in units of the channel's population std
            self.std = torch.from_numpy(population_std(channel_stats)) if channel_stats else \
                channel_std(self.G, cache_dir=cache_dir)

    def __call__(self, batch: dict) -> dict:
        from ops.edit import apply_edit, render_edited
        from ops.images import encode_png, to_uint8

        torch, G = self.torch, self.G
        ok = np.flatnonzero(batch["status"] == "ok")
        position = {int(i): p for p, i in enumerate(ok)}  # batch row -> row of the edited ok sub-batch
        columns = {c: torch.from_numpy(np.ascontiguousarray(batch[c][ok])) for c in SPACE_COLUMNS[self.space]}
        rows = []
        for edit in self.edits:
            for strength in edit.strengths:
                result, error = None, ""
                if edit.kind not in APPLICABLE[self.space]:
                    error = f"{edit.kind} edits do not apply to {self.space} latents"
                elif ok.size:
                    try:
                        with torch.no_grad():
                            result = apply_edit(G, edit, strength, self.space, columns, self.refs,
                                                self.directions.get(edit.label), self.std)
                            images = [encode_png(a) for a in to_uint8(render_edited(G, self.space, result,
                                                                                    self.base_level))]
                    except (ValueError, KeyError) as exc:  # a misfit edit fails its rows, not the job
                        result, error = None, f"{type(exc).__name__}: {exc}"
                for i, key in enumerate(batch["key"]):
                    pos = position.get(i)
                    good = result is not None and pos is not None
                    row = {"key": f"{key}|{edit.label}|{strength:g}", "source_key": key, "edit": edit.label,
                           "kind": edit.kind, "strength": float(strength)}
                    if batch["status"][i] != "ok":
                        row.update(status="skipped", error_code="source_not_ok",
                                   error=f"source row {batch['status'][i]}")
                    elif not good:
                        row.update(status="skipped" if "do not apply" in error else "failed",
                                   error_code="not_applicable" if "do not apply" in error else "edit_error",
                                   error=error)
                    else:
                        row.update(status="ok", error_code="", error="")
                    for name, shape in self.output_shapes().items():
                        row[name] = result[name][pos].numpy() if good and name in result else \
                            np.full(shape, np.nan, np.float32)
                    row["image_png"] = images[pos] if good else b""
                    rows.append(row)
        return io.rows_to_columns(rows)

    def output_shapes(self) -> dict:
        G, level = self.G, self.base_level
        shapes = {"styles": (G.n_styles,)}
        if self.space != "s":
            shapes["fwplus_wplus" if self.space == "fwplus" else "wplus"] = (G.n_latent, G.style_dim)
        if self.space == "fwplus":
            shapes["fwplus_base_code"] = (G.channels[level], level, level)
        return shapes


def population_std(channels_output: str) -> np.ndarray:
    """Per-channel std of a `channels` output (population_stats.parquet), in S order."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(channels_output.rstrip("/") + "/population_stats.parquet", "rb") as f:
        table = pq.read_table(f, columns=["index", "std"])
    std = np.empty(len(table))
    std[table.column("index").to_numpy()] = table.column("std").to_numpy()
    return std


def edit_previews(output: str, edits: list[Edit], n_sources: int = 4) -> None:
    """One grid per edit: rows = the first source images, columns = strengths."""
    from ops.images import png_grid

    table = io.read_dataset(output, ["source_key", "edit", "strength", "status", "image_png"])
    cells = {(s, e, st): png for s, e, st, status, png in zip(*(table.column(c).to_pylist() for c in (
        "source_key", "edit", "strength", "status", "image_png"))) if status == "ok"}
    sources = sorted({s for s, _, _ in cells})[:n_sources]
    for edit in edits:
        grid = png_grid({(s, st): png for (s, e, st), png in cells.items() if e == edit.label}, sources,
                        [float(st) for st in edit.strengths])
        if grid is not None:
            io.write_png(output, f"previews/edit-{edit.label}.png", grid)


def run_edit(input: str, output: str, edits: list[Edit], space: str = "wplus", generator: str = "",
             batch_size: int = 8, overwrite: bool = False, actors: int | None = None, cache_dir: str | None = None,
             channel_stats: str | None = None, progress: bool = True) -> dict:
    """Apply `edits` to every ok row of a latent dataset, render them, store edited latents + PNGs + previews."""

    t0 = time.time()
    if space not in SPACE_COLUMNS:
        raise ValueError(f"space must be one of {sorted(SPACE_COLUMNS)}, got {space!r}")
    labels = [e.label for e in edits]
    if not edits or len(set(labels)) != len(labels):
        raise ValueError(f"edits need distinct names, got {labels}")
    run = invert_run(input)
    if space not in run["config"]["stage"]["spaces"]:
        raise ValueError(f"{input} holds spaces {run['config']['stage']['spaces']}, not {space}")
    G, gen_path = load_generator_of(run, generator)
    base_level = run["config"]["stage"]["base_level"]
    directions = {e.label: load_direction(e.params["path"]) for e in edits if e.kind == "direction"}
    ref_keys = {e.params[p] for e in edits for p in ("other", "a", "b") if p in e.params}
    table = io.read_rows(input, ref_keys, ["status", *SPACE_COLUMNS[space]]) if ref_keys else None
    refs = {}
    for i, key in enumerate(table.column("key").to_pylist() if table is not None else []):
        if table.column("status")[i].as_py() == "ok":
            refs[key] = {c: io.tensor(table, c)[i:i + 1] for c in SPACE_COLUMNS[space]}
    if channel_stats:
        population_std(channel_stats)  # fail before any row when the statistics are missing
    config = {"stage_name": "edit", "space": space, "edits": [dataclasses.asdict(e) for e in edits],
              "channel_stats": channel_stats,
              "upstream": run["fingerprint"], "generator_id": G.generator_id}
    fp = fingerprint(config)
    io.prepare_output(output, fp, overwrite)
    done = io.completed_keys(output, column="source_key")
    io.write_json(output, "run.json", {"stage": "edit", "fingerprint": fp, "config": config, "inputs": [input],
                                       "started": t0, "versions": versions(),
                                       "checkpoints_sha256": {"generator": G.generator_id}})
    init_ray()
    keys = [k for k in io.read_dataset(input, ["key"]).column("key").to_pylist() if k not in done]
    ds = None
    if keys:
        ds = read_stage(input, ["key", "status", *SPACE_COLUMNS[space]])
        ds = ds.filter(lambda row: row["key"] not in done) if done else ds
        ds = ds.map_batches(EditActor, fn_constructor_kwargs=dict(
            generator=gen_path, space=space, edits=edits, refs=refs, directions=directions, base_level=base_level,
            cache_dir=cache_dir, channel_stats=channel_stats), batch_size=batch_size, **actor_pool(actors))
        ds = ds.map_batches(write_batch, fn_kwargs={"output": output, "metadata": {"stage": "edit", "fingerprint": fp}},
                            batch_size=None, num_cpus=1, **TASK_RETRIES)
    counts = drain(ds, "edit", len(keys) * sum(len(e.strengths) for e in edits), progress)
    edit_previews(output, edits)
    return finish(output, t0, *counts, len(done))  # already_done counts source rows here


# ----- channels -----------------------------------------------------------------------------------------------------

def batch_styles(batch: dict, column: str, G=None) -> np.ndarray:
    """S vectors of latent rows: the stored `styles` column, or computed from `wplus` with G."""
    values = np.asarray(batch[column], dtype=np.float32)
    if column == "styles":
        return values
    import torch

    with torch.no_grad():
        return G.styles_to_vector(G.styles(torch.from_numpy(values))).numpy()


def partial_stats(batch: dict, column: str, G=None) -> dict:
    """One mergeable (count, mean, M2) aggregate of a batch's ok rows (a single output row)."""
    from ops.channels import RunningStats

    ok = np.flatnonzero(batch["status"] == "ok")
    width = G.n_styles if G is not None else np.asarray(batch[column]).shape[1]
    rows = batch_styles({column: np.asarray(batch[column])[ok]}, column, G) if ok.size else np.zeros((0, width))
    state = RunningStats(width).update(rows).state()
    return {"count": np.array([state["count"]]), "mean": state["mean"][None], "m2": state["m2"][None]}


class GeneratorActor:
    def __init__(self, generator: str, column: str, grid: int = 32):
        from models.checkpoints import load_generator

        self.G, self.column, self.grid = load_generator(generator), column, grid


class PartialStats(GeneratorActor):
    """`partial_stats` for W+ rows (S computed with the generator)."""

    def __call__(self, batch: dict) -> dict:
        return partial_stats(batch, self.column, self.G)


class LocalScores(GeneratorActor):
    """Region scores of every conv S channel for a batch of rows (gradient maps vs masks). Masks: landmark
    polygons (default), or a label-map column of the dataset ([H, W] ints < n_labels) voted down to the grid."""

    def __init__(self, generator: str, column: str, grid: int, mask_column: str | None, n_labels: int):
        super().__init__(generator, column, grid)
        self.mask_column, self.n_labels = mask_column, n_labels

    def __call__(self, batch: dict) -> dict:
        from ops.channels import REGIONS, conv_channels, gradient_maps, landmark_masks, majority_masks, region_scores

        if self.mask_column:
            masks = majority_masks(np.asarray(batch[self.mask_column]).astype(np.int64), self.grid, self.n_labels)
        else:
            masks = landmark_masks(np.asarray(batch["landmarks"]), np.asarray(batch["align_transform"]), self.G.size,
                                   self.grid)
        maps = gradient_maps(self.G, batch_styles(batch, self.column, self.G), conv_channels(self.G.style_layers),
                             self.grid)
        scores = region_scores(maps, masks, self.n_labels if self.mask_column else len(REGIONS))
        return {"key": batch["key"], "scores": scores.astype(np.float32)}


def population_stats(input: str, column: str, generator: str = "", batch_size: int = 64, actors: int | None = None):
    """One streaming pass: a (count, mean, M2) aggregate per block, merged on the driver as they arrive, so memory
    stays O(channels) however many rows there are. Stored S is reduced inside the read tasks (fused, nothing big
    crosses the object store); W+ needs the generator, on the actor pool."""

    from ops.channels import RunningStats

    source = read_stage(input, ["status", column])
    if column == "styles":
        partials = source.map_batches(partial_stats, fn_kwargs={"column": column}, batch_size=None, **TASK_RETRIES)
    else:
        partials = source.map_batches(PartialStats, fn_constructor_kwargs={"generator": generator, "column": column},
                                      batch_size=batch_size, **actor_pool(actors))
    population = None
    for part in partials.iter_rows():
        part_stats = RunningStats.from_state({"count": part["count"], "mean": part["mean"], "m2": part["m2"]})
        population = part_stats if population is None else population.merge(part_stats)
    return population


FILTER_OPS = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
              ">=": np.greater_equal}


def filter_keys(input: str, expression: str) -> list[str]:
    """Keys of the rows matching `<column> <op> <value>` (op one of == != < <= > >=), e.g. `smile > 0.5`."""
    import yaml

    parts = expression.split(None, 2)
    if len(parts) != 3 or parts[1] not in FILTER_OPS:
        raise ValueError(f"exemplar filter must be `<column> <op> <value>` with op in {list(FILTER_OPS)}, "
                         f"got {expression!r}")
    column, op, value = parts
    table = io.read_dataset(input, ["key", column])
    keep = FILTER_OPS[op](np.asarray(table.column(column).to_pylist()), yaml.safe_load(value))
    return [k for k, good in zip(table.column("key").to_pylist(), keep) if good]


def run_channels(input: str, output: str, exemplars: list[str] | None = None, exemplar_column: str | None = None,
                 local_sample: int = 0, generator: str = "", batch_size: int = 64, grid: int = 32, top: int = 30,
                 overwrite: bool = False, actors: int | None = None, exemplar_filter: str | None = None,
                 mask_column: str | None = None, mask_labels: int = 0) -> dict:
    """Population statistics of S, attribute-specific channels for an exemplar set, locally-active channels."""

    from ops.channels import (REGIONS, attribute_scores, channel_names, channel_table, conv_channels,
                              region_frequency, select_local_channels)
    from ops.images import bar_chart, heat_map

    t0 = time.time()
    run = invert_run(input)
    G, gen_path = load_generator_of(run, generator)
    spaces = run["config"]["stage"]["spaces"]
    column = "styles" if "s" in spaces else "wplus" if "wplus" in spaces else None
    if column is None:
        raise ValueError(f"{input} has no S or W+ latents (spaces {spaces}); channels need one of them")
    if mask_column and mask_labels < 2:
        raise ValueError("--mask-column needs --mask-labels N (the number of labels in the maps)")
    config = {"stage_name": "channels", "exemplars": sorted(exemplars or []), "exemplar_column": exemplar_column,
              "exemplar_filter": exemplar_filter, "mask_column": mask_column, "mask_labels": mask_labels,
              "local_sample": local_sample, "grid": grid, "upstream": run["fingerprint"]}
    fp = fingerprint(config)
    io.prepare_output(output, fp, overwrite)
    io.write_json(output, "run.json", {"stage": "channels", "fingerprint": fp, "config": config, "inputs": [input],
                                       "started": t0, "versions": versions(),
                                       "checkpoints_sha256": {"generator": G.generator_id}})
    init_ray()
    population = population_stats(input, column, gen_path, batch_size, actors)
    if population is None or population.count == 0:
        raise ValueError(f"{input} has no ok rows")
    io.write_table(output, "population_stats.parquet", pa.table(population.to_columns()))
    stats = {"population": population.count}
    if exemplar_filter:
        exemplars = filter_keys(input, exemplar_filter)
    if exemplars or exemplar_column:
        if exemplar_column:
            table = io.read_dataset(input, ["key", "status", exemplar_column])
            exemplars = [k for k, s, v in zip(*(table.column(c).to_pylist() for c in ("key", "status",
                                                                                        exemplar_column))) if v]
        rows = io.read_rows(input, exemplars, ["status", column])
        ok = np.array([s == "ok" for s in rows.column("status").to_pylist()], dtype=bool)
        if not ok.any():
            raise ValueError("none of the exemplar keys is an ok row of the input")
        s = batch_styles({column: io.tensor(rows, column)[ok]}, column, G)
        scores = attribute_scores(s, population.mean_, population.std())
        table = channel_table(G.style_layers, scores, int(ok.sum()))
        io.write_table(output, "attribute_channels.parquet", pa.table(table))
        head = slice(0, top)
        labels = [f"{l}[{c}]{' rgb' if t else ''}" for l, c, t in zip(table["layer"][head], table["channel"][head],
                                                                      table["is_torgb"][head])]
        io.write_png(output, "previews/attribute_channels.png", bar_chart(labels, table["theta"][head]))
        stats["exemplars"] = int(ok.sum())
    if local_sample:
        table = io.read_dataset(input, ["key", "status", "landmarks"])
        lms = io.tensor(table, "landmarks")
        usable = [k for k, s, lm in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), lms)
                  if s == "ok" and (mask_column or np.isfinite(lm).all())]
        chosen = set(sorted(usable)[:local_sample])
        if not chosen:
            raise ValueError("locally-active channels need ok rows with landmarks (run invert with --align ffhq) "
                             "or a --mask-column")
        masks = [mask_column] if mask_column else ["landmarks", "align_transform"]
        ds = read_stage(input, ["key", column, *masks])
        ds = ds.filter(lambda row: row["key"] in chosen)
        ds = ds.map_batches(LocalScores, fn_constructor_kwargs={"generator": gen_path, "column": column,
                                                                "grid": grid, "mask_column": mask_column,
                                                                "n_labels": mask_labels},
                            batch_size=4, **actor_pool(actors))
        scores = np.stack([row["scores"] for row in ds.iter_rows()])
        freq = region_frequency(scores)
        index = conv_channels(G.style_layers)
        layer, channel, _ = channel_names(G.style_layers)
        layer, channel = layer[index], channel[index]
        regions = [f"label_{k}" for k in range(mask_labels)] if mask_column else list(REGIONS)
        out = {"layer": layer, "channel": channel, "index": index,
               **{f"freq_{r}": freq[:, i] for i, r in enumerate(regions)}}
        rows_for_map = []
        for i, region in enumerate(regions[1:], start=1):  # region 0 is the background
            picked, a = select_local_channels(freq, [i])
            rank = np.full(len(index), -1)
            rank[picked] = np.arange(len(picked))
            out[f"rank_{region}"] = rank
            rows_for_map += list(picked[:5])
        io.write_table(output, "local_channels.parquet", pa.table(out))
        if rows_for_map:
            io.write_png(output, "previews/local_channels.png", heat_map(
                freq[rows_for_map], [f"{layer[r]}[{channel[r]}]" for r in rows_for_map], regions))
        stats["local_images"] = len(scores)
    stats["seconds"] = round(time.time() - t0, 3)
    io.write_json(output, "stats.json", stats)
    return stats
