"""The one driver: plan -> fingerprint -> lock -> resume -> map -> write -> stats, the same for every stage.

`prepare` binds a stage to its source (photos, a stage output, its own files) and checks its inputs column by
column; `run_stage` then holds the output's lease, compares what the output holds with the inputs as they are now
(index.py), runs what is left through Ray (runtime.py), writes one content-addressed part per batch from the tasks,
indexes the parts as they land, tidies (replace-then-remove, compaction, one index) and writes stats.json and
run.json. Aggregates reduce every batch to a partial state merged here and write their result tables.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ops.ingest import PHOTO_READERS, photo_reader
from ops.redact import redact, redact_all
from ops.stage import DEFERRED_CODES, Plan, config_dict, is_transient, objects, registered
from pipelines import faults, index, io, report, runtime, sources
from pipelines.lock import LEASES, OutputLock, Ticket, fence
from pipelines.lock import describe as describe_lease

MAX_PREVIEWS = 8  # preview grids per run (one per part, the first parts written)
SUMMARY_SOURCES = 4  # inputs shown in the grids made across a whole output (edits x strengths, faces x styles)
INDEX_EVERY = 10.0  # seconds between index segments written during a run


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


StageFailed = runtime.StageFailed


# ----- binding a stage to its source --------------------------------------------------------------------------------
@dataclass
class Bound:
    """A stage prepared for one run: its plan, its source, and the CPU stage that turns photos into its rows."""

    stage: object
    plan: Plan
    source: object
    reader: object = None
    reader_plan: Plan | None = None

    @property
    def drop(self) -> frozenset:
        """Columns that travel but are not stored."""
        return frozenset(self.plan.not_stored() | (self.reader_plan.not_stored() if self.reader_plan else set()))

    def description(self) -> dict:
        """What decides the rows, for the fingerprint."""
        out = {"schema_version": io.SCHEMA_VERSION, "stage": self.stage.name, "config": config_dict(self.stage.config),
               **self.source.describe(), "checkpoints_sha256": self.plan.checkpoints, **self.plan.fingerprint}
        if self.reader is not None:
            out.update(prepare={"stage": self.reader.name, "config": config_dict(self.reader.config)},
                       prepare_checkpoints=self.reader_plan.checkpoints)
        return out


def prepare(stage, source, photos_config=None) -> Bound:
    """Prepare a stage on its source; refuse, before any row, inputs that lack a column it reads."""
    context = source.context()
    plan = stage.prepare(context)
    reader = reader_plan = None
    if isinstance(source, sources.Photos) and stage.photos not in (None, "self"):
        reader = photo_reader(stage.photos, plan.image_size, photos_config)
        reader_plan = reader.prepare(context)
        # the stage then sees the columns its reader makes (e.g. `mask` under --masks), as from a stage output
        plan = stage.prepare(dataclasses.replace(context, columns={c.name: c for c in reader_plan.outputs}))
    sources.check_inputs(stage.name, plan, source)
    source.bind(plan)
    return Bound(stage, plan, source, reader, reader_plan)


def fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def run_record(options: RunOptions, started: float, lease: int) -> dict:
    return {"code_version": code_version(), "versions": versions(), "host": socket.gethostname(), "pid": os.getpid(),
            "argv": redact_all(sys.argv), "options": redact_all(dataclasses.asdict(options)), "started": started,
            "lease": lease,
            "acquired": time.time()}


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


def check_output_location(output: str, options: RunOptions) -> None:
    """A local output on a cluster spanning several hosts would scatter its parts over the machines."""
    if not io.is_local(output) or options.shared_output:
        return
    hosts = runtime.cluster_hosts()
    if hosts != 1:
        raise ValueError(f"--output {output} is a local path, but the Ray cluster spans "
                         f"{'hosts it may add' if hosts < 0 else f'{hosts} hosts'}: its parts would scatter over the "
                         "machines. Use s3://..., or a mount every node shares with --shared-output")


# ----- resume ---------------------------------------------------------------------------------------------------------
@dataclass
class Resume:
    """What a run does with each input unit."""

    done: set = field(default_factory=set)  # whole, from the input as it is now, nothing to retry
    redo: set = field(default_factory=set)  # a transient failure, --retry-failed, --limit now covering it, incomplete
    changed: set = field(default_factory=set)  # its input changed (uri, size, version, or the upstream row)
    missing: set = field(default_factory=set)  # rows whose input is gone: kept, counted


def plan_units(state: index.State, identities: dict[str, str], allowed: set[str] | None, retry_failed: bool,
               rows_per_unit: int) -> Resume:
    """Compare what the output holds with the inputs as they are now. A unit is done only when all its rows exist,
    all made from the input's current identity; it is redone whole otherwise."""
    plan = Resume()
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
    """Progress of one stage on stderr: on a terminal a bar rewritten in place (rows, rate, ETA); in a log a plain
    line at most every `log_every` seconds, and the last one."""

    def __init__(self, stage: str, total: int, enabled: bool = True, log_every: float = 30.0, width: int = 24):
        self.stage, self.total, self.enabled, self.width = stage, total, enabled, width
        self.tty = enabled and sys.stderr.isatty()
        self.every = 0.5 if self.tty else log_every
        self.done, self.t0, self.last = 0, time.time(), 0.0

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.t0, 1e-9)
        eta = f"ETA {clock((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else \
            f"in {clock(now - self.t0)}"
        figures = f"{self.done}/{self.total} rows, {rate:.2f} rows/s, {eta}"
        if not self.tty:
            return f"{self.stage}: {figures}"
        filled = int(self.width * self.done / max(self.total, 1))
        return f"{self.stage} [{'#' * filled}{'.' * (self.width - filled)}] {figures}"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            if self.tty:
                end = "\n" if self.done == self.total else ""
                print(f"\r\x1b[2K{self.line(now)}", end=end, file=sys.stderr, flush=True)
            else:
                print(self.line(now), file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 03 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ----- writing ------------------------------------------------------------------------------------------------------
def write_batch(batch: dict, output: str, metadata: dict, previews: tuple[str, ...], ticket: Ticket,
                unit_column: str, drop: frozenset = frozenset()) -> dict:
    """Final task of a row stage: one atomic, content-addressed part per batch (after checking this run still holds
    the output), plus a preview grid (ok rows x `previews` columns) for the first parts of a run. Returns the index
    entries of its rows and what the driver counts."""
    from ops.images import preview_grid, row_strips

    n = len(batch["key"])
    batch = dict(batch)
    shown = [c for c in previews if c in batch]
    columns = [batch[c] for c in shown]
    ok = batch["status"] == "ok"
    if columns:  # what the report's galleries show of each row
        batch[report.ROW_PREVIEW] = objects(row_strips(columns, ok))
    batch["input_id"] = objects(batch["input_id"]) if "input_id" in batch else objects([""] * n)
    for column in ("uri", "error"):  # recorded without credentials (the reader used the real uri)
        if column in batch:
            batch[column] = objects([redact(v) for v in batch[column]])
    batch["row_id"] = objects(index.row_ids(batch["key"], batch["input_id"], batch["status"], batch["error_code"],
                                            metadata["fingerprint"]))
    data = io.table_bytes(io.to_table(batch, {**metadata, "unit_column": unit_column, "row_preview_columns": shown},
                                      drop))
    fence(ticket)
    name, info = io.write_named(output, "", ticket.gen, data)
    rows = np.flatnonzero(ok)[:4]
    if columns and rows.size and io.count_previews(output) < MAX_PREVIEWS:
        io.write_preview(output, preview_name(metadata.get("stage", ""), shown, batch["key"][rows]),
                         preview_grid(columns, rows))
    return {"key": batch["key"], "unit": batch[unit_column], "status": batch["status"],
            "error_code": batch["error_code"], "input_id": batch["input_id"], "row_id": batch["row_id"],
            "part": objects([name] * n), "part_size": np.full(n, info["size"]),
            "part_version": objects([info["version"]] * n), "part_rows": np.full(n, n),
            "node": batch.get("_node", objects([""] * n)), "rss_mb": batch.get("_rss_mb", np.zeros(n)),
            "gpu_mb": batch.get("_gpu_mb", np.zeros(n))}


def preview_name(stage: str, columns: list[str], keys) -> str:
    """What a preview grid shows, for people: stage, spaces (or columns), its first and last keys."""
    shown = "-".join(c.removeprefix("recon_") for c in columns if c not in ("original", "image")) or "-".join(columns)
    span = str(keys[0]) if len(keys) == 1 else f"{keys[0]}..{keys[-1]}"
    return f"{stage}_{shown}_{span}"


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


class Counts:
    """What the driver counts as rows come back: by status, error code and node; actors' peak memory; progress."""

    def __init__(self, stage: str, total: int, progress: bool, lock: OutputLock, indexer: Indexer):
        self.by_status, self.by_error, self.rows_by_node = Counter(), Counter(), Counter()
        self.peaks = {"actor_peak_rss_mb": 0.0, "actor_peak_gpu_mb": 0.0}
        self.bar, self.lock, self.indexer = Progress(stage, total, progress), lock, indexer

    def __call__(self, row: dict) -> None:
        self.lock.check(storage=False)  # a run that lost its output stops at once
        self.peaks["actor_peak_rss_mb"] = max(self.peaks["actor_peak_rss_mb"], float(row["rss_mb"]))
        self.peaks["actor_peak_gpu_mb"] = max(self.peaks["actor_peak_gpu_mb"], float(row["gpu_mb"]))
        self.by_status[row["status"]] += 1
        if row["error_code"]:
            self.by_error[row["error_code"]] += 1
        if row["node"]:
            self.rows_by_node[row["node"]] += 1
        self.indexer.add(row)
        self.bar.update()

    def stats(self) -> dict:
        return {"by_status": dict(self.by_status), "by_error": dict(self.by_error),
                "rows_by_node": dict(self.rows_by_node), **{k: round(v, 1) for k, v in self.peaks.items()}}


def summary_previews(bound: Bound, output: str) -> None:
    """Grids across the whole output, from the first few inputs' rows."""
    plan = bound.plan
    if not plan.summary:
        return
    state = index.load(output)
    units = sorted(set(state.winners.column("unit").to_pylist()))
    table = index.read_dataset(output, list(dict.fromkeys([plan.unit_column, *plan.summary])),
                               units[:SUMMARY_SOURCES], key_column=plan.unit_column, state=state)
    bound.stage.bind(plan)
    for name, image in bound.stage.summary_previews(io.columns_of(table)).items():
        io.write_preview(output, name, image)


# ----- the driver -----------------------------------------------------------------------------------------------------
def run_stage(bound: Bound, output: str, options: RunOptions = RunOptions()) -> dict:
    """Run (or resume) one prepared stage into `output`; returns the stats written to `output/stats.json`."""
    t0 = time.time()
    io.refuse_credentials(output, "--output")
    description = bound.description()
    fp = fingerprint(description)
    if options.dry_run:
        return dry_run(bound, output, fp, description, options)
    runtime.init_ray()
    check_output_location(output, options)
    with OutputLock(output, wait=options.wait) as lock:
        runs = claim_output(output, description, fp, options.overwrite)
        read_own_json(output, "stats.json", repair=True)  # replaced at the end: damaged bytes go to quarantine
        run = redact_all({**description, "fingerprint": fp, "inputs": bound.source.inputs,
                          "metadata": bound.plan.metadata, "runs": [*runs, run_record(options, t0, lock.gen)]})
        lock.check()
        io.write_json(output, "run.json", run)
        if bound.plan.kind == "aggregate":
            stats = run_aggregate(bound, output, fp, options, lock)
        else:
            stats = run_rows(bound, output, fp, options, lock)
        stats = redact_all({"stage": bound.stage.name, "fingerprint": fp, **stats,
                            "seconds": round(time.time() - t0, 3)})
        if "rows_processed" in stats:
            stats["rows_per_second"] = round(stats["rows_processed"] / max(stats["seconds"], 1e-9), 4)
        lock.check()
        io.write_json(output, "stats.json", stats)
        run["runs"][-1]["finished"] = time.time()
        lock.check()
        io.write_json(output, "run.json", run)
        lock.check()
        stats["report"] = write_report(output)
    return stats


def write_report(output: str) -> str | None:
    """The output's report.html; a report that cannot be made is said, never the run's failure (its rows are
    written)."""
    try:
        return report.write(output)
    except Exception as exc:  # noqa: BLE001 (the data is safe; the page is a view of it)
        print(f"latentray: warning: report.html of {redact(output)} not written: {type(exc).__name__}: "
              f"{redact(str(exc))}; try `latentray report {redact(output)}`", file=sys.stderr)
        return None


def inputs_dataset(bound: Bound, todo: set[str], allowed: set[str] | None, options: RunOptions):
    """The stage's input rows still to do, as a dataset (photos cut by its reader's CPU tasks first)."""
    source = bound.source
    ds = runtime.dataset(source.items(todo, allowed), source.expand,
                         source.expand_args(allowed) if source.expand is not None else None)
    if bound.reader is not None:
        ds = runtime.map_stage(ds, bound.reader, bound.reader_plan, options.batch_size)
    return ds


def run_rows(bound: Bound, output: str, fp: str, options: RunOptions, lock: OutputLock) -> dict:
    plan = bound.plan
    identities = bound.source.identities()
    keys = sorted(identities)
    allowed = sources.limited(keys, options.limit)
    state = index.load(output, repair=True, fingerprint=fp)
    resume = plan_units(state, identities, allowed, options.retry_failed, max(1, len(plan.variants)))
    todo = {k for k in keys if k not in resume.done}
    counts = {"by_status": {}, "by_error": {}, "rows_by_node": {}}
    if todo:
        ds = runtime.map_stage(inputs_dataset(bound, todo, allowed, options), bound.stage, plan, options.batch_size,
                               options.device, options.actors, options.resources)
        ds = runtime.write(ds, write_batch, {
            "output": output, "previews": plan.previews, "ticket": lock.ticket, "unit_column": plan.unit_column,
            "drop": bound.drop,
            "metadata": redact_all({**plan.metadata, "stage": bound.stage.name, "fingerprint": fp,
                                    "schema_version": io.SCHEMA_VERSION})})
        indexer = Indexer(output, lock, fp)
        counter = Counts(bound.stage.name, len(todo) * max(1, len(plan.variants)), options.progress, lock, indexer)
        runtime.drain(ds, counter, bound.stage.name)
        indexer.flush()
        counts = counter.stats()
    final = index.load(output, repair=True, fingerprint=fp)  # the index plus the parts written since
    tidied = index.tidy(output, final, lock.gen, lock.check)
    if todo:
        summary_previews(bound, output)
    return {"rows_processed": sum(counts["by_status"].values()), "inputs": len(keys),
            "already_done": len(resume.done), "redone": len(resume.redo), "changed": len(resume.changed),
            "missing_inputs": len(resume.missing), "quarantined": [*state.quarantined, *final.quarantined],
            **tidied, **counts}


def run_aggregate(bound: Bound, output: str, fp: str, options: RunOptions, lock: OutputLock) -> dict:
    """Every batch reduced where it is read (or on the actor pool when the stage needs models), merged on the
    driver as partial states arrive: memory stays that of one state however many rows there are. The result
    records the identity of the upstream rows it was computed on; a rerun is a no-op until they change."""
    identities = bound.source.identities()
    keys = sorted(identities)
    allowed = sources.limited(keys, options.limit)
    upstream = index.digest(*(f"{k}={identities[k]}" for k in keys), str(options.limit), n=24)
    previous = read_own_json(output, "stats.json", repair=True) or {}
    if previous.get("fingerprint") == fp and previous.get("upstream_digest") == upstream and \
            results_intact(output, previous.get("results", {})):
        return {**{k: v for k, v in previous.items() if k not in ("stage", "fingerprint", "seconds")},
                "already_done": True}
    partials = runtime.map_stage(inputs_dataset(bound, set(keys), allowed, options), bound.stage, bound.plan,
                                 options.batch_size, options.device, options.actors, options.resources)
    merged = {"state": None}

    def merge(row: dict) -> None:
        lock.check(storage=False)
        part = pickle.loads(row["state"])  # our own workers' states, never a file's contents
        merged["state"] = part if merged["state"] is None else bound.stage.merge(merged["state"], part)

    runtime.drain(partials, merge, bound.stage.name)
    bound.stage.bind(bound.plan)
    result = bound.stage.finish(merged["state"])
    import pyarrow as pa

    results = {}
    for name, columns in result.tables.items():
        data = io.table_bytes(pa.table(columns))
        lock.check()
        io.write_bytes(output, f"{name}.parquet", data)
        results[f"{name}.parquet"] = hashlib.sha256(data).hexdigest()
    for name, image in result.previews.items():
        io.write_preview(output, name, image)
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


def dry_run(bound: Bound, output: str, fp: str, description: dict, options: RunOptions) -> dict:
    """What a run would do, read-only: inputs, already done, to redo, changed, missing, to do (nothing written or
    repaired)."""
    previous = read_own_json(output, "run.json", repair=False)
    identities = bound.source.identities()
    keys = sorted(identities)
    allowed = sources.limited(keys, options.limit)
    resumable = previous is None or previous.get("fingerprint") == fp
    state = index.load(output)
    resume = plan_units(state, identities, allowed, options.retry_failed, max(1, len(bound.plan.variants))) \
        if resumable and bound.plan.kind == "rows" else Resume()
    lease = OutputLock(output).holder()
    return redact_all({"dry_run": True, "stage": bound.stage.name, "fingerprint": fp, "config": description,
            "inputs": len(keys), "already_done": len(resume.done), "to_redo": len(resume.redo),
            "changed": len(resume.changed), "missing_inputs": len(resume.missing),
            "to_do": len(keys) - len(resume.done), "resumable": resumable,
            "damaged": [p for p, _ in state.damaged], "locked_by": describe_lease(lease) if lease else None})


# ----- from Python --------------------------------------------------------------------------------------------------
def stage_class(stage) -> type:
    if isinstance(stage, str):
        stages = registered()
        if stage not in stages:
            raise ValueError(f"unknown stage {stage!r} (stages: {sorted(stages)})")
        return stages[stage]
    return stage if isinstance(stage, type) else type(stage)


def run(stage, inputs: list[str], output: str, config=None, photos_config=None,
        options: RunOptions = RunOptions()) -> dict:
    """Run a stage (its command name, class or instance) from Python, as its `latentray` subcommand does."""
    if not isinstance(stage, (str, type)):
        instance = stage
    else:
        instance = stage_class(stage)(config)
    if photos_config is not None and instance.photos in PHOTO_READERS and \
            not isinstance(photos_config, PHOTO_READERS[instance.photos][1]):
        raise ValueError(f"{instance.name} reads photos with {PHOTO_READERS[instance.photos][1].__name__}, got "
                         f"{type(photos_config).__name__}")
    bound = prepare(instance, sources.source_for(instance, [str(i) for i in inputs]), photos_config)
    return run_stage(bound, str(output), options)
