"""The stage contract (DESIGN §2) as plain Python. No Ray.

A stage is built from its frozen Config on the driver (cheap checks only). `prepare(context)` runs once on the
driver — checkpoint digests, anything read from the input's own files; misconfiguration raises here, before any row
— and returns a frozen `Plan`: the columns the stage reads and adds (name, dtype, shape, stored or preview-only),
its kind (row stage or aggregate), resources (a GPU makes it an actor pool, none a task), the size of its `image`
input, its fan-out variants and provenance. `prepare` never changes the stage: the runtime reads only the plan (to
check a chain column by column, to fingerprint, to store, to blank rows). On each worker, `setup(plan, device)`
loads the models once; then
* a row stage (`Stage`) turns a batch into the same rows in the same order with its columns added — or, when its
  plan has variants, every input row once per variant, in input order, keyed `<key>|<variant>` with `source_key`;
* an aggregate (`Aggregate`) reduces batches: `partial(batch) -> state`, `merge(a, b)`, `finish(state) -> Result`.

Rows whose status is not `ok` pass through untouched (the stage's columns blank: NaN tensors, empty strings and
bytes, as the plan declares); a row's first failure (`status`, `error_code`, `error`) is never overwritten.
`compute` raising fails the rows it was given; an out-of-memory error first halves the batch down to one row.

A new stage is one file. A complete row stage (it is registered as `latentray brighten` by being defined, with its
Config fields as options):

    @dataclass(frozen=True)
    class BrightenConfig:
        column: str = "aligned"  # image column of the input (uint8 [H, W, 3])
        gain: float = 1.2  # brightness factor

    class BrightenStage(Stage):
        name = "brighten"
        Config = BrightenConfig
        help = "brighten an image column"
        examples = ("latentray brighten --input out/aligned --output out/bright",)

        def prepare(self, context: Context) -> Plan:
            return Plan(inputs=(Column(self.config.column, "uint8", None),),
                        outputs=(Column("bright", "uint8", None),), previews=("bright",))

        def compute(self, batch):
            images = np.stack(batch[self.config.column]).astype(np.float32)
            return {"bright": np.clip(images * self.config.gain, 0, 255).astype(np.uint8)}

`ops/thumbnails.py` is such a stage, shipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

ROW_COLUMNS = ("key", "status", "error_code", "error")

# Error codes a rerun retries by itself: the input or the machine was at fault, not the row. Every other code is
# permanent (decode_error, too_large, no_face, multiple_faces, not_applicable, nonfinite_latent, <stage>_error, ...)
# and is redone only with --retry-failed. Rows skipped for `limit` are redone once a --limit covers them.
TRANSIENT_CODES = frozenset({"out_of_memory", "io_error", "read_error", "worker_crash"})
DEFERRED_CODES = frozenset({"limit"})
REGISTRY: dict[str, type] = {}  # user-facing stages by command name, filled as their classes are defined


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


# ----- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column a stage reads or adds. dtype: a numpy dtype name, "str" or "bytes" (None: any, for inputs);
    shape: per row (None: any, e.g. images whose size the check does not fix); stored: False for pixels that travel to previews or the next
    stage but are not kept; fill: the value of a row the stage did not compute (None: NaN, 0, "" or b"")."""

    name: str
    dtype: str | None = "float32"
    shape: tuple[int, ...] | None = ()
    stored: bool = True
    fill: Any = None

    def blank(self, n: int) -> np.ndarray:
        if self.dtype in ("str", "bytes"):
            return objects([self.fill if self.fill is not None else ("" if self.dtype == "str" else b"")] * n)
        dtype = np.dtype(self.dtype)
        fill = self.fill if self.fill is not None else (np.nan if dtype.kind == "f" else 0)
        return np.full((n, *(self.shape or ())), fill, dtype=dtype)

    def accepts(self, found: "Column") -> bool:
        """Whether a column found upstream fits what this one declares."""
        shape_ok = self.shape is None or found.shape is None or tuple(self.shape) == tuple(found.shape)
        return shape_ok and (self.dtype in (None, found.dtype) or {self.dtype, found.dtype} <= {"str", "bytes"})

    def describe(self) -> str:
        return f"{self.dtype or 'any'}{list(self.shape) if self.shape else ''}"


ROW_SCHEMA = tuple(Column(c, "str") for c in ROW_COLUMNS)


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0  # CPUs per task, or per actor on CPU
    num_gpus: float = 0.0  # GPUs per actor: a stage declaring a GPU runs on an actor pool (CPU actors without one)


@dataclass(frozen=True)
class Plan:
    """What a prepared stage will do, as a value (see the module docstring)."""

    outputs: tuple[Column, ...] = ()  # the columns it adds, blanked on rows it does not compute
    inputs: tuple[Column, ...] | None = None  # what it reads of a stage output (checked; None: every column)
    carry: bool = False  # read every column of a stage output, not only `inputs`: its rows carry them on
    kind: Literal["rows", "aggregate"] = "rows"
    resources: Resources = Resources()
    batch_size: int = 8
    image_size: int | None = None  # the square size its `image` input must have (photos are cut to it)
    variants: tuple[str, ...] = ()  # fan-out labels: every input row once per variant
    labels: tuple[Column, ...] = ()  # columns saying which variant a fanned-out row is (set by the stage, kept)
    previews: tuple[str, ...] = ()  # uint8 image columns shown side by side in the preview grid of a part
    summary: tuple[str, ...] = ()  # output columns `summary_previews` reads back after the run
    rename: dict = field(default_factory=dict)  # {upstream column: input column} when reading a stage output
    checkpoints: dict = field(default_factory=dict)  # sha256 of every model file (run.json, fingerprint)
    metadata: dict = field(default_factory=dict)  # schema metadata of the parts
    fingerprint: dict = field(default_factory=dict)  # anything else that decides the result (e.g. parsed edits)
    prepared: dict = field(default_factory=dict)  # what `prepare` found that setup and compute need

    @property
    def on_actors(self) -> bool:
        return self.resources.num_gpus > 0

    @property
    def unit_column(self) -> str:
        """The column naming the input a row came from (the unit of resume)."""
        return "source_key" if self.variants else "key"

    def not_stored(self) -> set[str]:
        return {c.name for c in self.outputs if not c.stored}


@dataclass
class Context:
    """What the driver gives `prepare`: the input's run.json and column schema (None for photos until their reader
    is known) and readers, so
    that ops/ never touches storage itself. The readers of outputs (`read_input`, `read_table`, `read_output`) are
    None when the outputs may not exist yet (a pipeline file checked before its first stage ran): stages then skip
    what needs them."""

    upstream: dict | None = None
    columns: dict[str, Column] | None = None  # the input's columns: a stage output's, or those its photo reader makes
    read_input: Callable[[list[str] | None, list[str]], dict] | None = None  # (keys or None = all, columns)
    read_bytes: Callable[[str], bytes] | None = None  # a small file (edits list, key list, direction) by URI
    read_table: Callable[[str, list[str]], dict] | None = None  # a result table of another output by URI
    read_output: Callable[[str, list[str]], dict] | None = None  # columns of every row of another stage output


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


def blank(columns, n: int) -> dict[str, np.ndarray]:
    """The columns' values for n rows nobody computed."""
    return {c.name: c.blank(n) for c in columns}


# ----- stages -------------------------------------------------------------------------------------------------------
class Base:
    """What row stages and aggregates share: a name, a Config, required options, the user-facing description that
    makes the stage a `latentray` command (help, examples, epilog, where its rows may come from)."""

    name = ""
    Config: type = type(None)
    required: tuple[str, ...] = ()  # Config fields that must be given (no usable default)
    help = ""  # a user-facing stage (registered as a command) has a help line
    examples: tuple[str, ...] = ()
    epilog = ""
    photos: str | None = None  # photo files become its rows: "ingest" (decode + align), "decode", "self"; None: no
    reads_outputs = True  # may read an earlier stage's output
    describes_input: tuple[str, ...] = ()  # columns about the input's bytes, kept on a failed row (e.g. sha256)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("help") and cls.name:  # declared here, not inherited: a subclass is no new command
            REGISTRY[cls.name] = cls

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.plan: Plan | None = None
        missing = [f"--{n.replace('_', '-')}" for n in self.required if not getattr(self.config, n)]
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(missing)}")

    def prepare(self, context: Context) -> Plan:
        return Plan()

    def bind(self, plan: Plan) -> None:
        """Keep the plan this stage runs with (what `finish` of an aggregate reads on the driver)."""
        self.plan = plan

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        """Once per worker: keep the plan, load models (subclasses call this first)."""
        self.bind(plan)

    def ready(self, context: Context | None = None, device: str = "cpu") -> "Base":
        """prepare then setup in this process (Python use and tests; the runtime does the two apart)."""
        self.setup(self.prepare(context or Context()), device)
        return self

    reads_files = False  # its rows come from files that are neither photos nor stage outputs: see `read_files`

    def read_files(self, inputs: list[str], context: Context, plan: Plan) -> tuple[dict, dict]:
        """Rows from such files (e.g. other tools' latents): (columns with `key`, a description of the files for the
        fingerprint)."""
        raise NotImplementedError


class Stage(Base):
    """A row stage: implements `compute` (and `prepare`/`setup` when it needs models or the input's files)."""

    chunk: int | None = None  # most rows per compute call (set by a probe on GPUs); None: the whole batch

    def summary_previews(self, table: dict) -> dict[str, np.ndarray]:
        """Grids across the whole output (name -> uint8 image), from the plan's `summary` columns of every row."""
        return {}

    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This stage's columns for a batch of ok rows (its input columns, before any blanking). May return
        `error_code`/`error` arrays ("" = fine) and optionally `status` ("failed" or "skipped") to fail or skip
        single rows; raising fails them all."""
        raise NotImplementedError

    def variant_columns(self, variant: np.ndarray) -> dict[str, np.ndarray]:
        """The plan's `labels` columns of fanned-out rows, from each row's variant (its index in `variants`)."""
        return {}

    # ----- the contract, shared by every row stage ----------------------------------------------------------
    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.plan is None:
            raise RuntimeError(f"{self.name}: setup(plan) (or ready()) comes before process")
        batch = self.expand(batch)
        out = {k: (np.array(v, dtype=object, copy=True) if k in ROW_COLUMNS else np.asarray(v))
               for k, v in batch.items()}
        out.update(blank(self.plan.outputs, len(out["key"])))
        rows = np.flatnonzero(out["status"] == "ok")
        if rows.size:
            self._compute_into(batch, out, rows)
        return out

    def expand(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fan-out: every row once per variant (input order, then variant order), keyed `<key>|<variant>`, with
        `source_key` and `variant` (its position in the plan's variants)."""
        labels = self.plan.variants
        if not labels:
            return batch
        n, k = len(batch["key"]), len(labels)
        out = {c: np.repeat(np.asarray(v), k, axis=0) for c, v in batch.items()}
        out["source_key"] = out["key"]
        out["variant"] = np.tile(np.arange(k), n)
        out["key"] = objects([f"{s}|{labels[v]}" for s, v in zip(out["source_key"], out["variant"])])
        out.update(self.variant_columns(out["variant"]))
        return out

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
            if column not in out:  # every column must be declared in the plan, so rows not computed have it too
                raise KeyError(f"{self.name}.compute returned undeclared column {column!r}")
            out[column][rows] = value
        if codes is not None:
            for i in np.flatnonzero(np.asarray(codes, dtype=object) != ""):
                self.fail(out, rows[i:i + 1], codes[i], messages[i],
                          statuses[i] if statuses is not None else "failed")

    def fail(self, out: dict, rows: np.ndarray, code: str, message: str, status: str = "failed") -> None:
        """Mark rows failed (or skipped: rows the stage deliberately does not process) and blank every column this
        stage wrote for them (NaN, never null) but those describing the input's bytes."""
        out["status"][rows], out["error_code"][rows], out["error"][rows] = status, code, message
        for column in self.plan.outputs:
            if column.name not in self.describes_input:
                out[column.name][rows] = column.blank(len(rows))


@dataclass
class Result:
    """What an aggregate produces: tables (name -> columns) written as `<name>.parquet`, preview images, and
    figures for stats.json."""

    tables: dict[str, dict] = field(default_factory=dict)
    previews: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Aggregate(Base):
    """A population stage: `partial` per batch (any batching gives the same final result), `merge`, `finish`.
    Its plan's kind is "aggregate"."""

    def partial(self, batch: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def finish(self, state: Any) -> Result:
        raise NotImplementedError


def registered() -> dict[str, type]:
    """Every user-facing stage: each registers itself when its module is imported, and every module of ops/ is."""
    import importlib
    import pkgutil

    import ops

    for module in pkgutil.iter_modules(ops.__path__):
        importlib.import_module(f"ops.{module.name}")
    return dict(sorted(REGISTRY.items(), key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else len(ORDER)))


ORDER = ("ingest", "invert", "import", "edit", "channels", "dci", "paste", "destylize", "stylize", "translate")  # help


def config_dict(config) -> dict:
    """A Config as plain JSON-able data (run.json, fingerprint)."""
    return dataclasses.asdict(config)


def image_column(name: str, size: int | None = None, stored: bool = True) -> Column:
    """A uint8 [size, size, 3] image column (any size when None)."""
    return Column(name, "uint8", (size, size, 3) if size else None, stored=stored)
