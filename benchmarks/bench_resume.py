"""Resume at scale: a no-op rerun and a `--dry-run` of `latentray invert` reading a synthetic ingest output into a
synthetic invert output, both of `--rows` rows in parts of 16 rows (what one upstream block made per part), locally
and on the moto S3 server with `--latency` s added to every request; before (the code at `--before`, which scanned
every part of both outputs) and after (the index), uncompacted and after `latentray compact`. Median and spread of
`--runs` runs each, side by side in one session; files per output before and after compaction.

The synthetic rows are small (key, status, codes, identities, uri; no pixels, no latents), so the figures measure
the bookkeeping a resume does per row and per file, not reading payloads; compacted parts therefore hold many more
rows than real ones (32 MB of real W+ rows is ~900 rows). On S3 the "before" layout is measured at `--s3-rows` and
extrapolated linearly in the number of parts (its cost is one or more GETs per part).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from benchmarks.report import machine_line, write_section  # noqa: E402
from pipelines import index, io  # noqa: E402

PART_ROWS = 16
INVERT = ["--align", "none", "--lpips-weight", "0", "--mse-weight", "1"]  # no LPIPS backbone needed
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


UPSTREAM_FP = "synthetic-ingest"


def rows_table(start: int, n: int, fingerprint: str, new: bool) -> pa.Table:
    """Rows as the ingest (fingerprint UPSTREAM_FP) or the invert output made from it would hold them."""
    keys = [f"{i:07d}.png" for i in range(start, start + n)]
    ok, none = ["ok"] * n, [""] * n
    columns = {"key": keys, "uri": [f"/photos/{k}" for k in keys], "status": ok, "error_code": none, "error": none}
    if new:
        photos = [index.digest("/photos/" + k) for k in keys]
        ingest = index.row_ids(keys, photos, ok, none, UPSTREAM_FP)
        columns["input_id"] = photos if fingerprint == UPSTREAM_FP else ingest
        columns["row_id"] = index.row_ids(keys, columns["input_id"], ok, none, fingerprint)
    return pa.table(columns)


def write_output(url: str, rows: int, fingerprint: str, stage: str, new: bool, record: dict) -> int:
    """A synthetic output: parts of PART_ROWS rows, run.json, and for the new layout the index the driver would have
    written (one segment per 4096 parts). Returns the number of parts."""
    fs, root = io.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    meta = {"stage": stage, "fingerprint": fingerprint, "schema_version": 3 if new else 2}
    entries, parts, n_parts = [], {}, 0

    def flush():
        if entries:
            index.write_segment(url, 1, pa.concat_tables(entries), dict(parts))
            entries.clear()
            parts.clear()

    for start in range(0, rows, PART_ROWS):
        table = io.with_metadata(rows_table(start, min(PART_ROWS, rows - start), fingerprint, new), meta)
        if new:
            name, info = io.write_named(url, "", 1, io.table_bytes(table))
            entries.append(index.part_entries(table, name))
            parts[name] = {**info, "fingerprint": fingerprint}
            if len(parts) >= 4096:
                flush()
        else:
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            fs.pipe_file(f"{root}/part-{start:09d}.parquet", buf.getvalue().to_pybytes())
        n_parts += 1
    flush()
    record = {**record, "stage": stage, "fingerprint": fingerprint, "schema_version": 3 if new else 2}
    if new:
        io.write_json(url, "run.json", record)
    else:
        fs.pipe_file(f"{root}/run.json", json.dumps(record).encode())
    return n_parts


def cli(repo: Path, args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"{args}: exit {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def fingerprint_of(repo: Path, upstream: str, env: dict) -> str:
    """The invert fingerprint that code computes for this upstream (its dry run on an empty output)."""
    _, out = cli(repo, ["invert", "--input", upstream, "--output", upstream + "-probe", *INVERT, "--dry-run"], env)
    return json.loads(out[out.index("{"):])["fingerprint"]


def build(base: str, rows: int, repo: Path, new: bool, env: dict) -> tuple[str, str, int]:
    up, down = f"{base}/aligned", f"{base}/latents"
    n = write_output(up, rows, UPSTREAM_FP, "ingest", new, {"runs": []})
    fp = fingerprint_of(repo, up, env)
    write_output(down, rows, fp, "invert", new, {"runs": [], "config": {}})
    return up, down, n


def measure(repo: Path, up: str, down: str, runs: int, env: dict, reruns: int | None = None) -> dict:
    """`runs` dry runs, then `reruns` (default `runs`) reruns; an uncompacted output of the new layout is measured
    with one rerun, which compacts it as it ends (a one-time cost: the next reruns are those of a compacted one)."""
    out = {}
    for name, extra, n in (("dry_run", ["--dry-run"], runs), ("noop_rerun", [], reruns or runs)):
        times = [cli(repo, ["invert", "--input", up, "--output", down, *INVERT, *extra], env)[0] for _ in range(n)]
        out[name] = {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": n}
    return out


def cell(m: dict, scale: float = 1.0) -> str:
    return f"{m['median'] * scale:.1f} ({m['min'] * scale:.1f}–{m['max'] * scale:.1f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--s3-rows", type=int, default=20_000, help="rows of the S3 'before' output (extrapolated)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to every S3 request")
    parser.add_argument("--before", default="/tmp/before", help="a checkout of the code before the index")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/bench_resume")
    args = parser.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    before = Path(args.before)
    results, lines = {}, []

    def record(label: str, rows: int, parts: int, m: dict, scale: float = 1.0) -> None:
        results[label] = {"rows": rows, "parts_per_output": parts, **m}
        lines.append(f"| {label} | {rows:,} | {parts:,} | {cell(m['dry_run'], scale)} | "
                     f"{cell(m['noop_rerun'], scale)} |")
        print(lines[-1], flush=True)

    # local
    if before.is_dir():
        up, down, n = build(str(work / "local-before"), args.rows, before, False, ENV)
        record("local, before (scan every part)", args.rows, n, measure(before, up, down, args.runs, ENV))
        shutil.rmtree(work / "local-before")
    up, down, n = build(str(work / "local-after"), args.rows, REPO, True, ENV)
    record("local, index, uncompacted (rerun: the first, compacting)", args.rows, n,
           measure(REPO, up, down, args.runs, ENV, reruns=1))
    for url in (up, down):  # the upstream was never rerun; the invert output was compacted by its first rerun
        cli(REPO, ["compact", url], ENV)
    compacted = len([p for p in os.listdir(down) if p.startswith("part-")])
    record("local, index, compacted", args.rows, compacted, measure(REPO, up, down, args.runs, ENV))

    # S3 with latency
    from torture import S3Server

    server = S3Server(latency=args.latency)
    env = {**ENV, **server.env}
    server.client.create_bucket(Bucket="bench")
    if before.is_dir():  # measured at two sizes, extrapolated along the line through them
        small, large = args.s3_rows // 4, args.s3_rows
        found = {}
        for rows in (small, large):
            up, down, n = build(f"s3://bench/before{rows}", rows, before, False, env)
            found[rows] = measure(before, up, down, args.runs, env)
            record(f"S3 +{args.latency * 1000:.0f} ms, before (measured)", rows, n, found[rows])
        line = {name: {k: found[large][name][k] + (found[large][name][k] - found[small][name][k]) /
                       (large - small) * (args.rows - large) for k in ("median", "min", "max")}
                for name in ("dry_run", "noop_rerun")}
        record(f"S3 +{args.latency * 1000:.0f} ms, before (extrapolated)", args.rows,
               -(-args.rows // PART_ROWS), line)
    up, down, n = build("s3://bench/small", args.s3_rows, REPO, True, env)
    record(f"S3 +{args.latency * 1000:.0f} ms, index, uncompacted (rerun: the first, compacting)", args.s3_rows, n,
           measure(REPO, up, down, args.runs, env, reruns=1))
    server.latency = 0.0  # the compacted local output, uploaded as it is (the same files and index)
    fs = io.url_to_fs("s3://bench")[0]
    for name in ("aligned", "latents"):
        for path in sorted((work / "local-after" / name).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                fs.pipe_file(f"bench/after/{name}/{path.relative_to(work / 'local-after' / name)}", path.read_bytes())
    up, down = "s3://bench/after/aligned", "s3://bench/after/latents"
    for url in (up, down):  # the index recorded local mtimes: re-index once under S3's ETags
        cli(REPO, ["compact", url], env)
    server.latency = args.latency
    record(f"S3 +{args.latency * 1000:.0f} ms, index, compacted", args.rows, compacted,
           measure(REPO, up, down, args.runs, env))
    server.stop()
    shutil.rmtree(work / "local-after")

    table = "\n".join(["| output | rows | parts per output | `--dry-run` s, median (min–max) | no-op rerun s |",
                       "|---|---:|---:|---:|---:|", *lines])
    write_section("Resume at scale (bench_resume.py)", f"""{machine_line()}; {args.runs} runs each, one session.
Each command is a whole `latentray invert` process reading an ingest output into an invert output (Python start,
imports and, for the rerun, `ray.init` included: ~6-8 s of fixed cost). Rows are synthetic and small (key, status,
codes, identities, uri), so these figures are the bookkeeping of a resume per row and per file. Before, a resume
read the key columns of every part of the output and of its input one by one (on S3: at least one GET each); after,
it reads the index (one LIST and one GET per segment, 16 at a time) plus the parts written since. The first rerun of
an uncompacted output compacts it (parts of 16 rows into parts of 32 MB; a one-time cost), later reruns are those of
the compacted rows. On S3 the "before" figures are measured at two sizes and extrapolated along the line through
them (a 1M-row run would take hours).

{table}
""")
    (work.parent / "bench_resume.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
