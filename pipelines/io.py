"""Parquet storage (DESIGN §4): Arrow canonical fixed-shape tensor columns, atomic part files, resume scan."""

from __future__ import annotations

import hashlib
import json
import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Pixels travel between stages (aligned input, original thumbnail, reconstructions for previews) but are not part of
# the latent dataset.
NOT_STORED = ("image", "original")


def objects(values) -> np.ndarray:
    """A 1-D object array (numpy would otherwise turn a list of bytes into a fixed-width bytes array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def rows_to_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts -> batch columns: text/bytes as object arrays, arrays and numbers stacked."""
    return {k: objects([r[k] for r in rows]) if isinstance(rows[0][k], (str, bytes)) else
            np.stack([r[k] for r in rows]) for k in rows[0]}


def is_stored(name: str) -> bool:
    return name not in NOT_STORED and not name.startswith("recon_")


def to_table(batch: dict[str, np.ndarray], metadata: dict) -> pa.Table:
    """Columns of a processed batch -> Arrow table; float tensors become `arrow.fixed_shape_tensor`."""
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
    return table.replace_schema_metadata({"latentray": json.dumps(metadata, sort_keys=True)})


def part_name(keys) -> str:
    """Named after the keys it holds: a retried batch rewrites the same part instead of adding a duplicate."""
    return f"part-{hashlib.sha256(chr(0).join(map(str, keys)).encode()).hexdigest()[:20]}.parquet"


def write_part(table: pa.Table, out_dir: str) -> str:
    """Write atomically: locally to a temp name then rename; on object stores one PUT when the file closes."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    name = part_name(table.column("key").to_pylist())
    final = posixpath.join(root, name)
    if isinstance(fs, LocalFileSystem):
        tmp = posixpath.join(root, f".tmp-{name}")
        pq.write_table(table, tmp, filesystem=fs)
        fs.mv(tmp, final)
    else:
        with fs.open(final, "wb") as f:
            pq.write_table(table, f)
    return final


def prepare_output(out_dir: str, fp: str, overwrite: bool, dry_run: bool = False) -> bool:
    """Refuse to mix configurations in one output; with `overwrite` a different one is discarded (unless this is a
    dry run). Returns whether the output holds the same configuration (so it can be resumed)."""
    previous = read_json(out_dir, "run.json")
    if previous is None or previous.get("fingerprint") == fp:
        return True
    if not overwrite:
        raise ValueError(f"{out_dir} holds a run with another configuration (fingerprint "
                         f"{previous.get('fingerprint')} != {fp}); pass --overwrite to start over")
    if not dry_run:
        fs, root = fsspec.core.url_to_fs(out_dir)
        fs.rm(root, recursive=True)
    return False


def completed_keys(out_dir: str, column: str = "key", repair: bool = True) -> set[str]:
    """Keys already stored (or another key column's values); unreadable parts (a killed writer) and stray temp files
    are deleted to be redone (`repair=False`: only skipped, for dry runs)."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    if not fs.exists(root):
        return set()
    done: set[str] = set()
    for path in fs.ls(root, detail=False):
        base = posixpath.basename(path)
        if base.startswith(".tmp-part-"):
            if repair:
                fs.rm(path)
        elif base.startswith("part-") and base.endswith(".parquet"):
            try:
                with fs.open(path, "rb") as f:
                    done.update(pq.read_table(f, columns=[column]).column(column).to_pylist())
            except Exception:
                if repair:
                    fs.rm(path)
    return done


def write_json(out_dir: str, name: str, obj: dict) -> None:
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(posixpath.join(root, name), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)


def read_json(out_dir: str, name: str) -> dict | None:
    fs, root = fsspec.core.url_to_fs(out_dir)
    path = posixpath.join(root, name)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def part_paths(out_dir: str) -> list[str]:
    """The part files of a stage output, as paths of its filesystem (no protocol)."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    return sorted(p for p in fs.ls(root, detail=False)
                  if posixpath.basename(p).startswith("part-") and p.endswith(".parquet"))


def arrow_filesystem(out_dir: str):
    """A pyarrow filesystem for `part_paths`: native for local paths, fsspec's (S3) wrapped otherwise."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem as ArrowLocal, PyFileSystem

    fs = fsspec.core.url_to_fs(out_dir)[0]
    return ArrowLocal() if isinstance(fs, LocalFileSystem) else PyFileSystem(FSSpecHandler(fs))


def read_dataset(out_dir: str, columns: list[str] | None = None) -> pa.Table:
    """All parts of a stage output as one table (plain pyarrow)."""
    fs, _ = fsspec.core.url_to_fs(out_dir)
    tables = []
    for path in part_paths(out_dir):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({})


def export_latents(out_dir: str, dest: str, column: str = "wplus") -> int:
    """Write the ok rows' latents for tools outside latentray: `.npz` (`keys`, `w` as NVIDIA's projector names its
    array) or `.pt` (rosinality projector style: {key: {"latent": tensor}}). Returns the number of rows."""
    table = read_dataset(out_dir, ["key", "status", column])
    ok = np.array([s == "ok" for s in table.column("status").to_pylist()], dtype=bool)
    keys = [k for k, good in zip(table.column("key").to_pylist(), ok) if good]
    latents = table.column(column).combine_chunks().to_numpy_ndarray()[ok] if len(table) else np.zeros((0,))
    if dest.endswith(".npz"):
        np.savez(dest, keys=np.array(keys), w=latents)
    elif dest.endswith(".pt"):
        import torch

        torch.save({k: {"latent": torch.from_numpy(np.ascontiguousarray(v))} for k, v in zip(keys, latents)}, dest)
    else:
        raise ValueError(f"export destination must end in .npz or .pt, got {dest}")
    return len(keys)


def stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def count_previews(out_dir: str) -> int:
    fs, root = fsspec.core.url_to_fs(out_dir)
    folder = posixpath.join(root, "previews")
    return len(fs.ls(folder, detail=False)) if fs.exists(folder) else 0


def write_png(out_dir: str, name: str, image: np.ndarray) -> None:
    from PIL import Image

    fs, root = fsspec.core.url_to_fs(out_dir)
    path = posixpath.join(root, name)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")


def read_rows(out_dir: str, keys, columns: list[str]) -> pa.Table:
    """Only the rows with these keys (a filter pushed into each part read: never the whole dataset in memory)."""
    keys = list(keys)
    fs, _ = fsspec.core.url_to_fs(out_dir)
    tables = []
    for path in part_paths(out_dir):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=["key", *columns], filters=[("key", "in", keys)]))
    return pa.concat_tables(tables) if tables else pa.table({})


def write_table(out_dir: str, name: str, table: pa.Table) -> str:
    """A result table (not a part of the row dataset), written in one go."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, name)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    return path


def tensor(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-shape tensor column as one numpy array [N, ...]."""
    return table.column(column).combine_chunks().to_numpy_ndarray()
