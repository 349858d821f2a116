"""Storage of stage outputs (DESIGN §4), local or on object stores through fsspec: atomic writes, part files with
Arrow canonical fixed-shape tensor columns, and the scan a resume starts from. No Ray.

Every write is atomic: locally a temp name then a rename, on object stores one PUT. Reads that fail for a storage
reason (timeouts, throttling, permissions) are retried with backoff and then stop the run; they are never taken for
a damaged file. A part that does not parse twice in a row is damaged: it is moved to `<out>/quarantine/` (bytes
kept) and its rows are redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import sys
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ops.stage import objects

# Version of the row schema and file layout. Part of every fingerprint: an output written under another schema is
# never resumed into (pass --overwrite). 2: uri column, lease, quarantine, part replacement, run history.
SCHEMA_VERSION = 2
QUARANTINE = "quarantine"
READ_ATTEMPTS = 4  # a read failing for a storage reason is tried this many times, backing off 0.5, 1, 2 s
READ_BACKOFF = 0.5
# Pixels travel between stages (the input image, the photo's thumbnail, reconstructions for previews) but are not
# part of a stage's stored rows; nor are columns starting with "_" (runtime bookkeeping).
NOT_STORED = ("image", "original")


class StorageError(OSError):
    """Storage kept failing: the run stops and changes nothing it could not read."""


class DamagedPart(ValueError):
    """A part that does not parse (a writer killed mid-write, a file damaged in storage)."""


def url_to_fs(out_dir: str):
    return fsspec.core.url_to_fs(out_dir)


def is_local(out_dir: str) -> bool:
    return isinstance(url_to_fs(out_dir)[0], LocalFileSystem)


def retrying(action, what: str, attempts: int = READ_ATTEMPTS, backoff: float = READ_BACKOFF):
    """Run `action`; a failure of the storage (anything but a parse error or a missing file) is retried with
    exponential backoff, then raised as StorageError."""
    for attempt in range(attempts):
        try:
            return action()
        except (pa.ArrowInvalid, FileNotFoundError, NotADirectoryError, DamagedPart):
            raise
        except Exception as exc:
            if attempt == attempts - 1:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc} (after {attempts} attempts; nothing was "
                                   "changed, rerun when the storage answers)") from exc
            time.sleep(backoff * 2**attempt)


# ----- atomic writes -------------------------------------------------------------------------------------------
def write_bytes(out_dir: str, name: str, data: bytes) -> str:
    """Write `<out_dir>/<name>` atomically (temp + rename locally, one PUT on object stores)."""
    fs, root = url_to_fs(out_dir)
    path = posixpath.join(root, name)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{posixpath.basename(path)}")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)
    return path


def write_json(out_dir: str, name: str, obj: dict) -> None:
    write_bytes(out_dir, name, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def read_json(out_dir: str, name: str) -> dict | None:
    fs, root = url_to_fs(out_dir)
    path = posixpath.join(root, name)

    def read():
        with fs.open(path, "rb") as f:
            return json.loads(f.read())

    try:
        return retrying(read, f"reading {path}")
    except (FileNotFoundError, NotADirectoryError):
        return None


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_table(out_dir: str, name: str, table: pa.Table) -> str:
    """A result table (not part of the row dataset), written atomically."""
    return write_bytes(out_dir, name, table_bytes(table))


def write_png(out_dir: str, name: str, image: np.ndarray) -> None:
    from ops.images import encode_png

    write_bytes(out_dir, name, encode_png(image))


# ----- part files ------------------------------------------------------------------------------------------------
def is_stored(name: str) -> bool:
    return name not in NOT_STORED and not name.startswith(("recon_", "_"))


def to_table(batch: dict[str, np.ndarray], metadata: dict) -> pa.Table:
    """Columns of a processed batch -> Arrow table; tensors become `arrow.fixed_shape_tensor`."""
    arrays, names = [], []
    for name, values in batch.items():
        if not is_stored(name):
            continue
        values = np.asarray(values)
        if values.ndim > 1:
            arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values)))
        elif values.dtype == object and len(values) and isinstance(values[0], bytes):
            arrays.append(pa.array(list(values), pa.binary()))
        elif values.dtype == object:
            arrays.append(pa.array([str(v) for v in values], pa.string()))
        else:
            arrays.append(pa.array(values))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    return with_metadata(table, metadata)


def with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    return table.replace_schema_metadata({"latentray": json.dumps(metadata, sort_keys=True)})


def table_metadata(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(b"latentray")
    return json.loads(raw) if raw else {}


def part_name(keys) -> str:
    """Named after the keys it holds: a retried batch rewrites the same part instead of adding a duplicate."""
    return f"part-{hashlib.sha256(chr(0).join(map(str, keys)).encode()).hexdigest()[:20]}.parquet"


def write_part(table: pa.Table, out_dir: str) -> str:
    return write_bytes(out_dir, part_name(table.column("key").to_pylist()), table_bytes(table))


def part_paths(out_dir: str) -> list[str]:
    """The part files of a stage output, as paths of its filesystem (no protocol)."""
    fs, root = url_to_fs(out_dir)
    if not fs.exists(root):
        return []
    names = retrying(lambda: fs.ls(root, detail=False), f"listing {out_dir}")
    return sorted(p for p in names if posixpath.basename(p).startswith("part-") and p.endswith(".parquet"))


@dataclass
class PartIndex:
    """What a resume needs to know of one part: its rows' units (input keys), statuses and codes."""

    path: str
    units: list[str]
    status: list[str]
    error_code: list[str]
    replaces: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def read_part_table(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """One part, retried on storage errors; a part that fails to parse twice (fresh opens) is DamagedPart."""
    def read():
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read(columns=columns)

    for attempt in range(2):
        try:
            return retrying(read, f"reading {path}")
        except pa.ArrowInvalid as exc:
            if attempt:
                raise DamagedPart(f"{path}: {exc}") from None


def read_part_index(fs, path: str, unit_column: str) -> PartIndex:
    columns = ["key", "status", "error_code"] + ([unit_column] if unit_column != "key" else [])
    table = read_part_table(fs, path, columns)
    return PartIndex(path, table.column(unit_column).to_pylist(), table.column("status").to_pylist(),
                     table.column("error_code").to_pylist(), table_metadata(table.schema).get("replaces", []))


def quarantine(out_dir: str, path: str) -> str:
    """Move a damaged part into `<out>/quarantine/` (its bytes kept for inspection); returns the new path."""
    fs, root = url_to_fs(out_dir)
    dest = posixpath.join(root, QUARANTINE, posixpath.basename(path))
    fs.makedirs(posixpath.dirname(dest), exist_ok=True)
    fs.mv(path, dest)
    print(f"latentray: quarantined damaged part {path} -> {dest}; its rows are redone", file=sys.stderr)
    return dest


@dataclass
class Scan:
    parts: list[PartIndex]
    quarantined: list[str]


def scan_output(out_dir: str, unit_column: str, repair: bool = True) -> Scan:
    """Index every part of an output. With `repair`: stray temp files (writes that never finished) are removed,
    damaged parts quarantined, parts that a newer part replaces removed (a run killed between writing the
    replacement and removing the original), and a unit found in several parts is kept in the first only."""
    fs, root = url_to_fs(out_dir)
    if not fs.exists(root):
        return Scan([], [])
    quarantined, parts = [], []
    names = retrying(lambda: fs.ls(root, detail=False), f"listing {out_dir}")
    for path in sorted(names):
        base = posixpath.basename(path)
        if base.startswith(".tmp-") and repair:
            fs.rm(path)
        elif base.startswith("part-") and base.endswith(".parquet"):
            try:
                parts.append(read_part_index(fs, path, unit_column))
            except FileNotFoundError:
                continue
            except DamagedPart:
                if repair:
                    quarantined.append(quarantine(out_dir, path))
    replaced = {name for p in parts for name in p.replaces}
    stale = [p for p in parts if p.name in replaced]
    parts = [p for p in parts if p.name not in replaced]
    if repair:
        for p in stale:
            fs.rm(p.path)
        seen: set[str] = set()
        for p in list(parts):
            duplicates = set(p.units) & seen
            seen |= set(p.units)
            if duplicates:
                parts = drop_units(out_dir, parts, duplicates, only=[p])
    return Scan(parts, quarantined)


def drop_units(out_dir: str, parts: list[PartIndex], units: set[str], only: list[PartIndex] | None = None
               ) -> list[PartIndex]:
    """Take the rows of `units` out of the parts holding them (all of them, or `only` these): each such part is
    rewritten without them (the new part records that it replaces the old one) and the old one removed. Returns
    the index of the parts afterwards."""
    fs, _ = url_to_fs(out_dir)
    out = []
    for part in parts:
        if (only is not None and part not in only) or not units & set(part.units):
            out.append(part)
            continue
        keep = np.array([u not in units for u in part.units], dtype=bool)
        if keep.any():
            table = read_part_table(fs, part.path).filter(pa.array(keep))
            meta = {**table_metadata(table.schema), "replaces": [part.name]}
            path = write_part(with_metadata(table, meta), out_dir)
            out.append(PartIndex(path, [u for u, k in zip(part.units, keep) if k],
                                 [s for s, k in zip(part.status, keep) if k],
                                 [c for c, k in zip(part.error_code, keep) if k], [part.name]))
        fs.rm(part.path)
    return out


def clear_output(out_dir: str, keep: tuple[str, ...]) -> None:
    """Remove everything in an output except the named entries (--overwrite keeps the lease it holds)."""
    fs, root = url_to_fs(out_dir)
    if fs.exists(root):
        for path in fs.ls(root, detail=False):
            if posixpath.basename(path) not in keep:
                fs.rm(path, recursive=True)


# ----- reading outputs -------------------------------------------------------------------------------------------
def arrow_filesystem(out_dir: str):
    """A pyarrow filesystem for `part_paths`: native for local paths, fsspec's (S3) wrapped otherwise."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem as ArrowLocal, PyFileSystem

    fs = url_to_fs(out_dir)[0]
    return ArrowLocal() if isinstance(fs, LocalFileSystem) else PyFileSystem(FSSpecHandler(fs))


def read_dataset(out_dir: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """All parts of a stage output as one table (plain pyarrow), optionally only rows passing `filters`."""
    fs, _ = url_to_fs(out_dir)
    tables = []
    for path in part_paths(out_dir):
        def read(path=path):
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns, filters=filters)
        tables.append(retrying(read, f"reading {path}"))
    return pa.concat_tables(tables) if tables else pa.table({})


def read_rows(out_dir: str, keys, columns: list[str], key_column: str = "key") -> pa.Table:
    """Only the rows whose `key_column` is one of `keys` (a filter pushed into each part read)."""
    columns = [key_column, *[c for c in columns if c != key_column]]
    return read_dataset(out_dir, columns, filters=[(key_column, "in", list(keys))])


def columns_of(table: pa.Table) -> dict[str, np.ndarray]:
    """A table as numpy columns: tensors [N, ...], numbers as arrays, text and bytes as object arrays."""
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[name] = column.to_numpy_ndarray()
        elif pa.types.is_string(column.type) or pa.types.is_binary(column.type) or \
                pa.types.is_large_string(column.type):
            out[name] = objects(column.to_pylist())
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def tensor(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-shape tensor column as one numpy array [N, ...]."""
    return table.column(column).combine_chunks().to_numpy_ndarray()


def read_file(uri: str) -> bytes:
    fs, path = url_to_fs(uri)
    return retrying(lambda: fs.cat_file(path), f"reading {uri}")


def count_previews(out_dir: str) -> int:
    fs, root = url_to_fs(out_dir)
    folder = posixpath.join(root, "previews")
    return len(fs.ls(folder, detail=False)) if fs.exists(folder) else 0


def stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def export_latents(out_dir: str, dest: str, column: str = "wplus") -> int:
    """Write the ok rows' latents for tools outside latentray: `.npz` (`keys`, `w` as NVIDIA's projector names its
    array) or `.pt` (rosinality projector style: {key: {"latent": tensor}}). Returns the number of rows."""
    table = read_dataset(out_dir, ["key", "status", column])
    ok = np.array([s == "ok" for s in table.column("status").to_pylist()], dtype=bool)
    keys = [k for k, good in zip(table.column("key").to_pylist(), ok) if good]
    latents = tensor(table, column)[ok] if len(table) else np.zeros((0,))
    if dest.endswith(".npz"):
        np.savez(dest, keys=np.array(keys), w=latents)
    elif dest.endswith(".pt"):
        import torch

        torch.save({k: {"latent": torch.from_numpy(np.ascontiguousarray(v))} for k, v in zip(keys, latents)}, dest)
    else:
        raise ValueError(f"export destination must end in .npz or .pt, got {dest}")
    return len(keys)
