"""The stage contract (DESIGN §2) as plain Python. No Ray.

A stage is built from its frozen Config on the driver (cheap checks only), `prepare(context)` runs once on the
driver (checkpoint digests, schema metadata, anything read from the input's own files; misconfiguration raises
here, before any row), the stage is then shipped to workers, `setup(device)` loads its models once per worker, and
`process(batch)` runs per batch:
* a row stage (`Stage`) returns the same rows in the same order with its columns added — or, when it fans out
  (`variants`), every input row once per variant, in input order, keyed `<key>|<variant>` with `source_key`;
* a population stage (`Aggregate`) reduces batches: `partial(batch) -> state`, `merge(a, b) -> state`,
  `finish(state) -> Result`.

Rows whose status is not `ok` pass through untouched (their new columns blank: NaN tensors, empty strings); a row's
first failure (`status`, `error_code`, `error`) is never overwritten. `compute` raising fails the rows it was
given; an out-of-memory error first halves the batch (results never depend on the batch) down to one row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

ROW_COLUMNS = ("key", "status", "error_code", "error")

# Error codes a rerun retries by itself: the input or the machine was at fault, not the row. Every other code is
# permanent (decode_error, too_large, no_face, multiple_faces, not_applicable, nonfinite_latent, <stage>_error, ...)
# and is redone only with --retry-failed. Rows skipped for `limit` are redone once a --limit covers them.
TRANSIENT_CODES = frozenset({"out_of_memory", "io_error", "read_error", "worker_crash"})
DEFERRED_CODES = frozenset({"limit"})


def is_transient(error_code: str) -> bool:
    return error_code in TRANSIENT_CODES


def error_code_for(exc: BaseException, stage: str) -> str:
    """The error code of an exception raised while computing rows: out_of_memory and io_error are transient,
    anything else is `<stage>_error` (a deterministic failure would fail again)."""
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or \
            type(exc).__name__ == "OutOfMemoryError":
        return "out_of_memory"
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return "io_error"
    return f"{stage}_error"


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0  # CPUs per task, or per actor of a model stage on CPU
    num_gpus: float = 0.0  # GPUs per actor of a model stage when the run uses GPUs


@dataclass
class Context:
    """What the driver gives `prepare`: the input's run.json (None for photos) and readers, so that ops/ never
    touches storage itself."""

    upstream: dict | None = None
    read_input: Callable[[list[str] | None, list[str]], dict] | None = None  # (keys or None = all, columns)
    read_bytes: Callable[[str], bytes] | None = None  # a small file (edits list, key list, direction) by URI
    read_table: Callable[[str, list[str]], dict] | None = None  # a result table of another output by URI
    read_output: Callable[[str, list[str]], dict] | None = None  # columns of every row of another stage output


@dataclass
class Provenance:
    """What `prepare` found: sha256 of every model file (run.json, fingerprint), the schema metadata of the parts,
    and anything else that decides the result (e.g. the parsed edits) for the fingerprint."""

    checkpoints: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)


def resolve_device(name: str):
    """auto -> cuda when this process sees a GPU, else cpu."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def largest_fitting_batch(try_batch, limit: int) -> int:
    """The largest batch size <= limit (doubling from 1, then `limit` itself) for which `try_batch(n)` runs without
    running out of memory: the automatic batch of GPU actors, found by a one-step probe in `setup`."""
    fits, n = 0, 1
    while True:
        try:
            try_batch(n)
        except Exception as exc:
            if error_code_for(exc, "") != "out_of_memory":
                raise
            break
        fits = n
        if n >= limit:
            break
        n = min(2 * n, limit)
    if fits == 0:
        raise MemoryError("not even one row fits in memory")
    return fits


def objects(values) -> np.ndarray:
    """A 1-D object array (numpy would otherwise turn a list of bytes into a fixed-width bytes array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def blank_like(shapes: dict[str, tuple], n: int, dtypes: dict | None = None) -> dict[str, np.ndarray]:
    """Blank columns for n rows: NaN float32 tensors of the given shapes (never null), unless `dtypes` says otherwise
    (object columns get "", integers 0/-1 as given by the fill of `dtypes`)."""
    dtypes = dtypes or {}
    out = {}
    for name, shape in shapes.items():
        kind = dtypes.get(name, np.float32)
        if kind is object:
            out[name] = objects([b"" if name.endswith("_png") else ""] * n)
        elif np.issubdtype(kind, np.floating):
            out[name] = np.full((n, *shape), np.nan, dtype=kind)
        else:
            out[name] = np.zeros((n, *shape), dtype=kind)
    return out


class Stage:
    """A row stage. Subclasses set the class attributes and implement `blank` and `compute` (and `setup`/`prepare`
    when they need models or the input's files)."""

    name = ""
    Config: type = type(None)
    resources = Resources()
    batch_size = 8
    uses_models = False  # True: an actor pool (models loaded once per actor); False: stateless tasks
    required: tuple[str, ...] = ()  # Config fields that must be given (no usable default)
    input_columns: tuple[str, ...] | None = None  # columns read from a stage output (None: all, carried through)
    describes_input: tuple[str, ...] = ()  # columns about the input's bytes, kept on a failed row (e.g. sha256)
    image_size: int | None = None  # the square size its `image` input must have (set by prepare/__init__)

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        missing = [f"--{n.replace('_', '-')}" for n in self.required if not getattr(self.config, n)]
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(missing)}")

    # ----- lifecycle ---------------------------------------------------------------------------------------------
    def prepare(self, context: Context) -> Provenance:
        return Provenance()

    def setup(self, device: str = "cpu") -> None:
        pass

    # ----- declared output -----------------------------------------------------------------------------------
    def variants(self) -> list[str]:
        """Labels of the output rows per input row (fan-out); empty = one row per input, same key."""
        return []

    @property
    def key_column(self) -> str:
        """The column naming the input a row came from (resume unit)."""
        return "source_key" if self.variants() else "key"

    def preview_columns(self) -> tuple[str, ...]:
        """uint8 image columns shown side by side in each part's preview grid."""
        return ()

    def summary_columns(self) -> tuple[str, ...]:
        """Output columns `summary_previews` needs (read back after the run)."""
        return ()

    def summary_previews(self, table: dict) -> dict[str, np.ndarray]:
        """Grids across the whole output (name -> uint8 image), from the `summary_columns` of every row."""
        return {}

    def blank(self, n: int) -> dict[str, np.ndarray]:
        """This stage's columns for n rows it does not compute (failed, skipped)."""
        return {}

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This stage's columns for a batch of ok rows (its input columns, before any blanking). May return
        `error_code`/`error` arrays ("" = fine) and optionally `status` ("failed" or "skipped") to fail or skip
        single rows; raising fails them all."""
        raise NotImplementedError

    # ----- the contract, shared by every row stage ----------------------------------------------------------
    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.expand(batch)
        out = {k: (np.array(v, dtype=object, copy=True) if k in ROW_COLUMNS else np.asarray(v))
               for k, v in batch.items()}
        out.update(self.blank(len(out["key"])))
        rows = np.flatnonzero(out["status"] == "ok")
        if rows.size:
            self._compute_into(batch, out, rows)
        return out

    def expand(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fan-out: every row once per variant (input order, then variant order), keyed `<key>|<variant>`, with
        `source_key` and `variant` (its position in `variants()`)."""
        labels = self.variants()
        if not labels:
            return batch
        n, k = len(batch["key"]), len(labels)
        out = {c: np.repeat(np.asarray(v), k, axis=0) for c, v in batch.items()}
        out["source_key"] = out["key"]
        out["variant"] = np.tile(np.arange(k), n)
        out["key"] = objects([f"{s}|{labels[v]}" for s, v in zip(out["source_key"], out["variant"])])
        return out

    chunk: int | None = None  # most rows per compute call (set by a probe on GPUs); None: the whole batch

    def _compute_into(self, batch: dict, out: dict, rows: np.ndarray) -> None:
        if self.chunk and len(rows) > self.chunk:
            for start in range(0, len(rows), self.chunk):
                self._compute_into(batch, out, rows[start:start + self.chunk])
            return
        try:
            values = dict(self.compute({c: np.asarray(v)[rows] for c, v in batch.items()}))
        except Exception as exc:  # the rows fail, never the job
            code = error_code_for(exc, self.name)
            if code == "out_of_memory" and len(rows) > 1:
                half = len(rows) // 2
                self._compute_into(batch, out, rows[:half])
                self._compute_into(batch, out, rows[half:])
                return
            self.fail(out, rows, code, f"{type(exc).__name__}: {exc}")
            return
        codes, messages, statuses = (values.pop(c, None) for c in ("error_code", "error", "status"))
        for column, value in values.items():
            if column not in out:  # every column must be declared in blank(), so rows not computed have it too
                raise KeyError(f"{self.name}.compute returned undeclared column {column!r}")
            out[column][rows] = value
        if codes is not None:
            for i in np.flatnonzero(np.asarray(codes, dtype=object) != ""):
                self.fail(out, rows[i:i + 1], codes[i], messages[i],
                          statuses[i] if statuses is not None else "failed")

    def fail(self, out: dict, rows: np.ndarray, code: str, message: str, status: str = "failed") -> None:
        """Mark rows failed (or skipped: rows the stage deliberately does not process) and blank every column this
        stage wrote for them (NaN, never null)."""
        out["status"][rows], out["error_code"][rows], out["error"][rows] = status, code, message
        for column, value in self.blank(len(rows)).items():
            if column not in self.describes_input:
                out[column][rows] = value


@dataclass
class Result:
    """What an aggregate produces: tables (name -> columns) written as `<name>.parquet`, preview images, and
    figures for stats.json."""

    tables: dict[str, dict] = field(default_factory=dict)
    previews: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Aggregate(Stage):
    """A population stage: `partial` per batch (any batching gives the same final result), `merge`, `finish`."""

    def partial(self, batch: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def finish(self, state: Any) -> Result:
        raise NotImplementedError


def config_dict(config) -> dict:
    """A Config as plain JSON-able data (run.json, fingerprint)."""
    return dataclasses.asdict(config)
