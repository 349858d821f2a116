"""The one stage runtime, and the only module that imports Ray.

`run_stage(stage, source, output, options)`: fingerprint -> lock -> resume scan -> read -> map -> atomic write ->
stats -> previews, the same for every stage (ops/stage.py holds the contract). Row stages stream: the source's rows
(photos decoded and aligned by CPU tasks, or the parts of an earlier stage's output) go through the stage (an actor
pool for model stages, tasks otherwise) into one atomic part per batch. Aggregates reduce every batch to a partial
state, merged on the driver as they arrive, and write their result tables at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ops.stage import DEFERRED_CODES, ROW_COLUMNS, Aggregate, Context, Stage, config_dict, is_transient, objects
from pipelines import io
from pipelines.lock import LOCK_NAME, OutputLock

RETRIES = 3  # a crashed task or actor is retried this many times, then its job fails (never retried forever)
# Ray 2.60 has no named parameters for retries yet (it warns that free remote args go away in 2.64).
TASK_RETRIES = {"max_retries": RETRIES}
ACTOR_RETRIES = {"max_restarts": RETRIES, "max_task_retries": RETRIES}
MAX_PREVIEWS = 8  # preview grids per run (one per part, the first parts written)
SUMMARY_SOURCES = 4  # inputs shown in the grids made across a whole output (edits x strengths, faces x styles)
NO_PROGRESS_TIMEOUT = 1800  # s without progress before Ray Data gives up (a GPU node may take minutes to join)


@dataclass(frozen=True)
class RunOptions:
    batch_size: int | None = None  # rows per batch (None: the stage's own default)
    limit: int | None = None  # process only the first N inputs by key; the rest are rows with status skipped
    actors: int | None = None  # most model actors at once (None: 1 on CPU, one per GPU the cluster has or can add)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPU actors when the cluster has or can add GPUs
    overwrite: bool = False  # discard an output that holds another configuration or schema
    retry_failed: bool = False  # redo every failed row (a rerun redoes transient failures by itself)
    wait: bool = False  # wait while another run holds the output, instead of exiting at once
    dry_run: bool = False  # say what would run (inputs, done, to redo, to do) and stop; writes nothing
    shared_output: bool = False  # the local --output is a mount every node of the cluster shares
    resources: dict = field(default_factory=dict)  # custom Ray resources each model actor needs, e.g. {"pin": 1}
    progress: bool = True  # a progress line on stderr every few seconds


class StageFailed(RuntimeError):
    """The Ray job of a stage failed (e.g. an actor crashing on every retry); the message names the stage."""


# ----- Ray ------------------------------------------------------------------------------------------------------------
def init_ray() -> None:
    """Local Ray sized so reads are never starved by the actor pool (notes: the 2-CPU hang), or the cluster at
    RAY_ADDRESS; canonical tensor columns; quiet logs."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray
    import ray.data
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    # after importing ray, whose own filter would otherwise come first (see TASK_RETRIES)
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            try:
                ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                         object_store_memory=512 * 1024**2)
            except ValueError as exc:  # a cluster started with `ray start` on this machine: join it as it is
                if "existing cluster" not in str(exc):
                    raise
                ray.init(log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT


def cluster_gpus() -> tuple[int, int]:
    """(GPUs in the cluster now, most GPUs its autoscaler can add up to; 0 without an autoscaler)."""
    import ray

    now = int(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state  # the autoscaler's node types (what Ray Data itself reads)

        most = int((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception:
        most = 0
    return now, max(now, most)


def can_add_nodes() -> bool:
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() is not None
    except Exception:
        return False


def check_output_location(output: str, options: RunOptions) -> None:
    """A local output on a cluster spanning several hosts would scatter its parts over the machines."""
    import ray

    if not io.is_local(output) or options.shared_output:
        return
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(hosts) > 1 or can_add_nodes():
        raise ValueError(f"--output {output} is a local path, but the Ray cluster spans {len(hosts)} host(s) and "
                         "may add more: its parts would scatter over the machines. Use s3://..., or a mount every "
                         "node shares with --shared-output")


def cpu_actor_threads(actors: int) -> int:
    """Intra-op threads (and declared CPUs) of each CPU model actor: the cores of the smallest node, shared by the
    actors that may land on it, and never all of its logical CPUs (one stays free for the read, decode/align and
    write tasks: without it the pipeline starves; notes: the 2-CPU hang). On one machine the cores are the physical
    ones: local Ray over-commits its logical CPUs so those tasks always find a slot, and actors never
    oversubscribe the cores."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    logical = int(min(n["Resources"]["CPU"] for n in nodes)) if nodes else 1
    one_host = len({n["NodeManagerAddress"] for n in nodes}) <= 1
    cores = min(logical - 1, os.cpu_count() or 1) if one_host else logical - 1
    return max(1, cores // max(1, actors))


def pool(size: int):
    """An autoscaling actor pool (1..size) whose UDF runs on each actor's main thread, one call at a time: the
    thread its models were set up on. Ray Data's default hands every call to a second thread, where oneDNN's
    multi-threaded convolutions ran 2.5x slower than on the thread that set them up (BENCHMARKS.md)."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=1, max_size=size, enable_true_multi_threading=True,
                             max_concurrent_calls_per_actor=1)


def actor_pool(stage: Stage, options: RunOptions) -> tuple[dict, str]:
    """(map_batches arguments, device for setup) of a model stage. GPU actors declare one GPU each and scale from
    one to as many as the cluster has or its autoscaler can add; CPU actors declare the CPUs whose threads they use
    (cpu_actor_threads)."""
    now, most = cluster_gpus() if options.device != "cpu" else (0, 0)
    extra = {"resources": dict(options.resources)} if options.resources else {}
    if options.device == "cuda" or (options.device == "auto" and most):
        size = options.actors or max(most, 1)
        return {"compute": pool(size), "num_gpus": stage.resources.num_gpus or 1,
                "num_cpus": stage.resources.num_cpus, **ACTOR_RETRIES, **extra}, "auto"
    size = options.actors or 1
    return {"compute": pool(size), "num_cpus": cpu_actor_threads(size),
            **ACTOR_RETRIES, **extra}, "cpu"


class StageActor:
    """The one actor wrapper: a stage set up once per actor (models on its device), then batch after batch."""

    def __init__(self, stage: Stage, device: str):
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))  # the CPUs this actor declared, no more (Ray also sets OMP's)
        self.stage = stage
        stage.setup(device)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        if isinstance(self.stage, Aggregate):
            return {"state": objects([pickle.dumps(self.stage.partial(batch))])}
        out = self.stage.process(batch)
        n = len(out["key"])
        out["_node"] = objects([self.node] * n)
        out["_rss_mb"], out["_gpu_mb"] = np.full(n, peak_rss_mb()), np.full(n, peak_gpu_mb())
        return out


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float:
    """Peak CUDA memory torch allocated in this process (MiB; 0 without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def run_task(batch: dict, stage: Stage) -> dict:
    """A CPU stage as a stateless task (its setup is cheap by contract; per-process caches hold the rest)."""
    stage.setup("cpu")
    if isinstance(stage, Aggregate):
        return {"state": objects([pickle.dumps(stage.partial(batch))])}
    return stage.process(batch)


def map_stage(ds, stage: Stage, options: RunOptions):
    batch_size = options.batch_size or stage.batch_size
    if stage.uses_models:
        args, device = actor_pool(stage, options)
        return ds.map_batches(StageActor, fn_constructor_kwargs={"stage": stage, "device": device},
                              batch_size=batch_size, **args)
    return ds.map_batches(run_task, fn_kwargs={"stage": stage}, batch_size=batch_size,
                          num_cpus=stage.resources.num_cpus, **TASK_RETRIES)


# ----- sources --------------------------------------------------------------------------------------------------------
class Photos:
    """Image files (directories, globs, files, s3:// URIs); `prepare(stage)` makes the CPU stage (decode + align, or
    decode only) that turns each file into the stage's input row (None: the stage reads the files itself)."""

    def __init__(self, inputs: list[str], prepare=None):
        from ops.ingest import list_inputs

        self.inputs, self.make_prepare, self.prepare_stage = list(inputs), prepare, None
        self.items = list_inputs(self.inputs)

    def context(self) -> Context:
        return Context(upstream=None, read_bytes=io.read_file, read_table=read_result_table,
                       read_output=read_output)

    def describe(self, stage: Stage) -> dict:
        """Bind to the (prepared) stage; what decides the rows besides the stage, for the fingerprint."""
        if self.make_prepare is None:
            return {}
        self.prepare_stage = self.make_prepare(stage)
        provenance = self.prepare_stage.prepare(self.context())
        return {"prepare": {"stage": self.prepare_stage.name, "config": config_dict(self.prepare_stage.config)},
                "prepare_checkpoints": provenance.checkpoints}

    def keys(self) -> list[str]:
        return [k for k, _ in self.items]

    def dataset(self, todo: set[str], allowed: set[str] | None, options: RunOptions):
        import ray.data

        rows = [{"key": k, "uri": u, **row_status(allowed is None or k in allowed)}
                for k, u in self.items if k in todo]
        ds = ray.data.from_items(rows)
        return map_stage(ds, self.prepare_stage, options) if self.prepare_stage is not None else ds


def row_status(ok: bool) -> dict:
    return {"status": "ok", "error_code": "", "error": ""} if ok else \
        {"status": "skipped", "error_code": "limit", "error": "beyond --limit"}


def select_rows(batch: dict, todo: set[str], allowed: set[str] | None, rename: dict) -> dict:
    """Rows of an earlier stage's output still to do; ok rows past --limit marked skipped; columns renamed."""
    keep = np.array([k in todo for k in batch["key"]], dtype=bool)
    out = {rename.get(c, c): np.asarray(v)[keep] for c, v in batch.items()}
    for c in ("status", "error_code", "error"):
        out[c] = np.array(out[c], dtype=object, copy=True)
    if allowed is not None:
        past = np.array([k not in allowed for k in out["key"]], dtype=bool) & (out["status"] == "ok")
        out["status"][past], out["error_code"][past], out["error"][past] = "skipped", "limit", "beyond --limit"
    return out


class StageOutput:
    """The parts of an earlier stage's output (its `run.json` gives the upstream fingerprint); `rename` maps one of
    its columns onto the stage's input (e.g. aligned -> image)."""

    def __init__(self, path: str, rename: dict | None = None):
        self.path, self.rename, self.columns = path, dict(rename or {}), None
        self.inputs = [path]
        self.upstream = io.read_json(path, "run.json")
        if self.upstream is None:
            raise ValueError(f"{path} is not a latentray stage output (no run.json)")

    @property
    def stage_name(self) -> str:
        return self.upstream.get("stage", "")

    def context(self) -> Context:
        def read_input(keys, columns):  # always with the key column
            columns = ["key", *[c for c in columns if c != "key"]]
            table = io.read_rows(self.path, keys, columns) if keys is not None else io.read_dataset(self.path, columns)
            return io.columns_of(table)

        return Context(upstream=self.upstream, read_input=read_input, read_bytes=io.read_file,
                       read_table=read_result_table, read_output=read_output)

    def describe(self, stage: Stage) -> dict:
        """Bind to the (prepared) stage: read only the columns it declares (all when it declares none)."""
        if stage.input_columns is not None:
            inverse = {v: k for k, v in self.rename.items()}
            self.columns = sorted({inverse.get(c, c) for c in (*ROW_COLUMNS, *stage.input_columns)})
        return {"upstream": self.upstream.get("fingerprint"), "rename": self.rename}

    def keys(self) -> list[str]:
        return sorted(io.read_dataset(self.path, ["key"]).column("key").to_pylist()) if io.part_paths(self.path) \
            else []

    def dataset(self, todo: set[str], allowed: set[str] | None, options: RunOptions):
        import ray.data

        ds = ray.data.read_parquet(io.part_paths(self.path), filesystem=io.arrow_filesystem(self.path))
        ds = ds.select_columns(self.columns) if self.columns else ds
        return ds.map_batches(select_rows, fn_kwargs={"todo": todo, "allowed": allowed, "rename": self.rename},
                              batch_size=options.batch_size or 64)


class Columns:
    """Rows read by a function from files that are neither photos nor stage outputs (e.g. other tools' latents):
    `read(inputs, stage) -> (columns with "key", description for the fingerprint)`, called once bound."""

    def __init__(self, inputs: list[str], read):
        self.inputs, self.read, self.columns = list(inputs), read, None

    def context(self) -> Context:
        return Context(upstream=None, read_bytes=io.read_file, read_table=read_result_table,
                       read_output=read_output)

    def describe(self, stage: Stage) -> dict:
        self.columns, description = self.read(self.inputs, stage)
        return description

    def keys(self) -> list[str]:
        return sorted(self.columns["key"])

    def dataset(self, todo: set[str], allowed: set[str] | None, options: RunOptions):
        import ray.data

        rows = [{**{c: v[i] for c, v in self.columns.items()}, **row_status(allowed is None or k in allowed)}
                for i, k in enumerate(self.columns["key"]) if k in todo]
        return ray.data.from_items(rows)


def read_output(uri: str, columns: list[str]) -> dict:
    """Columns of every row of another stage output (e.g. the photos' geometry for paste)."""
    return io.columns_of(io.read_dataset(uri, ["key", *[c for c in columns if c != "key"]]))


def read_result_table(uri: str, columns: list[str]) -> dict:
    """A result table of another output (e.g. a channels run's population_stats.parquet) as numpy columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return io.columns_of(pq.read_table(pa.BufferReader(io.read_file(uri)), columns=columns))


# ----- provenance -----------------------------------------------------------------------------------------------------
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


def code_version() -> str:
    """The package version and, in a git checkout, its commit (with `+dirty` for uncommitted changes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("latentray")
    except PackageNotFoundError:
        release = "unknown"
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{release}+{commit}" if commit else release


def fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim_output(output: str, description: dict, fp: str, overwrite: bool) -> list:
    """Refuse to mix configurations or schemas in one output; `overwrite` discards another one (keeping its
    run.json's provenance). Returns the earlier runs' records to keep."""
    previous = io.read_json(output, "run.json")
    if previous is None:
        return []
    if previous.get("fingerprint") == fp:
        return previous.get("runs", [])
    schema = previous.get("schema_version", 1)
    reason = f"schema {schema} (this latentray writes schema {io.SCHEMA_VERSION})" if schema != io.SCHEMA_VERSION \
        else f"another configuration (fingerprint {previous.get('fingerprint')} != {fp})"
    if not overwrite:
        raise ValueError(f"{output} holds a `{previous.get('stage')}` run of {reason}; pass --overwrite to start "
                         "over")
    io.clear_output(output, keep=(LOCK_NAME,))
    return [{"overwritten": previous}]


def run_record(options: RunOptions, started: float) -> dict:
    return {"code_version": code_version(), "versions": versions(), "host": socket.gethostname(), "pid": os.getpid(),
            "argv": sys.argv, "options": dataclasses.asdict(options), "started": started}


# ----- resume ---------------------------------------------------------------------------------------------------------
def plan_units(scan: io.Scan, keys: list[str], allowed: set[str] | None, retry_failed: bool
               ) -> tuple[set[str], set[str]]:
    """(done, redo) among the input keys: a unit is redone when one of its rows failed transiently (or at all,
    with retry_failed), or was skipped for --limit and is now within it."""
    redo, seen = set(), set()
    for part in scan.parts:
        for unit, status, code in zip(part.units, part.status, part.error_code):
            seen.add(unit)
            if status == "failed" and (retry_failed or is_transient(code)):
                redo.add(unit)
            elif status == "skipped" and code in DEFERRED_CODES and (allowed is None or unit in allowed):
                redo.add(unit)
    wanted = set(keys)
    return (seen - redo) & wanted, redo & wanted


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


def write_batch(batch: dict, output: str, metadata: dict, preview_columns: tuple[str, ...]) -> dict:
    """Final task of a row stage: one atomic part per batch, plus a preview grid (ok rows x `preview_columns`) for
    the first parts of a run. Returns what the driver counts."""
    from ops.images import preview_grid

    path = io.write_part(io.to_table(batch, metadata), output)
    rows = np.flatnonzero(batch["status"] == "ok")[:4]
    columns = [batch[c] for c in preview_columns if c in batch]
    if columns and rows.size and io.count_previews(output) < MAX_PREVIEWS:
        io.write_png(output, f"previews/{io.stem(path)}.png", preview_grid(columns, rows))
    n = len(batch["key"])
    return {"key": batch["key"], "status": batch["status"], "error_code": batch["error_code"],
            "node": batch.get("_node", objects([""] * n)), "rss_mb": batch.get("_rss_mb", np.zeros(n)),
            "gpu_mb": batch.get("_gpu_mb", np.zeros(n))}


def drain(ds, stage: Stage, total: int, progress: bool) -> dict:
    """Run a stage's dataset to the end on the driver, counting rows by status, error code and node."""
    counts = {"by_status": Counter(), "by_error": Counter(), "rows_by_node": Counter()}
    peaks = {"actor_peak_rss_mb": 0.0, "actor_peak_gpu_mb": 0.0}
    bar = Progress(stage.name, total, progress)
    try:
        for row in ds.iter_rows():
            peaks["actor_peak_rss_mb"] = max(peaks["actor_peak_rss_mb"], float(row["rss_mb"]))
            peaks["actor_peak_gpu_mb"] = max(peaks["actor_peak_gpu_mb"], float(row["gpu_mb"]))
            counts["by_status"][row["status"]] += 1
            if row["error_code"]:
                counts["by_error"][row["error_code"]] += 1
            if row["node"]:
                counts["rows_by_node"][row["node"]] += 1
            bar.update()
    except Exception as exc:  # Ray's errors name tasks and actors, not what the user ran
        raise StageFailed(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
    return {**{k: dict(v) for k, v in counts.items()}, **{k: round(v, 1) for k, v in peaks.items()}}


def summary_previews(stage: Stage, output: str) -> None:
    """Grids across the whole output, from the first few inputs' rows."""
    columns = stage.summary_columns()
    if not columns:
        return
    units = sorted(set(io.read_dataset(output, [stage.key_column]).column(stage.key_column).to_pylist()))
    table = io.read_rows(output, units[:SUMMARY_SOURCES], list(columns), key_column=stage.key_column)
    for name, image in stage.summary_previews(io.columns_of(table)).items():
        io.write_png(output, f"previews/{name}.png", image)


# ----- the driver -----------------------------------------------------------------------------------------------------
def run_stage(stage: Stage, source, output: str, options: RunOptions = RunOptions()) -> dict:
    """Run (or resume) one stage into `output`; returns the stats written to `output/stats.json`."""
    t0 = time.time()
    provenance = stage.prepare(source.context())
    description = {"schema_version": io.SCHEMA_VERSION, "stage": stage.name, "config": config_dict(stage.config),
                   **source.describe(stage), "checkpoints_sha256": provenance.checkpoints, **provenance.fingerprint}
    fp = fingerprint(description)
    if options.dry_run:
        return dry_run(stage, source, output, fp, description, options)
    init_ray()
    check_output_location(output, options)
    with OutputLock(output, wait=options.wait):
        runs = claim_output(output, description, fp, options.overwrite)
        previous = io.read_json(output, "stats.json") or {}
        if isinstance(stage, Aggregate) and previous.get("fingerprint") == fp:
            return {**previous, "already_done": True}  # its result tables are complete: nothing to redo
        run = {**description, "fingerprint": fp, "inputs": source.inputs,
               "metadata": provenance.metadata, "runs": [*runs, run_record(options, t0)]}
        io.write_json(output, "run.json", run)
        if isinstance(stage, Aggregate):
            stats = run_aggregate(stage, source, output, options)
        else:
            stats = run_rows(stage, source, output, fp, provenance.metadata, options)
        stats = {"stage": stage.name, "fingerprint": fp, **stats, "seconds": round(time.time() - t0, 3)}
        if "rows_processed" in stats:
            stats["rows_per_second"] = round(stats["rows_processed"] / max(stats["seconds"], 1e-9), 4)
        io.write_json(output, "stats.json", stats)
        run["runs"][-1]["finished"] = time.time()
        io.write_json(output, "run.json", run)
    return stats


def run_rows(stage: Stage, source, output: str, fp: str, metadata: dict, options: RunOptions) -> dict:
    keys = source.keys()
    allowed = set(keys[:options.limit]) if options.limit is not None else None
    scan = io.scan_output(output, stage.key_column)
    done, redo = plan_units(scan, keys, allowed, options.retry_failed)
    if redo:
        io.drop_units(output, scan.parts, redo)
    todo = {k for k in keys if k not in done}
    counts = {"by_status": {}, "by_error": {}, "rows_by_node": {}}
    if todo:
        ds = map_stage(source.dataset(todo, allowed, options), stage, options)
        ds = ds.map_batches(write_batch, fn_kwargs={"output": output, "preview_columns": stage.preview_columns(),
                                                    "metadata": {**metadata, "stage": stage.name, "fingerprint": fp,
                                                                 "schema_version": io.SCHEMA_VERSION}},
                            batch_size=None, num_cpus=1, **TASK_RETRIES)
        counts = drain(ds, stage, len(todo) * max(1, len(stage.variants())), options.progress)
        summary_previews(stage, output)
    return {"rows_processed": sum(counts["by_status"].values()), "inputs": len(keys), "already_done": len(done),
            "redone": len(redo), "quarantined": scan.quarantined, **counts}


def run_aggregate(stage: Aggregate, source, output: str, options: RunOptions) -> dict:
    """Every batch reduced where it is read (or on the actor pool when the stage needs models), merged on the
    driver as partial states arrive: memory stays that of one state however many rows there are."""
    keys = source.keys()
    allowed = set(keys[:options.limit]) if options.limit is not None else None
    partials = map_stage(source.dataset(set(keys), allowed, options), stage, options)
    state = None
    try:
        for row in partials.iter_rows():
            part = pickle.loads(row["state"])  # our own workers' states, never a file's contents
            state = part if state is None else stage.merge(state, part)
    except Exception as exc:
        raise StageFailed(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
    result = stage.finish(state)
    import pyarrow as pa

    for name, columns in result.tables.items():
        io.write_table(output, f"{name}.parquet", pa.table(columns))
    for name, image in result.previews.items():
        io.write_png(output, f"previews/{name}.png", image)
    return {"inputs": len(keys), **result.stats}


def dry_run(stage: Stage, source, output: str, fp: str, description: dict, options: RunOptions) -> dict:
    """What a run would do, read-only: inputs, already done, to redo, to do (nothing written or repaired)."""
    previous = io.read_json(output, "run.json")
    keys = source.keys()
    allowed = set(keys[:options.limit]) if options.limit is not None else None
    resumable = previous is None or previous.get("fingerprint") == fp
    done, redo = plan_units(io.scan_output(output, stage.key_column, repair=False), keys, allowed,
                            options.retry_failed) if resumable and not isinstance(stage, Aggregate) else (set(), set())
    lease = OutputLock(output).holder()
    return {"dry_run": True, "stage": stage.name, "fingerprint": fp, "config": description, "inputs": len(keys),
            "already_done": len(done), "to_redo": len(redo), "to_do": len(keys) - len(done),
            "resumable": resumable, "locked_by": OutputLock.describe(lease) if lease else None}


# ----- user-facing stages ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter:
    """A user-facing stage: its ops/ stage, where its rows may come from, and the CPU stage (and its Config) that
    turns photo files into its input rows."""

    stage: type
    help: str
    photos: object = None  # (stage, photos config) -> the CPU stage reading photos; "self": the stage reads them
    read: object = None  # (inputs, stage) -> (columns, description): rows from other files (see Columns)
    photos_config: type | None = None  # Config of that CPU stage: its fields are options of the command too
    outputs: bool = True  # may read an earlier stage's output
    rename: object = None  # (stage) -> {upstream column: this stage's input column}
    examples: tuple[str, ...] = ()
    epilog: str = ""

    def source(self, stage: Stage, inputs: list[str], photos_config=None):
        inputs = [str(i) for i in inputs]
        if self.read is not None:
            return Columns(inputs, self.read)
        if len(inputs) == 1 and not any(c in inputs[0] for c in "*?[") and io.read_json(inputs[0], "run.json"):
            if not self.outputs:
                raise ValueError(f"{stage.name} reads photos, and {inputs[0]} is a stage output")
            return StageOutput(inputs[0], rename=self.rename(stage) if self.rename else None)
        if self.photos is None:
            raise ValueError(f"{stage.name} reads the output of an earlier stage (a folder with run.json), got "
                             f"{inputs}")
        if self.photos == "self":
            return Photos(inputs)
        return Photos(inputs, prepare=lambda s: self.photos(s, photos_config))


def run(adapter: Adapter, inputs: list[str], output: str, config=None, photos_config=None,
        options: RunOptions = RunOptions()) -> dict:
    """Run a user-facing stage from Python, as its `latentray` subcommand does."""
    stage = adapter.stage(config)
    return run_stage(stage, adapter.source(stage, inputs, photos_config), str(output), options)
