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
from pipelines import faults, index, io
from pipelines.lock import LEASES, LeaseLost, OutputLock, Ticket, fence
from pipelines.lock import describe as describe_lease

RETRIES = 3  # a crashed task or actor is retried this many times, then its job fails (never retried forever)
# Ray 2.60 has no named parameters for retries yet (it warns that free remote args go away in 2.64).
TASK_RETRIES = {"max_retries": RETRIES}
ACTOR_RETRIES = {"max_restarts": RETRIES, "max_task_retries": RETRIES}
MAX_PREVIEWS = 8  # preview grids per run (one per part, the first parts written)
SUMMARY_SOURCES = 4  # inputs shown in the grids made across a whole output (edits x strengths, faces x styles)
INDEX_EVERY = 10.0  # seconds between index segments written during a run
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
    ctx.raise_original_map_exception = True  # a task's LeaseLost / StorageError / Damaged keeps its class


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
        faults.point("actor")
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
    faults.point("task")
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
    decode only) that turns each file into the stage's input row (None: the stage reads the files itself). A
    photo's identity is its uri, size and version (mtime, ETag) from the listing: no extra read per file."""

    def __init__(self, inputs: list[str], prepare=None):
        from ops.ingest import list_input_files

        self.inputs, self.make_prepare, self.prepare_stage = list(inputs), prepare, None
        self.items = [(k, u, int(info.get("size", -1)), io.version_of(info))
                      for k, u, info in list_input_files(self.inputs)]

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

    def identities(self) -> dict[str, str]:
        return {k: index.digest(u, size, version) for k, u, size, version in self.items}

    def dataset(self, todo: set[str], allowed: set[str] | None, options: RunOptions):
        import ray.data

        rows = [{"key": k, "uri": u, "source_size": size, "source_version": version,
                 "input_id": index.digest(u, size, version), **row_status(allowed is None or k in allowed)}
                for k, u, size, version in self.items if k in todo]
        ds = ray.data.from_items(rows)
        return map_stage(ds, self.prepare_stage, options) if self.prepare_stage is not None else ds


def row_status(ok: bool) -> dict:
    return {"status": "ok", "error_code": "", "error": ""} if ok else \
        {"status": "skipped", "error_code": "limit", "error": "beyond --limit"}


def read_upstream(batch: dict, path: str, columns: list[str] | None, allowed: set[str] | None, rename: dict
                  ) -> dict:
    """Rows of an earlier stage's output (the winning copies of the planned parts): ok rows past --limit marked
    skipped, columns renamed, the upstream row's identity as this row's `input_id`."""
    import pyarrow as pa

    tables = [index.read_planned(path, part, list(keep), int(size), columns)
              for part, keep, size in zip(batch["part"], batch["keep"], batch["size"])]
    table = io.columns_of(pa.concat_tables(tables, promote_options="permissive"))
    out = {rename.get(c, c): v for c, v in table.items() if c != "input_id"}
    out["input_id"] = table["row_id"]
    for c in ("status", "error_code", "error"):
        out[c] = np.array(out[c], dtype=object, copy=True)
    if allowed is not None:
        past = np.array([k not in allowed for k in out["key"]], dtype=bool) & (out["status"] == "ok")
        out["status"][past], out["error_code"][past], out["error"][past] = "skipped", "limit", "beyond --limit"
    return out


class StageOutput:
    """The rows of an earlier stage's output (its `run.json` gives the upstream fingerprint, its index which rows
    every reader sees); `rename` maps one of its columns onto the stage's input (e.g. aligned -> image)."""

    def __init__(self, path: str, rename: dict | None = None):
        self.path, self.rename, self.columns = path, dict(rename or {}), None
        self.inputs = [path]
        try:
            self.upstream = io.read_json(path, "run.json")
        except io.Damaged as exc:
            raise ValueError(f"the run.json of input {path} is damaged ({exc}); run `latentray verify {path}` "
                             "and rerun the stage that wrote it") from None
        if self.upstream is None:
            raise ValueError(f"{path} is not a latentray stage output (no run.json)")
        self._state = None

    @property
    def state(self) -> index.State:
        if self._state is None:
            self._state = index.load(self.path)
        return self._state

    @property
    def stage_name(self) -> str:
        return self.upstream.get("stage", "")

    def context(self) -> Context:
        def read_input(keys, columns):  # always with the key column
            columns = ["key", *[c for c in columns if c != "key"]]
            return io.columns_of(index.read_dataset(self.path, columns, keys, state=self.state))

        return Context(upstream=self.upstream, read_input=read_input, read_bytes=io.read_file,
                       read_table=read_result_table, read_output=read_output)

    def describe(self, stage: Stage) -> dict:
        """Bind to the (prepared) stage: read only the columns it declares (all when it declares none)."""
        if stage.input_columns is not None:
            inverse = {v: k for k, v in self.rename.items()}
            self.columns = sorted({inverse.get(c, c) for c in (*ROW_COLUMNS, "row_id", *stage.input_columns)})
        return {"upstream": self.upstream.get("fingerprint"), "rename": self.rename}

    def identities(self) -> dict[str, str]:
        return self.state.identities()

    def dataset(self, todo: set[str], allowed: set[str] | None, options: RunOptions):
        import ray.data

        items = [{"part": part, "keep": keep, "size": self.state.parts[part]["size"]}
                 for part, keep in index.plan_reads(self.state, todo)]
        ds = ray.data.from_items(items)
        return ds.map_batches(read_upstream, fn_kwargs={"path": self.path, "columns": self.columns,
                                                        "allowed": allowed, "rename": self.rename},
                              batch_size=1, **TASK_RETRIES)


class Columns:
    """Rows read by a function from files that are neither photos nor stage outputs (e.g. other tools' latents):
    `read(inputs, stage) -> (columns with "key", description for the fingerprint)`, called once bound. A row's
    identity is its key within the files' description (their sha256)."""

    def __init__(self, inputs: list[str], read):
        self.inputs, self.read, self.columns, self.description = list(inputs), read, None, {}

    def context(self) -> Context:
        return Context(upstream=None, read_bytes=io.read_file, read_table=read_result_table,
                       read_output=read_output)

    def describe(self, stage: Stage) -> dict:
        self.columns, self.description = self.read(self.inputs, stage)
        return self.description

    def identities(self) -> dict[str, str]:
        files = json.dumps(self.description, sort_keys=True, default=str)
        return {k: index.digest(files, k) for k in self.columns["key"]}

    def dataset(self, todo: set[str], allowed: set[str] | None, options: RunOptions):
        import ray.data

        ids = self.identities()
        rows = [{**{c: v[i] for c, v in self.columns.items()}, "input_id": ids[k],
                 **row_status(allowed is None or k in allowed)}
                for i, k in enumerate(self.columns["key"]) if k in todo]
        return ray.data.from_items(rows)


def read_output(uri: str, columns: list[str]) -> dict:
    """Columns of every row of another stage output (e.g. the photos' geometry for paste)."""
    return io.columns_of(index.read_dataset(uri, ["key", *[c for c in columns if c != "key"]]))


def read_result_table(uri: str, columns: list[str]) -> dict:
    """A result table of another output (e.g. a channels run's population_stats.parquet) as numpy columns."""
    return io.columns_of(io.parse_table(io.read_file(uri), uri, columns))


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


def read_own_json(output: str, name: str, repair: bool) -> dict | None:
    """One of the output's JSON files; a damaged one is quarantined (with `repair`) and taken as absent."""
    try:
        return io.read_json(output, name)
    except io.Damaged as exc:
        if repair:
            io.quarantine(output, io.join(output, name)[1], str(exc))
        return None


def claim_output(output: str, description: dict, fp: str, overwrite: bool) -> list:
    """Refuse to mix configurations or schemas in one output (run.json says which; without it, the parts' own
    metadata); `overwrite` discards another one, keeping its run.json's provenance and the quarantine. Returns the
    earlier runs' records to keep."""
    previous = read_own_json(output, "run.json", repair=True)
    if previous is None:
        others = {p["fingerprint"] for p in index.load(output).parts.values()} - {fp}
        if others and not overwrite:
            raise ValueError(f"{output} holds parts of another configuration (fingerprint {sorted(others)[0]} != "
                             f"{fp}); pass --overwrite to start over")
        if others:
            io.clear_output(output, keep=(LEASES,))
        return []
    if previous.get("fingerprint") == fp:
        return previous.get("runs", [])
    schema = previous.get("schema_version", 1)
    reason = f"schema {schema} (this latentray writes schema {io.SCHEMA_VERSION})" if schema != io.SCHEMA_VERSION \
        else f"another configuration (fingerprint {previous.get('fingerprint')} != {fp})"
    if not overwrite:
        raise ValueError(f"{output} holds a `{previous.get('stage')}` run of {reason}; pass --overwrite to start "
                         "over")
    io.clear_output(output, keep=(LEASES,))
    return [{"overwritten": previous}]


def run_record(options: RunOptions, started: float, lease: int) -> dict:
    return {"code_version": code_version(), "versions": versions(), "host": socket.gethostname(), "pid": os.getpid(),
            "argv": sys.argv, "options": dataclasses.asdict(options), "started": started, "lease": lease,
            "acquired": time.time()}


# ----- resume ---------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run does with each input unit."""

    done: set = field(default_factory=set)  # whole, from the input as it is now, nothing to retry
    redo: set = field(default_factory=set)  # a transient failure, --retry-failed, --limit now covering it, incomplete
    changed: set = field(default_factory=set)  # its input changed (uri, size, version, or the upstream row)
    missing: set = field(default_factory=set)  # rows whose input is gone: kept, counted

    @property
    def again(self) -> set:
        return self.redo | self.changed


def plan_units(state: index.State, identities: dict[str, str], allowed: set[str] | None, retry_failed: bool,
               rows_per_unit: int) -> Plan:
    """Compare what the output holds with the inputs as they are now. A unit is done only when all its rows exist,
    all made from the input's current identity; it is redone whole otherwise."""
    plan = Plan()
    units = state.units()
    plan.missing = set(units) - set(identities)
    for unit, current in identities.items():
        rows = units.get(unit)
        if rows is None:
            continue
        made_from = {r[3] for r in rows}
        if made_from != {current}:
            (plan.changed if len(made_from) == 1 and len(rows) == rows_per_unit else plan.redo).add(unit)
        elif len(rows) != rows_per_unit:
            plan.redo.add(unit)
        elif any(s == "failed" and (retry_failed or is_transient(c)) for _, s, c, _ in rows):
            plan.redo.add(unit)
        elif any(s == "skipped" and c in DEFERRED_CODES and (allowed is None or unit in allowed)
                 for _, s, c, _ in rows):
            plan.redo.add(unit)
        else:
            plan.done.add(unit)
    return plan


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


def write_batch(batch: dict, output: str, metadata: dict, preview_columns: tuple[str, ...], ticket: Ticket,
                unit_column: str) -> dict:
    """Final task of a row stage: one atomic, content-addressed part per batch (after checking this run still holds
    the output), plus a preview grid (ok rows x `preview_columns`) for the first parts of a run. Returns the index
    entries of its rows and what the driver counts."""
    from ops.images import preview_grid

    n = len(batch["key"])
    batch = dict(batch)
    batch["input_id"] = objects(batch["input_id"]) if "input_id" in batch else objects([""] * n)
    batch["row_id"] = objects(index.row_ids(batch["key"], batch["input_id"], batch["status"], batch["error_code"],
                                            metadata["fingerprint"]))
    data = io.table_bytes(io.to_table(batch, {**metadata, "unit_column": unit_column}))
    fence(ticket)
    name, info = io.write_named(output, "", ticket.gen, data)
    rows = np.flatnonzero(batch["status"] == "ok")[:4]
    columns = [batch[c] for c in preview_columns if c in batch]
    if columns and rows.size and io.count_previews(output) < MAX_PREVIEWS:
        io.write_png(output, f"previews/{io.stem(name)}.png", preview_grid(columns, rows))
    return {"key": batch["key"], "unit": batch[unit_column], "status": batch["status"],
            "error_code": batch["error_code"], "input_id": batch["input_id"], "row_id": batch["row_id"],
            "part": objects([name] * n), "part_size": np.full(n, info["size"]),
            "part_version": objects([info["version"]] * n), "part_rows": np.full(n, n),
            "node": batch.get("_node", objects([""] * n)), "rss_mb": batch.get("_rss_mb", np.zeros(n)),
            "gpu_mb": batch.get("_gpu_mb", np.zeros(n))}


class Indexer:
    """The driver's side of the index: the entries of parts as they land, written as a segment every few seconds
    (complete parts only), so a resume reads the index plus the few parts written since."""

    def __init__(self, output: str, lock: OutputLock, fp: str, every: float = INDEX_EVERY):
        self.output, self.lock, self.fp, self.every = output, lock, fp, every
        self.pending: dict[str, dict] = {}
        self.ready: list[dict] = []
        self.last = time.time()

    def add(self, row: dict) -> None:
        part = self.pending.setdefault(row["part"], {"name": row["part"], "rows": [], "expected": row["part_rows"],
                                                     "size": row["part_size"], "version": row["part_version"]})
        part["rows"].append({c: str(row[c]) for c in index.ENTRY_COLUMNS})
        if len(part["rows"]) == part["expected"]:
            self.ready.append(self.pending.pop(row["part"]))
        if time.time() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        self.last = time.time()
        if not self.ready:
            return
        import pyarrow as pa

        entries = pa.Table.from_pylist([{"part": p["name"], **r} for p in self.ready for r in p["rows"]])
        parts = {p["name"]: {"size": int(p["size"]), "version": p["version"], "fingerprint": self.fp}
                 for p in self.ready}
        self.lock.check()
        faults.point("index")
        index.write_segment(self.output, self.lock.gen, entries, parts)
        self.ready = []


def drain(ds, stage: Stage, total: int, progress: bool, lock: OutputLock, indexer: Indexer | None = None) -> dict:
    """Run a stage's dataset to the end on the driver, counting rows by status, error code and node, indexing the
    parts written, and stopping at once if this run lost its output."""
    counts = {"by_status": Counter(), "by_error": Counter(), "rows_by_node": Counter()}
    peaks = {"actor_peak_rss_mb": 0.0, "actor_peak_gpu_mb": 0.0}
    bar = Progress(stage.name, total, progress)
    try:
        for row in ds.iter_rows():
            lock.check(storage=False)
            peaks["actor_peak_rss_mb"] = max(peaks["actor_peak_rss_mb"], float(row["rss_mb"]))
            peaks["actor_peak_gpu_mb"] = max(peaks["actor_peak_gpu_mb"], float(row["gpu_mb"]))
            counts["by_status"][row["status"]] += 1
            if row["error_code"]:
                counts["by_error"][row["error_code"]] += 1
            if row["node"]:
                counts["rows_by_node"][row["node"]] += 1
            if indexer is not None:
                indexer.add(row)
            bar.update()
    except Exception as exc:  # Ray's errors name tasks and actors, not what the user ran
        ours = our_error(exc)
        if ours is not None:
            raise ours from None
        raise StageFailed(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
    if indexer is not None:
        indexer.flush()
    return {**{k: dict(v) for k, v in counts.items()}, **{k: round(v, 1) for k, v in peaks.items()}}


OUR_ERRORS = (LeaseLost, io.StorageError, io.Damaged)  # raised in a task, reported as they are, without Ray's text


def our_error(exc: BaseException) -> BaseException | None:
    """The lost lease, storage failure or damage a Ray task raised (Ray re-raises it with the original class when
    `raise_original_map_exception` is set), as a plain exception of its own class and message."""
    cause = getattr(exc, "cause", None) or exc
    for kind in OUR_ERRORS:
        if isinstance(cause, kind):
            return kind(str(cause).split("\nFailed to apply UDF")[0])
    return None


def summary_previews(stage: Stage, output: str) -> None:
    """Grids across the whole output, from the first few inputs' rows."""
    columns = stage.summary_columns()
    if not columns:
        return
    state = index.load(output)
    units = sorted(set(state.winners.column("unit").to_pylist()))
    table = index.read_dataset(output, list(dict.fromkeys([stage.key_column, *columns])), units[:SUMMARY_SOURCES],
                               key_column=stage.key_column, state=state)
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
    with OutputLock(output, wait=options.wait) as lock:
        runs = claim_output(output, description, fp, options.overwrite)
        read_own_json(output, "stats.json", repair=True)  # replaced at the end: damaged bytes go to quarantine
        run = {**description, "fingerprint": fp, "inputs": source.inputs,
               "metadata": provenance.metadata, "runs": [*runs, run_record(options, t0, lock.gen)]}
        lock.check()
        io.write_json(output, "run.json", run)
        if isinstance(stage, Aggregate):
            stats = run_aggregate(stage, source, output, fp, options, lock)
        else:
            stats = run_rows(stage, source, output, fp, provenance.metadata, options, lock)
        stats = {"stage": stage.name, "fingerprint": fp, **stats, "seconds": round(time.time() - t0, 3)}
        if "rows_processed" in stats:
            stats["rows_per_second"] = round(stats["rows_processed"] / max(stats["seconds"], 1e-9), 4)
        lock.check()
        io.write_json(output, "stats.json", stats)
        run["runs"][-1]["finished"] = time.time()
        lock.check()
        io.write_json(output, "run.json", run)
    return stats


def run_rows(stage: Stage, source, output: str, fp: str, metadata: dict, options: RunOptions,
             lock: OutputLock) -> dict:
    identities = source.identities()
    keys = sorted(identities)
    allowed = set(keys[:options.limit]) if options.limit is not None else None
    state = index.load(output, repair=True, fingerprint=fp)
    plan = plan_units(state, identities, allowed, options.retry_failed, max(1, len(stage.variants())))
    todo = {k for k in keys if k not in plan.done}
    counts = {"by_status": {}, "by_error": {}, "rows_by_node": {}}
    if todo:
        ds = map_stage(source.dataset(todo, allowed, options), stage, options)
        ds = ds.map_batches(write_batch, fn_kwargs={
            "output": output, "preview_columns": stage.preview_columns(), "ticket": lock.ticket,
            "unit_column": stage.key_column,
            "metadata": {**metadata, "stage": stage.name, "fingerprint": fp, "schema_version": io.SCHEMA_VERSION}},
            batch_size=None, num_cpus=1, **TASK_RETRIES)
        counts = drain(ds, stage, len(todo) * max(1, len(stage.variants())), options.progress, lock,
                       Indexer(output, lock, fp))
    final = index.load(output, repair=True, fingerprint=fp)  # the index plus the parts written since
    tidied = index.tidy(output, final, lock.gen, lock.check)
    if todo:
        summary_previews(stage, output)
    quarantined = [*state.quarantined, *final.quarantined]
    return {"rows_processed": sum(counts["by_status"].values()), "inputs": len(keys), "already_done": len(plan.done),
            "redone": len(plan.redo), "changed": len(plan.changed), "missing_inputs": len(plan.missing),
            "quarantined": quarantined, **tidied, **counts}


def run_aggregate(stage: Aggregate, source, output: str, fp: str, options: RunOptions, lock: OutputLock) -> dict:
    """Every batch reduced where it is read (or on the actor pool when the stage needs models), merged on the
    driver as partial states arrive: memory stays that of one state however many rows there are. The result
    records the identity of the upstream rows it was computed on; a rerun is a no-op until they change."""
    identities = source.identities()
    keys = sorted(identities)
    allowed = set(keys[:options.limit]) if options.limit is not None else None
    upstream = index.digest(*(f"{k}={identities[k]}" for k in keys), str(options.limit), n=24)
    previous = read_own_json(output, "stats.json", repair=True) or {}
    if previous.get("fingerprint") == fp and previous.get("upstream_digest") == upstream and \
            results_intact(output, previous.get("results", {})):
        return {**{k: v for k, v in previous.items() if k not in ("stage", "fingerprint", "seconds")},
                "already_done": True}
    partials = map_stage(source.dataset(set(keys), allowed, options), stage, options)
    state = None
    try:
        for row in partials.iter_rows():
            lock.check(storage=False)
            part = pickle.loads(row["state"])  # our own workers' states, never a file's contents
            state = part if state is None else stage.merge(state, part)
    except Exception as exc:
        ours = our_error(exc)
        if ours is not None:
            raise ours from None
        raise StageFailed(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
    result = stage.finish(state)
    import pyarrow as pa

    results = {}
    for name, columns in result.tables.items():
        data = io.table_bytes(pa.table(columns))
        lock.check()
        io.write_bytes(output, f"{name}.parquet", data)
        results[f"{name}.parquet"] = hashlib.sha256(data).hexdigest()
    for name, image in result.previews.items():
        io.write_png(output, f"previews/{name}.png", image)
    return {"inputs": len(keys), **result.stats, "upstream_digest": upstream, "results": results,
            "already_done": False}


def results_intact(output: str, results: dict) -> bool:
    """Every result table an aggregate wrote is there with the bytes it wrote."""
    for name, sha in results.items():
        fs, path = io.join(output, name)
        try:
            if hashlib.sha256(io.fetch(fs, path)).hexdigest() != sha:
                return False
        except FileNotFoundError:
            return False
    return bool(results)


def dry_run(stage: Stage, source, output: str, fp: str, description: dict, options: RunOptions) -> dict:
    """What a run would do, read-only: inputs, already done, to redo, changed, missing, to do (nothing written or
    repaired)."""
    previous = read_own_json(output, "run.json", repair=False)
    identities = source.identities()
    keys = sorted(identities)
    allowed = set(keys[:options.limit]) if options.limit is not None else None
    resumable = previous is None or previous.get("fingerprint") == fp
    state = index.load(output)
    plan = plan_units(state, identities, allowed, options.retry_failed, max(1, len(stage.variants()))) \
        if resumable and not isinstance(stage, Aggregate) else Plan()
    lease = OutputLock(output).holder()
    return {"dry_run": True, "stage": stage.name, "fingerprint": fp, "config": description, "inputs": len(keys),
            "already_done": len(plan.done), "to_redo": len(plan.redo), "changed": len(plan.changed),
            "missing_inputs": len(plan.missing), "to_do": len(keys) - len(plan.done), "resumable": resumable,
            "damaged": [p for p, _ in state.damaged], "locked_by": describe_lease(lease) if lease else None}


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
        if len(inputs) == 1 and not any(c in inputs[0] for c in "*?[") and is_stage_output(inputs[0]):
            if not self.outputs:
                raise ValueError(f"{stage.name} reads photos, and {inputs[0]} is a stage output")
            return StageOutput(inputs[0], rename=self.rename(stage) if self.rename else None)
        if self.photos is None:
            raise ValueError(f"{stage.name} reads the output of an earlier stage (a folder with run.json), got "
                             f"{inputs}")
        if self.photos == "self":
            return Photos(inputs)
        return Photos(inputs, prepare=lambda s: self.photos(s, photos_config))


def is_stage_output(path: str) -> bool:
    fs, run_json = io.join(path, "run.json")
    return bool(io.retrying(lambda: fs.exists(run_json), f"looking for {run_json}"))


def run(adapter: Adapter, inputs: list[str], output: str, config=None, photos_config=None,
        options: RunOptions = RunOptions()) -> dict:
    """Run a user-facing stage from Python, as its `latentray` subcommand does."""
    stage = adapter.stage(config)
    return run_stage(stage, adapter.source(stage, inputs, photos_config), str(output), options)
