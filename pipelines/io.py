"""Storage of stage outputs (DESIGN §4), local or on object stores through fsspec. No Ray.

Two kinds of failure are never confused:
* *fetching* (timeouts, throttling, 403, connection errors, a short read): retried with backoff, then StorageError,
  which stops the run with nothing changed;
* *parsing* bytes that were fetched whole (any exception, whatever its type, or a checksum that does not match):
  the file is damaged (`Damaged`); the caller quarantines it with its bytes and redoes its rows.

Every write is atomic (locally a temp name then a rename, on object stores one PUT) and retried. Parts are
content-addressed: `part-<lease generation>-<sha256 prefix of the bytes>.parquet`, with Parquet page checksums, so
any damaged byte is found by `verify` and by a resume that reads the part. JSON files carry their own checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from models.checkpoints import StorageError, read_bytes, retrying  # noqa: F401  (io.StorageError: one class)
from ops.redact import redact, redact_url
from ops.stage import objects
from pipelines import faults

# Version of the row schema and file layout. Part of every fingerprint: an output written under another schema is
# never resumed into (pass --overwrite). 3: input identity (input_id, row_id), content-addressed parts with page
# checksums, the output index, generation leases, checksummed JSON.
SCHEMA_VERSION = 3
QUARANTINE = "quarantine"
CONCURRENCY = 16  # parallel reads of small files on object stores (each one request)
NAMED_RE = re.compile(r"^(part|seg)-(\d+)-([0-9a-f]{24})\.parquet$")  # content-addressed parts, index segments


class Damaged(ValueError):
    """A file fetched whole that does not parse or fails its checksum."""


def url_to_fs(out_dir: str):
    return fsspec.core.url_to_fs(out_dir)


def is_local(out_dir: str) -> bool:
    return isinstance(url_to_fs(out_dir)[0], LocalFileSystem)


def refuse_credentials(url: str, what: str) -> None:
    """Object stores take credentials from the environment or their config, never from the URL (fsspec would
    read `KEY:SECRET@bucket` as a bucket name and repeat it in every error): refused before first use."""
    if "://" in url and not url.lower().startswith(("http://", "https://")) and redact_url(url) != url:
        raise ValueError(f"{what} {redact(url)}: credentials in an object-store URL are not used; give them in the "
                         "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or the store's config")


def join(out_dir: str, name: str) -> tuple:
    fs, root = url_to_fs(out_dir)
    return fs, posixpath.join(root, name)


# ----- fetching --------------------------------------------------------------------------------------------------
def fetch(fs, path: str, size: int | None = None) -> bytes:
    """A whole file (retried); a read shorter than the listed `size` is a storage failure, never damage."""
    def read():
        data = fs.cat_file(path)
        if size is not None and len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes")
        return data

    return retrying(read, f"reading {path}")


def read_file(uri: str) -> bytes:
    return read_bytes(uri)


def listing(fs, folder: str) -> dict[str, dict]:
    """{basename: info} of a folder (one LIST, retried, never from a cache: other processes write here); {} when it
    does not exist."""
    def ls():
        fs.invalidate_cache(folder)
        return fs.ls(folder, detail=True)

    try:
        infos = retrying(ls, f"listing {folder}")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(i["name"].rstrip("/")): i for i in infos}


def modified(info: dict) -> float:
    """A listed file's modification time (s since the epoch)."""
    mtime = info.get("mtime", info.get("LastModified", 0))
    return mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0)


def version_of(info: dict) -> str:
    """What changes whenever a file is rewritten: its ETag on object stores, its mtime locally."""
    return str(info["ETag"]).strip('"') if info.get("ETag") else repr(modified(info))


def map_bounded(function, items, workers: int = CONCURRENCY) -> list:
    """`function` over items with at most `workers` requests in flight (object stores); in order."""
    items = list(items)
    if len(items) <= 1:
        return [function(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(function, items))


# ----- atomic writes -------------------------------------------------------------------------------------------
def write_bytes(out_dir: str, name: str, data: bytes) -> str:
    """Write `<out_dir>/<name>` atomically (temp + rename locally, one PUT on object stores), retried."""
    fs, path = join(out_dir, name)

    def write():
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if isinstance(fs, LocalFileSystem):
            tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex[:8]}-{posixpath.basename(path)}")
            with fs.open(tmp, "wb") as f:
                f.write(data)
            faults.point("write")
            os.replace(tmp, path)
        else:
            faults.point("write")
            fs.pipe_file(path, data)

    retrying(write, f"writing {path}")
    return path


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` holding `data` only if it does not exist: True if this call created it. Race-free locally (a
    hard link of a complete temp file fails when the name exists) and on S3 (a conditional PUT, If-None-Match);
    other stores: exists-check then write (best effort, see README)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if "s3" in fs.protocol or "s3a" in fs.protocol:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except Exception as exc:  # s3fs maps 412 PreconditionFailed to an OSError/FileExistsError
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in repr(exc) or "412" in str(exc):
                return False
            raise
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def remove(fs, path: str) -> None:
    """Remove a file; already gone is fine (a retried remove whose first attempt went through)."""
    try:
        retrying(lambda: fs.rm(path), f"removing {path}")
    except FileNotFoundError:
        pass


# ----- JSON with its own checksum --------------------------------------------------------------------------------
def canonical_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def json_bytes(obj: dict) -> bytes:
    """Plain, readable JSON whose `checksum` field is the sha256 of every other field (canonical form)."""
    body = json.loads(json.dumps({k: v for k, v in obj.items() if k != "checksum"}, default=str))
    return json.dumps({**body, "checksum": canonical_digest(body)}, indent=1, sort_keys=True).encode()


def parse_json(data: bytes, what: str) -> dict:
    try:
        body = json.loads(data)
        if "checksum" not in body:  # written before checksums (schema <= 2): read as it is
            return body
        if canonical_digest({k: v for k, v in body.items() if k != "checksum"}) != body.pop("checksum"):
            raise ValueError("checksum does not match")
        return body
    except Exception as exc:
        raise Damaged(f"{what}: {type(exc).__name__}: {exc}") from None


def write_json(out_dir: str, name: str, obj: dict) -> None:
    write_bytes(out_dir, name, json_bytes(obj))


def read_json(out_dir: str, name: str) -> dict | None:
    """A JSON file of ours, None when absent; Damaged when it does not parse or fails its checksum."""
    fs, path = join(out_dir, name)
    try:
        return parse_json(fetch(fs, path), path)
    except (FileNotFoundError, NotADirectoryError):
        return None


# ----- Parquet ------------------------------------------------------------------------------------------------------
ROW_GROUP_ROWS = 1024  # a reader wanting a few rows (the report's gallery previews) reads their row groups only


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True, row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def arrow_owned(data: bytes) -> pa.Buffer:
    """A copy of `data` in memory Arrow owns. Arrow's reader threads may release their last reference after
    read_table returns; releasing a Python-owned buffer takes the GIL, which at interpreter exit aborts the process
    ("terminate called without an active exception", seen in 1 of ~12 `latentray verify` runs)."""
    buffer = pa.allocate_buffer(len(data))
    np.frombuffer(buffer, np.uint8)[:] = np.frombuffer(data, np.uint8)
    return buffer


def parse_table(data: bytes, what: str, columns: list[str] | None = None) -> pa.Table:
    """Parquet bytes -> table, page checksums verified; any failure means the bytes are damaged."""
    try:
        return pq.read_table(pa.BufferReader(arrow_owned(data)), columns=columns, page_checksum_verification=True)
    except Exception as exc:  # ArrowInvalid, OSError ("Couldn't deserialize thrift"), KeyError, ... all the same
        raise Damaged(f"{what}: {type(exc).__name__}: {exc}") from None


def write_table(out_dir: str, name: str, table: pa.Table) -> str:
    """A result table (not part of the row dataset), written atomically."""
    return write_bytes(out_dir, name, table_bytes(table))


def write_png(out_dir: str, name: str, image: np.ndarray) -> None:
    from ops.images import encode_png

    write_bytes(out_dir, name, encode_png(image))


def safe_name(text: str, limit: int = 80) -> str:
    """A name taken from data (a key, an edit or exemplar name) made one harmless file name: letters, digits, `.`,
    `_`, `-` only (anything else, separators included, becomes `_`), never starting with a dot (so never `.` or
    `..`), at most `limit` characters; a name changed or shortened on the way ends in 8 hex digits of its sha256, so
    two different names never share a file."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).lstrip(".") or "_"
    if clean == text and len(clean) <= limit:
        return clean
    tag = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean[:limit - 9]}-{tag}"


def write_preview(out_dir: str, name: str, image: np.ndarray) -> str:
    """`previews/<safe name>.png`; returns the name written under the output."""
    path = f"previews/{safe_name(name)}.png"
    write_png(out_dir, path, image)
    return path


def to_table(batch: dict[str, np.ndarray], metadata: dict, drop=frozenset()) -> pa.Table:
    """Columns of a processed batch but those in `drop` (pixels a plan declares not stored) and those starting
    with "_" (runtime bookkeeping) -> Arrow table; tensors become `arrow.fixed_shape_tensor`."""
    arrays, names = [], []
    for name, values in batch.items():
        if name in drop or name.startswith("_"):
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
    return with_metadata(pa.Table.from_arrays(arrays, names=names), metadata)


def with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    return table.replace_schema_metadata({"latentray": json.dumps(metadata, sort_keys=True)})


def table_metadata(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(b"latentray")
    return json.loads(raw) if raw else {}


def part_name(gen: int, data: bytes, kind: str = "part") -> str:
    """Content-addressed: the writer's lease generation, then the checksum of the bytes."""
    return f"{kind}-{gen:08d}-{hashlib.sha256(data).hexdigest()[:24]}.parquet"


def name_checksum(name: str) -> str | None:
    """The checksum a content-addressed name carries (None for other names)."""
    match = NAMED_RE.match(name)
    return match.group(3) if match else None


def name_generation(name: str) -> int:
    match = NAMED_RE.match(name)
    return int(match.group(2)) if match else 0


def check_named_bytes(name: str, data: bytes, what: str) -> None:
    expected = name_checksum(name)
    if expected is not None and hashlib.sha256(data).hexdigest()[:24] != expected:
        raise Damaged(f"{what}: checksum does not match its name")


def write_named(out_dir: str, folder: str, gen: int, data: bytes, kind: str = "part") -> tuple[str, dict]:
    """Write content-addressed bytes under `folder` ("" for the output itself); returns (name, {size, version})."""
    name = posixpath.join(folder, part_name(gen, data, kind)) if folder else part_name(gen, data, kind)
    path = write_bytes(out_dir, name, data)
    fs = url_to_fs(out_dir)[0]
    info = retrying(lambda: fs.info(path), f"stat {path}")
    return posixpath.basename(name), {"size": int(info["size"]), "version": version_of(info)}


# ----- quarantine, clearing -------------------------------------------------------------------------------------
def quarantine(out_dir: str, path: str, reason: str = "") -> str:
    """Move a damaged file into `<out>/quarantine/` under a name that never collides (its bytes kept for
    inspection); returns the new path."""
    fs, root = url_to_fs(out_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = posixpath.join(root, QUARANTINE, f"{stamp}-{uuid.uuid4().hex[:8]}-{posixpath.basename(path)}")
    retrying(lambda: fs.makedirs(posixpath.dirname(dest), exist_ok=True), f"creating {dest}")

    def move():
        try:
            fs.mv(path, dest)
        except FileNotFoundError:
            if not fs.exists(dest):  # a retried move whose first attempt went through is fine
                raise

    retrying(move, f"quarantining {path}")
    print(f"latentray: quarantined damaged file {path} -> {dest}{': ' + reason if reason else ''}", file=sys.stderr)
    return dest


def clear_output(out_dir: str, keep: tuple[str, ...]) -> None:
    """Remove everything in an output except the named entries; the quarantine is always kept."""
    fs, root = url_to_fs(out_dir)
    for name, info in listing(fs, root).items():
        if name not in (*keep, QUARANTINE):
            retrying(lambda: fs.rm(info["name"], recursive=True), f"removing {info['name']}")


# ----- columns -------------------------------------------------------------------------------------------------------
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


def count_previews(out_dir: str) -> int:
    fs, folder = join(out_dir, "previews")
    return len(listing(fs, folder))


def stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]
