"""The `ingest` and `invert` pipelines on Ray Data: list -> read + decode + align (CPU tasks) -> invert (actor pool)
-> atomic Parquet parts; `invert` also reads the aligned rows of an `ingest` output. Thin: the maths lives in ops/,
storage in pipelines/io.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from collections import Counter

import numpy as np

from ops.align import AlignConfig, check_backend
from ops.images import preview_grid
from ops.ingest import ingest_row, list_inputs
from ops.invert_stage import InvertStage, InvertStageConfig
from pipelines import io


TEXT_COLUMNS = ("key", "sha256", "format", "status", "error_code", "error")
ARRAY_COLUMNS = {"width": np.int64, "height": np.int64, "n_faces": np.int64, "face_score": np.float32,
                 "landmarks": np.float32, "quad": np.float32, "align_transform": np.float32, "image": np.uint8,
                 "original": np.uint8}
RETRIES = 3  # a crashed task or actor is retried this many times, then its job fails (never retried forever)
# Ray 2.60 has no named parameters for retries yet (it warns that free remote args go away in 2.64).
TASK_RETRIES = {"max_retries": RETRIES}
ACTOR_RETRIES = {"max_restarts": RETRIES, "max_task_retries": RETRIES}
MAX_PREVIEWS = 8  # preview PNGs per run (one per part, first parts written)


def init_ray() -> None:
    """Local Ray sized so reads are never starved by the actor pool (notes: the 2-CPU hang)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")  # see TASK_RETRIES
    import ray
    import ray.data
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     object_store_memory=512 * 1024**2)
    ctx = ray.data.DataContext.get_current()
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def read_stage(path: str, columns: list[str] | None = None):
    """A stage output's parts as a Ray dataset (only `columns` when given)."""
    import ray.data

    ds = ray.data.read_parquet(io.part_paths(path), filesystem=io.arrow_filesystem(path))
    return ds.select_columns(columns) if columns else ds


def ingest_align(batch: dict, size: int, align: AlignConfig) -> dict:
    """CPU stage: one ingest row per input (ops.ingest.ingest_row), stacked into columns."""
    rows = [ingest_row(k, u, size, bool(skip), align=align)
            for k, u, skip in zip(batch["key"], batch["uri"], batch["skip"])]
    out = {c: np.array([r[c] for r in rows], dtype=object) for c in TEXT_COLUMNS}
    out.update({c: np.stack([np.asarray(r[c], dtype=t) for r in rows]) for c, t in ARRAY_COLUMNS.items()})
    return out


def actor_pool(actors: int | None) -> dict:
    """map_batches arguments of a model stage: one actor per GPU when the cluster has GPUs (each holding one),
    else `actors` CPU actors (default 1) at half a CPU so decode/align tasks keep running beside them."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return {"compute": ActorPoolStrategy(size=actors or gpus), "num_gpus": 1, "num_cpus": 1, **ACTOR_RETRIES}
    return {"compute": ActorPoolStrategy(size=actors or 1), "num_cpus": 0.5, **ACTOR_RETRIES}


class InvertActor:
    def __init__(self, config: InvertStageConfig):
        self.stage = InvertStage(config)
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        return self.stage.process(batch)


def write_batch(batch: dict, output: str, metadata: dict, preview_columns: tuple[str, ...] = (),
                preview_rows: int = 4) -> dict:
    """Final task of every stage: one atomic part per batch, plus a preview grid (ok rows x `preview_columns`)
    for the first parts of a run. Returns what the driver counts."""
    path = io.write_part(io.to_table(batch, metadata), output)
    rows = np.flatnonzero(batch["status"] == "ok")[:preview_rows]
    if preview_columns and rows.size and io.count_previews(output) < MAX_PREVIEWS:
        io.write_png(output, f"previews/{io.stem(path)}.png", preview_grid([batch[c] for c in preview_columns], rows))
    return {"key": batch["key"], "status": batch["status"], "error_code": batch["error_code"]}


def write_parts(batch: dict, output: str, metadata: dict, spaces: tuple[str, ...], keep_aligned: bool) -> dict:
    """ingest keeps the aligned pixels; invert previews original | aligned | reconstruction per space."""
    batch = {**batch, "aligned": batch["image"]} if keep_aligned else batch
    return write_batch(batch, output, metadata, ("original", "image", *(f"recon_{s}" for s in spaces)))


def drain(ds, stage: str, total: int, progress: bool = True) -> tuple[Counter, Counter]:
    """Run a stage's dataset to the end on the driver: rows by status and by error code, with the progress line."""
    by_status, by_error = Counter(), Counter()
    if ds is not None and total:
        bar = Progress(stage, total, progress)
        for row in ds.iter_rows():
            by_status[row["status"]] += 1
            if row["error_code"]:
                by_error[row["error_code"]] += 1
            bar.update()
    return by_status, by_error


def finish(output: str, t0: float, by_status: Counter, by_error: Counter, already_done: int) -> dict:
    """stats.json of a run (and its return value)."""
    seconds = time.time() - t0
    n = sum(by_status.values())
    stats = {"rows_processed": n, "already_done": already_done, "by_status": dict(by_status),
             "by_error": dict(by_error), "seconds": round(seconds, 3), "rows_per_second": round(n / max(seconds, 1e-9), 4)}
    io.write_json(output, "stats.json", stats)
    return stats


def from_ingested(batch: dict, done: set[str], allowed: set[str] | None) -> dict:
    """Rows of an `ingest` output as invert input: finished keys dropped, keys past --limit marked skipped."""
    keep = np.array([k not in done for k in batch["key"]], dtype=bool)
    out = {k: np.asarray(v)[keep] for k, v in batch.items() if k != "aligned"}
    out["image"] = out["original"] = np.asarray(batch["aligned"])[keep]
    out["status"], out["error_code"], out["error"] = (np.array(out[c], dtype=object, copy=True)
                                                      for c in ("status", "error_code", "error"))
    if allowed is not None:
        past = np.array([k not in allowed for k in out["key"]], dtype=bool) & (out["status"] == "ok")
        out["status"][past], out["error_code"][past], out["error"][past] = "skipped", "limit", "beyond --limit"
    return out


def ingest_source(path: str) -> dict | None:
    """run.json of an `ingest` output given as --input (then invert reads its aligned rows), else None."""
    run = io.read_json(path, "run.json") if not any(c in path for c in "*?[") else None
    return run if run and run.get("stage") == "ingest" else None


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict:
    """Versions of what computed the rows (run.json provenance)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("latentray", "torch", "ray", "numpy", "pyarrow", "pillow", "lpips", "dlib-bin"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def checkpoint_digests(stage_config: InvertStageConfig | None, align: AlignConfig, generator_id: str | None,
                       aligns: bool) -> dict:
    """sha256 of every model file the run used (the generator id is already its checkpoint's sha256)."""
    from models.checkpoints import file_sha256
    from ops.align import LANDMARKS_68, face_models_dir

    digests = {"generator": generator_id} if generator_id else {}
    if stage_config is not None and stage_config.basecode_encoder:
        digests["basecode_encoder"] = file_sha256(stage_config.basecode_encoder)
    if aligns and align.mode == "ffhq":
        digests["landmarks"] = file_sha256(str(face_models_dir() / LANDMARKS_68))
    return digests


class Progress:
    """One status line on stderr, at most every few seconds: rows done / to do, rate, ETA."""

    def __init__(self, stage: str, total: int, enabled: bool = True, every: float = 5.0):
        self.stage, self.total, self.enabled, self.every = stage, total, enabled, every
        self.done, self.t0, self.last = 0, time.time(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            line = f"{self.stage}: {self.done}/{self.total} rows, {rate:.2f} rows/s, ETA {eta:.0f} s"
            if sys.stderr.isatty():  # one line rewritten in place; logs get one line per update
                print(f"\r{line}", end="\n" if self.done == self.total else "", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)


def run_invert(inputs: list[str], output: str, stage_config: InvertStageConfig | None,
               align: AlignConfig = AlignConfig(), batch_size: int = 8, limit: int | None = None,
               overwrite: bool = False, actors: int | None = None, progress: bool = True, size: int | None = None,
               dry_run: bool = False) -> dict:
    """Run (or resume) a job; returns the stats written to `output/stats.json`.

    Inputs are photos (dirs, globs, files, s3://), or one `ingest` output (its aligned rows are inverted).
    `stage_config=None` runs the `ingest` stage alone: decode + align, aligned pixels stored, at `size` (default: the
    generator's resolution)."""
    import ray.data

    from models.checkpoints import load_generator
    from models.default_generator import DEFAULT_GENERATOR_PATH

    t0 = time.time()
    stage = "invert" if stage_config is not None else "ingest"
    upstream = ingest_source(inputs[0]) if len(inputs) == 1 else None
    if upstream is None:
        check_backend(align)  # a missing landmark model is a configuration error, not a failed row per image
    generator = stage_config.generator if stage_config is not None else ""
    G = load_generator(generator or str(DEFAULT_GENERATOR_PATH))  # id and size for run.json
    size = size or G.size
    if upstream is not None and upstream["config"]["size"] != G.size:
        raise ValueError(f"{inputs[0]} was aligned at {upstream['config']['size']} px, the generator makes {G.size}")
    config = {"stage_name": stage, "stage": dataclasses.asdict(stage_config) if stage_config else None, "size": size,
              "align": upstream["config"]["align"] if upstream else dataclasses.asdict(align),
              "upstream": upstream["fingerprint"] if upstream else None,
              "generator_id": G.generator_id if stage_config else None}
    fp = fingerprint(config)
    resumable = io.prepare_output(output, fp, overwrite, dry_run)
    if dry_run:  # what would run; nothing written, nothing repaired
        done = io.completed_keys(output, repair=False) if resumable else set()
        keys = [k for k, _ in list_inputs(inputs)] if upstream is None else \
            io.read_dataset(inputs[0], ["key"]).column("key").to_pylist()
        return {"dry_run": True, "stage": stage, "fingerprint": fp, "config": config, "inputs": len(keys),
                "already_done": len(done & set(keys)), "to_do": len(set(keys) - done)}
    done = io.completed_keys(output)
    metadata = {"stage": stage, "fingerprint": fp}
    if stage_config is not None:
        metadata.update(generator_id=G.generator_id, architecture=G.architecture(), base_level=stage_config.base_level,
                        style_layers=[dataclasses.asdict(layer) for layer in G.style_layers])
    digests = checkpoint_digests(stage_config, align, G.generator_id if stage_config else None, upstream is None)
    io.write_json(output, "run.json", {"stage": stage, "fingerprint": fp, "config": config, "inputs": inputs,
                                       "generator": G.architecture() if stage_config else None, "started": t0,
                                       "versions": versions(), "checkpoints_sha256": digests})
    init_ray()
    if upstream is None:
        items = list_inputs(inputs)
        # Inputs past --limit still get a row each (status skipped), so every key appears exactly once.
        todo = [{"key": k, "uri": u, "skip": limit is not None and i >= limit}
                for i, (k, u) in enumerate(items) if k not in done]
        ds = ray.data.from_items(todo) if todo else None
        if ds is not None:
            ds = ds.map_batches(ingest_align, fn_kwargs={"size": size, "align": align}, batch_size=batch_size,
                                num_cpus=1, **TASK_RETRIES)
    else:
        keys = sorted(io.read_dataset(inputs[0], ["key"]).column("key").to_pylist())
        allowed = set(keys[:limit]) if limit is not None else None
        todo = [k for k in keys if k not in done]
        ds = read_stage(inputs[0]) if todo else None
        if ds is not None:
            ds = ds.map_batches(from_ingested, fn_kwargs={"done": done, "allowed": allowed}, batch_size=batch_size)
    if ds is not None:
        if stage_config is not None:
            ds = ds.map_batches(InvertActor, fn_constructor_kwargs={"config": stage_config}, batch_size=batch_size,
                                **actor_pool(actors))
        spaces = stage_config.spaces if stage_config else ()
        ds = ds.map_batches(write_parts, fn_kwargs={"output": output, "metadata": metadata, "spaces": spaces,
                                                    "keep_aligned": stage_config is None},
                            batch_size=None, num_cpus=1, **TASK_RETRIES)
    return finish(output, t0, *drain(ds, stage, len(todo), progress), len(done))
