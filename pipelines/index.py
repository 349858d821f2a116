"""The one authority on what an output holds (DESIGN §4): which rows — key, unit, status, error code, identity —
live in which part, written by which run. No Ray.

The parts are the truth and describe themselves: a part's name carries the lease generation of the run that wrote
it and the checksum of its bytes (`io.part_name`), its rows carry `input_id` (what they were made from) and `row_id`
(their own identity, which later stages record as their `input_id`), its metadata the stage, fingerprint and the
parts it `replaces`. The index is what a resume reads instead of the parts: append-only segments
`_index/seg-<generation>-<checksum>.parquet` (one row per part row, and in the metadata each part's size and
version, the parts it removes and the older segments it covers), written by the driver as parts land and
consolidated into one at the end of a run.

`load` trusts an indexed part only while the listing shows it with the size and version (mtime, ETag) the index
recorded; any other part is fetched whole and parsed (checksum, page checksums); what does not parse is damaged
(quarantined when repairing, its rows redone). A key found in several live parts resolves the same way for every
reader (`winner`): the copies made from the input of the newest copy win, among them an ok row, then the newest.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import faults, io

INDEX = "_index"
ENTRY_COLUMNS = ("key", "unit", "status", "error_code", "input_id", "row_id")
TARGET_PART_BYTES = 32 * 2**20  # compaction target: parts of tens of MB
SMALL_PART = 0.5  # parts under this share of the target are compacted


def digest(*values: str, n: int = 20) -> str:
    """A short stable identity (hex) of some strings."""
    return hashlib.sha256("\0".join(map(str, values)).encode()).hexdigest()[:n]


def is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


@dataclass
class State:
    """An output as `load` found it."""

    parts: dict[str, dict] = field(default_factory=dict)  # live part name -> {size, version, fingerprint, gen}
    entries: pa.Table | None = None  # one row per row of a live part: part + ENTRY_COLUMNS
    winners: pa.Table | None = None  # one row per key: the copy every reader sees
    losers: dict[str, set] = field(default_factory=dict)  # part -> keys whose copy there lost
    stale: list[str] = field(default_factory=list)  # parts replaced or removed that still exist
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files that do not parse
    quarantined: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # parts read because the index did not cover them
    segments: list[str] = field(default_factory=list)  # live index segments
    temps: list[str] = field(default_factory=list)  # unfinished local writes
    removed: set = field(default_factory=set)  # parts named as removed or replaced

    def units(self) -> dict[str, list]:
        """unit -> [(key, status, error_code, input_id)] of its winning rows."""
        out: dict[str, list] = {}
        w = self.winners
        for key, unit, status, code, input_id in zip(*(w.column(c).to_pylist() for c in (
                "key", "unit", "status", "error_code", "input_id"))):
            out.setdefault(unit, []).append((key, status, code, input_id))
        return out

    def identities(self) -> dict[str, str]:
        """key -> row_id of the winning rows."""
        return dict(zip(self.winners.column("key").to_pylist(), self.winners.column("row_id").to_pylist()))


def empty_entries() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in ("part", *ENTRY_COLUMNS)})


# ----- reading ----------------------------------------------------------------------------------------------------
def part_entries(table: pa.Table, part: str) -> pa.Table:
    """The index entries of a part's rows (its unit column is named in its metadata; `key` by default)."""
    unit = io.table_metadata(table.schema).get("unit_column", "key")
    n = len(table)
    columns = {"part": pa.array([part] * n, pa.string())}
    for c in ENTRY_COLUMNS:
        source = unit if c == "unit" else c
        columns[c] = table.column(source).cast(pa.string()) if source in table.column_names else \
            pa.array([""] * n, pa.string())
    return pa.table(columns)


def read_part(out_dir: str, name: str, size: int | None = None, columns: list[str] | None = None) -> pa.Table:
    """A whole part, fetched (retried) then parsed (any failure or a checksum mismatch: io.Damaged)."""
    fs, path = io.join(out_dir, name)
    data = io.fetch(fs, path, size)
    io.check_named_bytes(name, data, path)
    return io.parse_table(data, path, columns)


def read_segment(out_dir: str, name: str) -> tuple[pa.Table, dict]:
    fs, path = io.join(out_dir, posixpath.join(INDEX, name))
    data = io.fetch(fs, path)
    io.check_named_bytes(name, data, path)
    table = io.parse_table(data, path)
    return table, io.table_metadata(table.schema)


def load(out_dir: str, repair: bool = False, fingerprint: str | None = None) -> State:
    """What an output holds. With `repair` (the lease holder only): damaged files and parts of another
    `fingerprint` are quarantined. Nothing else is changed here (see `tidy`)."""
    fs, root = io.url_to_fs(out_dir)
    listed = io.listing(fs, root)
    state = State(temps=[n for n in listed if n.startswith(".tmp-")])
    parts = {n: i for n, i in listed.items() if is_part(n)}
    known, tables = {}, []
    segments = sorted(io.listing(fs, posixpath.join(root, INDEX)))
    segments = [s for s in segments if s.startswith("seg-")]
    loaded = io.map_bounded(lambda s: _try(lambda: read_segment(out_dir, s)), segments)
    covered = set()
    for name, result in zip(segments, loaded):
        if isinstance(result, io.Damaged):
            damage(state, out_dir, posixpath.join(root, INDEX, name), str(result), repair)
        else:
            covered |= set(result[1].get("covers", []))
    for name, result in zip(segments, loaded):
        if isinstance(result, io.Damaged):
            continue
        state.segments.append(name)  # every segment present: a consolidation covers them all
        if name in covered:
            continue
        table, meta = result
        state.removed |= set(meta.get("removed", []))
        fresh = sorted(set(meta.get("parts", {})) - set(known))  # a part described twice counts once
        known.update({p: meta["parts"][p] for p in fresh})
        tables.append(table.filter(pc.is_in(table.column("part"), pa.array(fresh, pa.string()))))
    trusted = {n for n, i in parts.items() if n in known and known[n]["size"] == int(i["size"])
               and known[n]["version"] == io.version_of(i)}
    uncovered = sorted(set(parts) - trusted - state.removed)
    read = io.map_bounded(lambda n: _try(lambda: read_part(out_dir, n, int(parts[n]["size"]))), uncovered)
    for name, result in zip(uncovered, read):
        if isinstance(result, io.Damaged):
            damage(state, out_dir, parts[name]["name"], str(result), repair)
            continue
        meta = io.table_metadata(result.schema)
        state.removed |= set(meta.get("replaces", []))
        known[name] = {"size": int(parts[name]["size"]), "version": io.version_of(parts[name]),
                       "fingerprint": meta.get("fingerprint", "")}
        tables.append(part_entries(result, name))
        state.uncovered.append(name)
    live = {n for n in parts if n not in state.removed and (n in trusted or n in state.uncovered)}
    if fingerprint is not None:
        for name in sorted(n for n in live if known[n].get("fingerprint", fingerprint) != fingerprint):
            live.discard(name)
            damage(state, out_dir, parts[name]["name"], "written by another configuration "
                   f"(fingerprint {known[name].get('fingerprint')} != {fingerprint})", repair)
    stale = sorted(n for n in parts if n in state.removed)
    unchecked = [n for n in stale if n not in trusted]  # removed once whole, but changed since: damaged?
    checked = io.map_bounded(lambda n: _try(lambda: read_part(out_dir, n, int(parts[n]["size"]))), unchecked)
    for name, result in zip(unchecked, checked):
        if isinstance(result, io.Damaged):  # never delete damaged bytes, even of a part no longer needed
            damage(state, out_dir, parts[name]["name"], str(result), repair)
            stale.remove(name)
    state.stale = stale
    state.parts = {n: {**known[n], "gen": io.name_generation(n)} for n in live}
    entries = pa.concat_tables([t.select(["part", *ENTRY_COLUMNS]) for t in tables]) if tables else empty_entries()
    state.entries = entries.filter(pc.is_in(entries.column("part"), pa.array(sorted(live), pa.string())))
    resolve(state)
    return state


def _try(read):
    try:
        return read()
    except io.Damaged as exc:
        return exc


def damage(state: State, out_dir: str, path: str, reason: str, repair: bool) -> None:
    state.damaged.append((path, reason))
    if repair:
        state.quarantined.append(io.quarantine(out_dir, path, reason))


# ----- which copy of a key every reader sees ---------------------------------------------------------------------
def winner(copies: list[tuple]) -> int:
    """Index of the copy that wins among (gen, part, status, input_id) copies of one key: the copies made from the
    same input as the newest copy (the newest input wins), among them an ok row, then the newest, then by part
    name."""
    newest = max(range(len(copies)), key=lambda i: (copies[i][0], copies[i][1]))
    same = [i for i in range(len(copies)) if copies[i][3] == copies[newest][3]]
    return max(same, key=lambda i: (copies[i][2] == "ok", copies[i][0], copies[i][1]))


def resolve(state: State) -> None:
    """Split the live entries into winners (one per key) and losers."""
    entries = state.entries
    keys = entries.column("key")
    counts = pc.value_counts(keys)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    state.losers = {}
    if len(repeated) == 0:
        state.winners = entries
        return
    twice = entries.filter(pc.is_in(keys, repeated))
    by_key: dict[str, list] = {}
    for part, key, status, input_id in zip(*(twice.column(c).to_pylist() for c in (
            "part", "key", "status", "input_id"))):
        by_key.setdefault(key, []).append((state.parts[part]["gen"], part, status, input_id))
    for key, copies in by_key.items():
        best = winner(copies)
        for i, copy in enumerate(copies):
            if i != best:
                state.losers.setdefault(copy[1], set()).add(key)
    lost = pa.array([f"{p}\0{k}" for p, ks in sorted(state.losers.items()) for k in sorted(ks)], pa.string())
    tag = pc.binary_join_element_wise(entries.column("part"), keys, "\0")
    state.winners = entries.filter(pc.invert(pc.is_in(tag, lost)))


# ----- writing ------------------------------------------------------------------------------------------------------
def write_segment(out_dir: str, gen: int, entries: pa.Table, parts: dict[str, dict], removed=(), covers=()) -> str:
    """One index segment: entries of the `parts` written (name -> {size, version, fingerprint}), the parts it
    removes and the segments it covers."""
    meta = {"parts": parts, "removed": sorted(set(removed)), "covers": sorted(set(covers))}
    table = io.with_metadata(entries.select(["part", *ENTRY_COLUMNS]), meta)
    name, _ = io.write_named(out_dir, INDEX, gen, io.table_bytes(table), kind="seg")
    return name


def consolidate(out_dir: str, state: State, gen: int) -> str:
    """Replace every segment by one describing the live parts (written first, then the old ones removed)."""
    parts = {n: {k: p[k] for k in ("size", "version", "fingerprint")} for n, p in state.parts.items()}
    name = write_segment(out_dir, gen, state.entries, parts, removed=set(state.stale), covers=state.segments)
    fs, root = io.url_to_fs(out_dir)
    for old in state.segments:
        if old != name:
            io.remove(fs, posixpath.join(root, INDEX, old))
    state.segments = [name]
    return name


def rewrite(out_dir: str, state: State, group: list[str], gen: int, fence) -> str | None:
    """Replace the parts of `group` by one part holding their winning rows (replace-then-remove: the new part names
    the ones it replaces, the index records them removed, then they are removed). Returns the new part's name."""
    tables, meta = [], {}
    for name in group:
        table = read_part(out_dir, name, state.parts[name]["size"])
        meta = meta or io.table_metadata(table.schema)
        drop = state.losers.get(name)
        if drop:
            table = table.filter(pc.invert(pc.is_in(table.column("key"), pa.array(sorted(drop), pa.string()))))
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    fs, root = io.url_to_fs(out_dir)
    fence()
    new = None
    if table is not None and len(table):
        meta = {**meta, "replaces": sorted(group)}
        data = io.table_bytes(io.with_metadata(table, meta))
        new, info = io.write_named(out_dir, "", gen, data)
        entries = part_entries(io.with_metadata(table, meta), new)
        record = {new: {**info, "fingerprint": meta.get("fingerprint", "")}}
        faults.point("tidy")
        fence()
        segment = write_segment(out_dir, gen, entries, record, removed=group)
        state.segments.append(segment)
        state.parts[new] = {**record[new], "gen": gen}
        state.entries = pa.concat_tables([state.entries, entries])
    for name in group:
        io.remove(fs, posixpath.join(root, name))
        state.parts.pop(name, None)
        state.losers.pop(name, None)
    keep = pc.invert(pc.is_in(state.entries.column("part"), pa.array(group, pa.string())))
    state.entries = state.entries.filter(keep)
    return new


def tidy(out_dir: str, state: State, gen: int, fence, target: int = TARGET_PART_BYTES) -> dict:
    """After a run (or `latentray compact`): stale parts and temp files removed, losing copies taken out of their
    parts, small parts merged into parts of about `target` bytes, one consolidated index. A crash at any point
    loses nothing: every step writes the new state before removing the old. Returns counts."""
    fs, root = io.url_to_fs(out_dir)
    fence()
    for name in state.stale:
        io.remove(fs, posixpath.join(root, name))
    for name in state.temps:
        io.remove(fs, posixpath.join(root, name))
    before = len(state.parts)
    small = sorted((n for n, p in state.parts.items() if p["size"] < SMALL_PART * target), key=lambda n: (
        state.parts[n]["gen"], n))
    groups, group, size = [], [], 0
    for name in small:
        if group and size + state.parts[name]["size"] > target:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += state.parts[name]["size"]
    if len(group) > 1 or (group and group[0] in state.losers):
        groups.append(group)
    grouped = {n for g in groups for n in g}
    groups += [[n] for n in sorted(state.losers) if n not in grouped]  # big parts holding losing copies
    for group in groups:
        rewrite(out_dir, state, group, gen, fence)
    changed = bool(groups or state.stale or state.temps or state.uncovered or len(state.segments) != 1)
    state.stale, state.temps, state.uncovered = [], [], []
    resolve(state)
    if changed and state.parts:  # a no-op rerun writes nothing
        fence()
        consolidate(out_dir, state, gen)
    return {"parts_before": before, "parts_after": len(state.parts)}


def row_ids(keys, input_ids, statuses, codes, fingerprint: str) -> list[str]:
    """Each row's identity: what it was made from, what became of it, under which configuration."""
    return [digest(fingerprint, k, i, s, c) for k, i, s, c in zip(keys, input_ids, statuses, codes)]


def upstream_digest(state: State) -> str:
    """The identity of an output's content (aggregates record what they were computed on)."""
    keys = state.winners.column("key").to_pylist()
    ids = state.winners.column("row_id").to_pylist()
    h = hashlib.sha256()
    for key, row in sorted(zip(keys, ids)):
        h.update(f"{key}\0{row}\n".encode())
    return h.hexdigest()[:24]


# ----- readers ------------------------------------------------------------------------------------------------------
def plan_reads(state: State, keys=None, key_column: str = "key") -> list[tuple[str, list | None]]:
    """(part, keys to keep or None for all) for the winning rows, optionally only those whose `key_column` (key or
    unit) is in `keys`."""
    w = state.winners
    if keys is not None:
        column = "unit" if key_column != "key" else "key"
        w = w.filter(pc.is_in(w.column(column), pa.array(sorted(set(map(str, keys))), pa.string())))
    by_part: dict[str, list] = {}
    for part, key in zip(w.column("part").to_pylist(), w.column("key").to_pylist()):
        by_part.setdefault(part, []).append(key)
    counts = dict(zip(*(state.entries.group_by("part").aggregate([("key", "count")]).column(c).to_pylist()
                        for c in ("part", "key_count")))) if len(state.entries) else {}
    return [(p, None if keys is None and len(ks) == counts.get(p) else ks) for p, ks in sorted(by_part.items())]


def read_planned(out_dir: str, part: str, keep: list | None, size: int | None, columns: list[str] | None
                 ) -> pa.Table:
    table = read_part(out_dir, part, size, columns if columns is None or keep is None else
                      list(dict.fromkeys(["key", *columns])))
    if keep is not None:
        table = table.filter(pc.is_in(table.column("key"), pa.array(keep, pa.string())))
    return table.select(columns) if columns is not None else table


def read_columns(out_dir: str, part: str, keep: list | None, columns: list[str]) -> pa.Table:
    """Only `columns` of a part's winning rows (`keep`: their keys, None: all), by ranged reads with page checksums
    verified (the whole-part checksum needs every byte, so it is not checked): what a report of a large output
    reads."""
    import pyarrow.parquet as pq

    fs, path = io.join(out_dir, part)
    wanted = list(dict.fromkeys(["key", *columns])) if keep is not None else columns

    try:
        if io.is_local(out_dir):  # Arrow's own file reader (no Python object for its threads to release)
            table = pq.read_table(path, columns=wanted, page_checksum_verification=True)
        else:  # a Python file object: read on this thread only (see io.arrow_owned)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=wanted, page_checksum_verification=True, use_threads=False,
                                      pre_buffer=False)
    except FileNotFoundError:
        raise
    except Exception:  # storage or damage: the whole file, fetched (retried) then parsed, tells which
        table = read_part(out_dir, part, None, wanted)
    if keep is not None:
        table = table.filter(pc.is_in(table.column("key"), pa.array(keep, pa.string())))
    return table.select(columns)


def read_rows(out_dir: str, part: str, keys: list, columns: list[str]) -> pa.Table:
    """`key` and `columns` of a few rows of a part, reading only the row groups that hold them (found from the key
    column); page checksums verified."""
    import pyarrow.parquet as pq

    where = read_columns(out_dir, part, None, ["key"]).column("key")
    rows = np.flatnonzero(pc.is_in(where, pa.array(sorted(set(keys)), pa.string())).to_numpy(zero_copy_only=False))
    fs, path = io.join(out_dir, part)
    wanted = list(dict.fromkeys(["key", *columns]))
    chosen = pa.array(sorted(set(keys)), pa.string())
    try:
        with fs.open(path, "rb") as f:
            reader = pq.ParquetFile(f, page_checksum_verification=True, pre_buffer=False)
            starts = np.cumsum([0] + [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)])
            tables = []
            for group in sorted(set(np.searchsorted(starts, rows, side="right") - 1)):  # one group in memory
                table = reader.read_row_group(int(group), columns=wanted, use_threads=False)
                tables.append(table.filter(pc.is_in(table.column("key"), chosen)))
    except FileNotFoundError:
        raise
    except Exception:  # storage or damage: the whole part, fetched (retried) then parsed, tells which
        table = read_part(out_dir, part, None, wanted)
        return table.filter(pc.is_in(table.column("key"), chosen))
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], reader.schema_arrow.field(c).type)
                                                             for c in wanted})


def read_dataset(out_dir: str, columns: list[str] | None = None, keys=None, key_column: str = "key",
                 state: State | None = None) -> pa.Table:
    """The rows every reader sees (one per key), all or those of `keys`, as one table. A damaged part raises
    io.Damaged naming it (readers never repair: `latentray verify` or a rerun of that stage does)."""
    state = state or load(out_dir)
    plan = plan_reads(state, keys, key_column)
    tables = io.map_bounded(lambda item: read_planned(out_dir, item[0], item[1], state.parts[item[0]]["size"],
                                                      columns), plan)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["key"])})
    return pa.concat_tables(tables, promote_options="permissive")


def verify(out_dir: str, repair: bool, gen: int = 0, fence=lambda: None) -> dict:
    """Read every part, index segment and JSON file of an output whole: checksums, page checksums, parse, and the
    index's entries against the parts' rows. With `repair` (the lease holder, generation `gen`), damaged files are
    quarantined and the index rewritten from the parts. Returns what was found."""
    fs, root = io.url_to_fs(out_dir)
    state = load(out_dir, repair=repair)
    report = {"parts": len(state.parts), "damaged": [p for p, _ in state.damaged],
              "reasons": [r for _, r in state.damaged], "quarantined": list(state.quarantined),
              "index_mismatches": [], "duplicate_keys": sum(len(v) for v in state.losers.values()),
              "stale_parts": list(state.stale)}
    trusted = sorted(set(state.parts) - set(state.uncovered))
    read = io.map_bounded(lambda n: _try(lambda: read_part(out_dir, n, state.parts[n]["size"])), trusted)
    truth = [state.entries.filter(pc.is_in(state.entries.column("part"), pa.array(state.uncovered, pa.string())))]
    for name, result in zip(trusted, read):
        if isinstance(result, io.Damaged):
            damage(state, out_dir, posixpath.join(root, name), str(result), repair)
            state.parts.pop(name)
            continue
        found = part_entries(result, name)
        truth.append(found)
        indexed = state.entries.filter(pc.equal(state.entries.column("part"), name))
        if not found.sort_by("key").equals(indexed.sort_by("key")):
            report["index_mismatches"].append(name)
    for json_name in ("run.json", "stats.json"):
        try:
            io.read_json(out_dir, json_name)
        except io.Damaged as exc:
            damage(state, out_dir, posixpath.join(root, json_name), str(exc), repair)
    state.entries = pa.concat_tables(truth)
    resolve(state)
    report.update(damaged=[p for p, _ in state.damaged], reasons=[r for _, r in state.damaged],
                  quarantined=list(state.quarantined), parts=len(state.parts), rows=len(state.winners))
    if repair and (state.damaged or report["index_mismatches"]):
        fence()
        consolidate(out_dir, state, gen)
    report["clean"] = not (report["damaged"] or report["index_mismatches"] or report["duplicate_keys"]
                           or report["stale_parts"])
    return report
