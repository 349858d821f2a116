"""The `invert` pipeline on Ray Data: list -> read + decode + align (CPU tasks) -> invert (actor pool) -> atomic
Parquet parts. Thin: the maths lives in ops/, storage in pipelines/io.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter

import numpy as np

from ops.ingest import ingest_row, list_inputs
from ops.invert_stage import InvertStage, InvertStageConfig
from pipelines import io


INGEST_COLUMNS = ("key", "sha256", "format", "status", "error_code", "error")


def init_ray() -> None:
    """Local Ray sized so reads are never starved by the actor pool (notes: the 2-CPU hang)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
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


def ingest_align(batch: dict, size: int, align: str) -> dict:
    """CPU stage: one ingest row per input (ops.ingest.ingest_row), stacked into columns."""
    rows = [ingest_row(k, u, size, bool(skip)) for k, u, skip in zip(batch["key"], batch["uri"], batch["skip"])]
    out = {c: np.array([r[c] for r in rows], dtype=object) for c in INGEST_COLUMNS}
    out.update(width=np.array([r["width"] for r in rows], dtype=np.int64),
               height=np.array([r["height"] for r in rows], dtype=np.int64),
               image=np.stack([r["image"] for r in rows]))
    return out


class InvertActor:
    def __init__(self, config: InvertStageConfig):
        self.stage = InvertStage(config)
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        return self.stage.process(batch)


def write_parts(batch: dict, output: str, metadata: dict) -> dict:
    io.write_part(io.to_table(batch, metadata), output)
    return {"key": batch["key"], "status": batch["status"], "error_code": batch["error_code"]}


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_invert(inputs: list[str], output: str, stage_config: InvertStageConfig, align: str = "none",
               batch_size: int = 8, limit: int | None = None, overwrite: bool = False, actors: int = 1) -> dict:
    """Run (or resume) an invert job; returns the stats written to `output/stats.json`."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from models.checkpoints import load_generator
    from models.default_generator import DEFAULT_GENERATOR_PATH

    if align != "none":
        raise ValueError("--align ffhq is not available yet; use --align none")
    t0 = time.time()
    G = load_generator(stage_config.generator or str(DEFAULT_GENERATOR_PATH))  # id and size for run.json
    config = {"stage": dataclasses.asdict(stage_config), "align": align, "generator_id": G.generator_id}
    fp = fingerprint(config)
    previous = io.read_json(output, "run.json")
    if previous and previous.get("fingerprint") != fp and not overwrite:
        raise ValueError(f"{output} holds a run with another configuration (fingerprint {previous.get('fingerprint')}"
                         f" != {fp}); pass --overwrite to start over")
    if previous and overwrite:
        import fsspec

        fs, root = fsspec.core.url_to_fs(output)
        fs.rm(root, recursive=True)
    items = list_inputs(inputs)
    done = io.completed_keys(output)
    # Inputs past --limit still get a row each (status skipped), so every key appears exactly once.
    todo = [{"key": k, "uri": u, "skip": limit is not None and i >= limit}
            for i, (k, u) in enumerate(items) if k not in done]
    metadata = {"generator_id": G.generator_id, "architecture": G.architecture(), "base_level": stage_config.base_level,
                "fingerprint": fp, "style_layers": [dataclasses.asdict(layer) for layer in G.style_layers]}
    io.write_json(output, "run.json", {"fingerprint": fp, "config": config, "generator": G.architecture(),
                                       "inputs": inputs, "started": t0})
    init_ray()
    statuses = Counter()
    if todo:
        ds = ray.data.from_items(todo)
        ds = ds.map_batches(ingest_align, fn_kwargs={"size": G.size, "align": align}, batch_size=batch_size,
                            num_cpus=1)
        ds = ds.map_batches(InvertActor, fn_constructor_kwargs={"config": stage_config}, batch_size=batch_size,
                            compute=ActorPoolStrategy(size=actors), num_cpus=0.5)
        ds = ds.map_batches(write_parts, fn_kwargs={"output": output, "metadata": metadata}, batch_size=None,
                            num_cpus=1)
        for row in ds.iter_rows():
            statuses[(row["status"], row["error_code"])] += 1
    by_status, by_error = Counter(), Counter()
    for (status, code), count in statuses.items():
        by_status[status] += count
        if code:
            by_error[code] += count
    stats = {"rows_processed": sum(statuses.values()), "already_done": len(done), "by_status": dict(by_status),
             "by_error": dict(by_error), "seconds": round(time.time() - t0, 3)}
    io.write_json(output, "stats.json", stats)
    return stats
