"""Where a stage's rows come from, as plain descriptions (no Ray): photo files, an earlier stage's output, or other
files a stage reads itself. Each source gives the `Context` its stage prepares with, its inputs' identities
(`key -> input_id`), the items of the rows still to do and, for stage outputs, the function that turns an item
(a part and the keys to keep) into rows. The runtime makes Ray datasets of these.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ops.redact import redact
from ops.stage import ROW_COLUMNS, Column, Context, Plan
from pipelines import index, io

IDENTITY_COLUMNS = ("input_id", "row_id")  # written by the runtime on every row


def context(upstream: dict | None = None, columns: dict | None = None, read_input=None,
            outputs_exist: bool = True) -> Context:
    """The one Context constructor: the source's own facts plus the readers every stage may use (no readers of
    outputs while checking a pipeline file whose outputs do not exist yet)."""
    return Context(upstream=upstream, columns=columns, read_input=read_input, read_bytes=io.read_file,
                   read_table=read_result_table if outputs_exist else None,
                   read_output=read_output if outputs_exist else None)


def read_output(uri: str, columns: list[str]) -> dict:
    """Columns of every row of another stage output (e.g. the photos' geometry for paste)."""
    return io.columns_of(index.read_dataset(uri, ["key", *[c for c in columns if c != "key"]]))


def read_result_table(uri: str, columns: list[str]) -> dict:
    """A result table of another output (e.g. a channels run's population_stats.parquet) as numpy columns."""
    return io.columns_of(io.parse_table(io.read_file(uri), uri, columns))


def row_status(ok: bool) -> dict:
    return {"status": "ok", "error_code": "", "error": ""} if ok else \
        {"status": "skipped", "error_code": "limit", "error": "beyond --limit"}


def limited(keys: list[str], limit: int | None) -> set[str] | None:
    """The keys --limit lets through (None: all)."""
    return set(sorted(keys)[:limit]) if limit is not None else None


class Photos:
    """Image files (directories, globs, files, s3:// URIs). A photo's identity is its uri, size and version (mtime,
    ETag), all from the listing: no extra read per file."""

    columns = None
    upstream = None

    def __init__(self, inputs: list[str]):
        from ops.ingest import list_input_files

        self.inputs = list(inputs)
        self.files = [(k, u, int(info.get("size", -1)), io.version_of(info))
                      for k, u, info in list_input_files(self.inputs)]

    @staticmethod
    def identity(uri: str, size: int, version: str) -> str:
        """Of the uri without credentials: a re-signed URL is the same input, and no secret is hashed."""
        return index.digest(redact(uri), size, version)

    def context(self) -> Context:
        return context()

    def bind(self, plan: Plan) -> None:
        pass

    def describe(self) -> dict:
        return {}

    def identities(self) -> dict[str, str]:
        return {k: self.identity(u, size, version) for k, u, size, version in self.files}

    def items(self, todo: set[str], allowed: set[str] | None) -> list[dict]:
        return [{"key": k, "uri": u, "source_size": size, "source_version": version,
                 "input_id": self.identity(u, size, version), **row_status(allowed is None or k in allowed)}
                for k, u, size, version in self.files if k in todo]

    expand = None  # the items are the rows


def schema_columns(schema: pa.Schema) -> dict[str, Column]:
    """A stored part's Arrow schema as Columns (what a later stage's inputs are checked against)."""
    out = {}
    for f in schema:
        if isinstance(f.type, pa.FixedShapeTensorType):
            out[f.name] = Column(f.name, f.type.value_type.to_pandas_dtype().__name__, tuple(f.type.shape))
        elif pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            out[f.name] = Column(f.name, "str")
        elif pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            out[f.name] = Column(f.name, "bytes")
        else:
            out[f.name] = Column(f.name, np.dtype(f.type.to_pandas_dtype()).name)
    return out


def read_upstream(batch: dict, path: str, columns: list[str] | None, allowed: set[str] | None, rename: dict
                  ) -> dict:
    """Rows of an earlier stage's output (the winning copies of the planned parts): ok rows past --limit marked
    skipped, columns renamed, the upstream row's identity as this row's `input_id`."""
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
    """The rows of an earlier stage's output: its `run.json` (upstream fingerprint), its stored columns (read off
    one part's footer) and its index (which copy of each row every reader sees)."""

    expand = staticmethod(read_upstream)

    def __init__(self, path: str):
        self.path = path
        self.inputs = [path]
        try:
            self.upstream = io.read_json(path, "run.json")
        except io.Damaged as exc:
            raise ValueError(f"the run.json of input {path} is damaged ({exc}); run `latentray verify {path}` "
                             "and rerun the stage that wrote it") from None
        if self.upstream is None:
            raise ValueError(f"{path} is not a latentray stage output (no run.json)")
        self.state = index.load(path)
        self.columns = self.stored_columns()
        self.read_columns = None  # set by `bind`: what the stage reads (None: every column)
        self.rename: dict = {}

    def stored_columns(self) -> dict[str, Column]:
        if not self.state.parts:
            return {}
        import pyarrow.parquet as pq

        fs, path = io.join(self.path, sorted(self.state.parts)[0])
        schema = io.retrying(lambda: pq.ParquetFile(fs.open(path, "rb")).schema_arrow, f"reading {path}")
        return schema_columns(schema)

    def context(self) -> Context:
        def read_input(keys, columns):  # always with the key column
            columns = ["key", *[c for c in columns if c != "key"]]
            return io.columns_of(index.read_dataset(self.path, columns, keys, state=self.state))

        return context(self.upstream, self.columns, read_input)

    def bind(self, plan: Plan) -> None:
        """Read only what the plan declares (all columns when it declares none), renamed as it says."""
        self.rename = dict(plan.rename)
        if plan.inputs is not None and not plan.carry:
            inverse = {v: k for k, v in self.rename.items()}
            wanted = {inverse.get(c.name, c.name) for c in plan.inputs}
            self.read_columns = sorted({*ROW_COLUMNS, "row_id", *wanted} & set(self.columns))

    def describe(self) -> dict:
        return {"upstream": self.upstream.get("fingerprint"), "rename": self.rename}

    def identities(self) -> dict[str, str]:
        return self.state.identities()

    def items(self, todo: set[str], allowed: set[str] | None) -> list[dict]:
        return [{"part": part, "keep": keep, "size": self.state.parts[part]["size"]}
                for part, keep in index.plan_reads(self.state, todo)]

    def expand_args(self, allowed: set[str] | None) -> dict:
        return {"path": self.path, "columns": self.read_columns, "allowed": allowed, "rename": self.rename}


class Files:
    """Rows a stage reads itself from files that are neither photos nor stage outputs (e.g. other tools' latents).
    A row's identity is its key within the files' description (their sha256)."""

    columns = None
    upstream = None
    expand = None

    def __init__(self, inputs: list[str], stage):
        self.inputs, self.stage = list(inputs), stage
        self.rows, self.description = None, {}

    def context(self) -> Context:
        return context()

    def bind(self, plan: Plan) -> None:
        self.rows, self.description = self.stage.read_files(self.inputs, self.context(), plan)

    def describe(self) -> dict:
        return self.description

    def identities(self) -> dict[str, str]:
        files = json.dumps(self.description, sort_keys=True, default=str)
        return {k: index.digest(files, k) for k in self.rows["key"]}

    def items(self, todo: set[str], allowed: set[str] | None) -> list[dict]:
        ids = self.identities()
        return [{**{c: v[i] for c, v in self.rows.items()}, "input_id": ids[k],
                 **row_status(allowed is None or k in allowed)}
                for i, k in enumerate(self.rows["key"]) if k in todo]


class Planned:
    """The output of an earlier stage of a pipeline file that has not run yet: its predicted columns, no rows (a
    chain is checked column by column before anything runs)."""

    expand = None
    state = None

    def __init__(self, path: str, upstream: dict, columns: dict[str, Column]):
        self.path, self.inputs, self.upstream, self.columns = path, [path], upstream, columns
        self.rename: dict = {}

    def context(self) -> Context:
        return context(self.upstream, self.columns, outputs_exist=False)

    def bind(self, plan: Plan) -> None:
        self.rename = dict(plan.rename)

    def describe(self) -> dict:
        return {"upstream": None, "rename": self.rename}


def source_for(stage, inputs: list[str]):
    """The source of a stage's rows: its own files, one stage output, or photos."""
    inputs = [str(i) for i in inputs]
    for uri in inputs:
        io.refuse_credentials(uri, "--input")
    if stage.reads_files:
        return Files(inputs, stage)
    if len(inputs) == 1 and not any(c in inputs[0] for c in "*?[") and is_stage_output(inputs[0]):
        if not stage.reads_outputs:
            raise ValueError(f"{stage.name} reads photos, and {inputs[0]} is a stage output")
        return StageOutput(inputs[0])
    if stage.photos is None:
        raise ValueError(f"{stage.name} reads the output of an earlier stage (a folder with run.json), got {inputs}")
    return Photos(inputs)


def is_stage_output(path: str) -> bool:
    fs, run_json = io.join(path, "run.json")
    return bool(io.retrying(lambda: fs.exists(run_json), f"looking for {run_json}"))


def check_inputs(stage_name: str, plan: Plan, source) -> None:
    """Every column the plan reads exists in the input with the dtype and shape it declares, and so do the row
    columns: refused before any row, naming the stage, the column and what was found."""
    if source.columns is None:
        return
    found = dict(source.columns)
    for upstream, mine in plan.rename.items():
        if upstream in found:
            found[mine] = Column(mine, found[upstream].dtype, found[upstream].shape)
    where = getattr(source, "path", "the input")
    if not found:
        raise ValueError(f"{stage_name}: the input {where} holds no rows yet (its run stopped before writing any, or "
                         "it had no inputs); finish the stage that writes it first")
    for name in (*ROW_COLUMNS, "row_id"):
        if name not in found:
            raise ValueError(f"{stage_name}: the input {where} has no `{name}` column (not a latentray stage output "
                             f"of this version? its columns: {sorted(found)})")
    named = {mine: upstream for upstream, mine in plan.rename.items()}  # say the column as the user named it
    for column in plan.inputs or ():
        have, name = found.get(column.name), named.get(column.name, column.name)
        if have is None:
            raise ValueError(f"{stage_name}: the input {where} has no column `{name}` ({column.describe()} needed; "
                             f"its columns: {sorted(source.columns)})")
        if not column.accepts(have):
            raise ValueError(f"{stage_name}: column `{name}` of {where} is {have.describe()}, {column.describe()} "
                             "needed")


def predicted_columns(source, plan: Plan, reader_plan: Plan | None) -> dict[str, Column]:
    """The stored columns of the output a stage will write (for a pipeline file checked before it runs)."""
    found: dict[str, Column] = {c: Column(c, "str") for c in (*ROW_COLUMNS, *IDENTITY_COLUMNS)}
    if isinstance(source, Photos):
        found.update({"uri": Column("uri", "str"), "source_size": Column("source_size", "int64"),
                      "source_version": Column("source_version", "str")})
    elif source.columns is not None:
        names = set(source.columns) if plan.inputs is None or plan.carry else {c.name for c in plan.inputs}
        found.update({c.name: c for c in source.columns.values() if c.name in names})
    for p in (reader_plan, plan):
        if p is not None:
            found.update({c.name: c for c in (*p.outputs, *p.labels) if c.stored})
    if plan.variants:
        found.update(source_key=Column("source_key", "str"), variant=Column("variant", "int64"))
    return found
