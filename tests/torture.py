"""The torture test: seeded random scenarios that compose what happens to a long-running `latentray invert` over
someone's photos — inputs added, removed, replaced or moved between runs, one or two --input folders, a SIGKILL at a
random moment or at a chosen point (a CPU task, the actor, a write, the index, a lease refresh, compaction), bytes
flipped, zeroed or truncated in a random file of the output, runs started together (also on a stale lease), storage
errors at a random rate (a local output through `flaky://`, an S3 one through a moto server that answers 503), and an
aggregate (`channels`) kept up to date — then a final clean rerun, after which the invariants must hold:

* every current input is exactly one row, describing the bytes now at its uri (uri, sha256); rows of inputs that
  disappeared are kept; no key is stored twice; nothing else is there;
* no damaged bytes were deleted: every file the scenario damaged is in quarantine/, byte for byte;
* never two holders at once: no part was written by a run after a newer run took the output;
* the aggregate equals a fresh computation on the final output; `latentray verify` finds it clean.

    python tests/torture.py --seeds 0-49 [--report torture.json]      (make torture N=500)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

POINTS = ("task", "actor", "write", "index", "lease", "tidy")
FAULTS = ("none", "kill_point", "kill_timer", "damage", "stale_lease", "concurrent", "storage_errors")
INVERT = ["--align", "none", "--spaces", "s", "--steps", "1", "--lpips-weight", "0", "--mse-weight", "1",
          "--batch-size", "2"]
RUN_TIMEOUT = 600


class Finding(AssertionError):
    """An invariant that did not hold: a bug (or a hole in the harness), reported with its seed."""


# ----- an S3 API server that is slow or failing on purpose ------------------------------------------------------
class S3Server:
    """moto's S3 on 127.0.0.1 behind a middleware adding `latency` seconds to every request and answering a share
    `error_rate` of them with 503 SlowDown (botocore retries those)."""

    def __init__(self, latency: float = 0.0, error_rate: float = 0.0, seed: int = 0):
        import logging

        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        app = DomainDispatcherApplication(create_backend_app)
        rng = random.Random(seed)
        self.latency, self.error_rate, self.failed = latency, error_rate, 0

        def middleware(environ, start_response):
            if self.latency:
                time.sleep(self.latency)
            if self.error_rate and rng.random() < self.error_rate:
                self.failed += 1
                start_response("503 Slow Down", [("Content-Type", "application/xml")])
                return [b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"]
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, middleware, threaded=True)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.env = {"AWS_ACCESS_KEY_ID": "torture", "AWS_SECRET_ACCESS_KEY": "torture-secret",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(self.env)
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint)

    def stop(self) -> None:
        self.server.shutdown()


# ----- inputs ----------------------------------------------------------------------------------------------------
def image_pool(folder: Path, n: int = 12) -> list[bytes]:
    """Seeded sample images of the bundled generator (made once), plus one file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) < n:
        from conftest import write_samples

        write_samples(folder, n, seed=123)
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))][:n] + [b"this is not an image"]


class Inputs:
    """The photo folders of a scenario, changed between runs as people change theirs."""

    def __init__(self, root: Path, pool: list[bytes], rng: random.Random):
        self.root, self.pool, self.rng = root, pool, rng
        self.folders = ["day1"] if rng.random() < 0.6 else ["day1", "day2"]
        self.counter = 0
        for folder in self.folders:
            for _ in range(rng.randint(2, 3)):
                self.add(folder)

    def files(self) -> dict[str, Path]:
        return {f"{f}/{p.name}": p for f in self.folders for p in sorted((self.root / f).glob("*")) if p.is_file()}

    def add(self, folder: str) -> None:
        self.counter += 1
        path = self.root / folder / f"img{self.counter:03d}.{'jpg' if self.rng.random() < 0.1 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.rng.choice(self.pool))

    def mutate(self, events: Counter) -> None:
        for _ in range(self.rng.randint(0, 3)):
            files = list(self.files().values())
            op = self.rng.choice(["add", "remove", "replace", "move"]) if files else "add"
            events[f"input_{op}"] += 1
            if op == "add":
                self.add(self.rng.choice(self.folders))
            elif op == "remove" and len(files) > 1:
                self.rng.choice(files).unlink()
            elif op == "replace":
                self.rng.choice(files).write_bytes(self.rng.choice(self.pool))
            elif op == "move":
                source = self.rng.choice(files)
                self.counter += 1
                source.rename(self.root / self.rng.choice(self.folders) / f"moved{self.counter:03d}{source.suffix}")

    def arguments(self) -> list[str]:
        return [a for f in self.folders for a in ("--input", str(self.root / f))]

    def current(self) -> dict[str, tuple[str, str]]:
        """key -> (uri, sha256) as a run would key them now."""
        prefix = len(self.folders) > 1
        return {(key if prefix else key.split("/", 1)[1]): (str(path), hashlib.sha256(path.read_bytes()).hexdigest())
                for key, path in self.files().items()}


# ----- the output, wherever it is ------------------------------------------------------------------------------------
class Output:
    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def files(self) -> dict[str, bytes]:
        """relative path -> bytes of every file (quarantine included)."""
        if not self.fs.exists(self.root):
            return {}
        return {p[len(self.root.rstrip("/")) + 1:]: self.fs.cat_file(p) for p in self.fs.find(self.root)}

    def parts(self) -> dict[str, float]:
        """part name -> modification time."""
        from pipelines import io

        return {n: io.modified(i) for n, i in io.listing(self.fs, self.root).items() if n.startswith("part-")}

    def damage(self, rng: random.Random) -> tuple[str, bytes] | None:
        """Flip, zero or truncate bytes of a random file: a part, an index segment, run.json, stats.json or the
        lease. Returns (relative path, damaged bytes)."""
        candidates = sorted(p for p in self.files() if not p.startswith(("quarantine/", "previews/", ".tmp-")))
        if not candidates:
            return None
        name = rng.choice(candidates)
        data = bytearray(self.fs.cat_file(f"{self.root}/{name}"))
        how = rng.choice(["flip", "zero", "truncate"])
        if how == "truncate" or len(data) < 8:
            data = data[: rng.randint(0, max(0, len(data) - 1))]
        else:
            at = rng.randrange(len(data))
            for i in range(at, min(len(data), at + (1 if how == "flip" else rng.randint(1, 64)))):
                data[i] = data[i] ^ 0xFF if how == "flip" else 0
        self.fs.pipe_file(f"{self.root}/{name}", bytes(data))
        return name, bytes(data)


# ----- one scenario -----------------------------------------------------------------------------------------------
def cli(args: list[str], env: dict, kill_at: str | None = None, kill_after: float | None = None,
        start: float | None = None) -> subprocess.Popen:
    env = {**env}
    if kill_at:
        env["LATENTRAY_KILL_AT"] = kill_at
    if start is not None:
        time.sleep(max(0.0, start - time.time()))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if kill_after is not None:
        threading.Timer(kill_after, lambda: kill_group(proc)).start()
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


NO_ROWS = ("the input has no ok rows", "holds no rows yet")  # channels over an output with no (ok) row yet


def finish(proc: subprocess.Popen, allowed: set[int], what: str, error_2: str | tuple = "") -> int:
    """Wait for a run; its exit code must be one of `allowed` (2 only with one of the messages `error_2`, when
    given)."""
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise Finding(f"{what}: no answer after {RUN_TIMEOUT} s")
    expected = (error_2,) if isinstance(error_2, str) else error_2
    if proc.returncode not in allowed or (proc.returncode == 2 and not any(e in err for e in expected)):
        raise Finding(f"{what}: exit {proc.returncode} (expected {sorted(allowed)}):\n{err[-3000:]}")
    return proc.returncode


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_scenario(seed: int, work: Path, pool: list[bytes], s3: S3Server | None, events: Counter) -> None:
    """One scenario, counting what it did into `events`; raises Finding when an invariant does not hold."""
    from pipelines import lock

    rng = random.Random(seed)
    root = work / f"seed{seed}"
    inputs = Inputs(root / "photos", pool, rng)
    on_s3 = s3 is not None and rng.random() < 0.35
    if on_s3:
        s3.client.create_bucket(Bucket=f"torture{seed}")
        url = f"s3://torture{seed}/out"
    else:
        url = str(root / "out")
    events["backend_s3" if on_s3 else "backend_local"] += 1
    out, aggregate = Output(url), str(root / "channels")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
           "LATENTRAY_LEASE_TTL": "8"}
    damaged: list[tuple[str, bytes]] = []
    records: dict[int, float] = {}  # lease generation -> when that run took the output
    written: dict[str, tuple[int, float]] = {}  # part -> (generation, mtime) as observed
    for round_ in range(rng.randint(2, 3)):
        inputs.mutate(events)
        fault = rng.choice(FAULTS)
        events[f"fault_{fault}"] += 1
        args = ["invert", *inputs.arguments(), "--output", url, *INVERT]
        what = f"seed {seed} round {round_} ({fault})"
        if fault == "damage":
            hit = out.damage(rng)
            if hit:
                events[f"damaged_{hit[0].split('/')[0].split('-')[0]}"] += 1
                if hit[0].startswith(lock.LEASES):  # unreadable: taken as stale a TTL after it changed
                    args.append("--wait")
                else:
                    damaged.append(hit)
        if fault == "stale_lease":
            gen = max(lock.leases(url), default=0) + 1
            out.fs.makedirs(f"{out.root}/{lock.LEASES}", exist_ok=True)
            out.fs.pipe_file(f"{out.root}/{lock.LEASES}/{gen:012d}.json", json.dumps(
                {"refreshed": time.time(), "pid": dead_pid(), "host": lock.host_name(), "token": "dead"}).encode())
        if fault == "kill_point":
            point = f"{rng.choice(POINTS)}:{rng.randint(1, 3)}"
            events[f"kill_at_{point.split(':')[0]}"] += 1
            finish(cli(args, env, kill_at=point), {0, -9}, f"{what} at {point}")
        elif fault == "kill_timer":
            finish(cli(args, env, kill_after=rng.uniform(2.0, 25.0)), {0, -9}, what)
        elif fault == "concurrent":
            start = time.time() + 1.0
            procs = [cli(args, env, start=start) for _ in range(rng.randint(2, 3))]
            codes = [finish(p, {0, 3}, what) for p in procs]
            if 0 not in codes:
                raise Finding(f"{what}: every concurrent run was refused: {codes}")
        elif fault == "storage_errors":
            if on_s3:
                s3.error_rate = 0.05
                finish(cli(args, env), {0, 2}, what, "nothing was changed")
                s3.error_rate = 0.0
            else:
                flaky = {**env, "LATENTRAY_FLAKY_RATE": "0.03", "LATENTRAY_FLAKY_SEED": str(seed)}
                finish(cli(["invert", *inputs.arguments(), "--output", f"flaky://{url}", *INVERT], flaky), {0, 2},
                       what, "nothing was changed")
        else:
            finish(cli(args, env), {0}, what)
        observe(out, written, records)
        if rng.random() < 0.5:
            finish(cli(["channels", "--input", url, "--output", aggregate], env), {0, 2}, f"{what}: channels",
                   NO_ROWS)  # a first run killed before any (ok) row: a clear refusal
    finish(cli(["invert", *inputs.arguments(), "--output", url, *INVERT], env), {0}, f"seed {seed}: final run")
    observe(out, written, records)
    finish(cli(["channels", "--input", url, "--output", aggregate], env), {0}, f"seed {seed}: final channels")
    fresh = str(root / "channels-fresh")
    finish(cli(["channels", "--input", url, "--output", fresh], env), {0}, f"seed {seed}: fresh channels")
    verify = cli(["verify", url], env)
    finish(verify, {0}, f"seed {seed}: verify after the final run")
    check(seed, inputs, out, damaged, written, records, aggregate, fresh, events)


def observe(out: Output, written: dict, records: dict) -> None:
    from pipelines import io

    for name, mtime in out.parts().items():
        written.setdefault(name, (io.name_generation(name), mtime))
    try:
        run = io.read_json(out.url, "run.json") or {}
    except io.Damaged:
        run = {}
    for record in run.get("runs", []):
        if "lease" in record:
            records.setdefault(int(record["lease"]), float(record["acquired"]))


def check(seed: int, inputs: Inputs, out: Output, damaged: list, written: dict, records: dict, aggregate: str,
          fresh: str, events: Counter) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fail(message: str):
        raise Finding(f"seed {seed}: {message}")

    files = out.files()
    tables = [pq.read_table(pa.BufferReader(data)) for name, data in files.items()
              if "/" not in name and name.startswith("part-")]
    table = pa.concat_tables(tables, promote_options="permissive")
    keys = table.column("key").to_pylist()
    if len(keys) != len(set(keys)):
        fail(f"keys stored twice: {sorted(k for k, n in Counter(keys).items() if n > 1)}")
    stored = {k: (u, s) for k, u, s in zip(keys, table.column("uri").to_pylist(), table.column("sha256").to_pylist())}
    for key, (uri, sha) in inputs.current().items():
        if key not in stored:
            fail(f"input {key} has no row")
        if stored[key] != (uri, sha):
            fail(f"the row of {key} describes {stored[key]}, the input is {(uri, sha)}")
    events["rows_checked"] += len(keys)
    events["missing_inputs_kept"] += len(set(stored) - set(inputs.current()))
    kept = {data for name, data in files.items() if name.startswith("quarantine/")}
    for name, data in damaged:
        if data not in kept:
            fail(f"damaged {name} ({len(data)} bytes) is not in quarantine")
    for part, (gen, mtime) in written.items():
        later = [g for g, taken in records.items() if g > gen and mtime > taken + 1.5]
        if later:
            fail(f"part {part} of run {gen} was written after run {later[0]} took the output")
    a, b = (pq.read_table(f"{d}/population_stats.parquet") for d in (aggregate, fresh))
    for column in ("count", "mean", "std"):
        if not np.array_equal(a.column(column).to_numpy(), b.column(column).to_numpy()):
            fail(f"channels population {column} differs from a fresh computation")


def write_figures(report: dict) -> None:
    from benchmarks.report import write_section

    totals = report["totals"]
    kinds = "\n".join(f"| {k} | {v} |" for k, v in totals.items() if k.startswith(("fault_", "kill_at_", "damaged_",
                                                                                    "input_", "backend_")))
    write_section("torture", f"""Seeds {report['seeds']}: {totals.get('scenarios', 0)} scenarios in {report['seconds']} s,
{len(report['findings'])} finding(s); {totals.get('rows_checked', 0)} rows checked after the final reruns, rows lost
or duplicated: 0 unless a finding says otherwise; rows of inputs that disappeared, kept:
{totals.get('missing_inputs_kept', 0)}.

| injected (scenario rounds, inputs changed, files damaged, kills by point, backends) | count |
|---|---:|
{kinds}
""" + "".join(f"\nFinding, seed {f['seed']}: {f['finding'][:300]}\n" for f in report["findings"]),
                  Path(REPO / "RELIABILITY.md"))


def parse_seeds(text: str) -> list[int]:
    out = []
    for chunk in text.split(","):
        lo, _, hi = chunk.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-4", help="seeds to run, e.g. 0-499 or 3,17")
    parser.add_argument("--work", default="/tmp/latentray-torture", help="scratch folder")
    parser.add_argument("--report", help="write the figures as JSON here")
    parser.add_argument("--no-s3", action="store_true", help="local outputs only")
    parser.add_argument("--write-md", action="store_true", help="write the figures into RELIABILITY.md")
    args = parser.parse_args(argv)
    work = Path(args.work)
    pool = image_pool(work / "pool")
    s3 = None if args.no_s3 else S3Server()
    totals, findings, t0 = Counter(), [], time.time()
    for seed in parse_seeds(args.seeds):
        t = time.time()
        try:
            run_scenario(seed, work, pool, s3, totals)
            status = "ok"
        except Exception as exc:  # a Finding, or the harness itself failing: both reported with the seed
            findings.append({"seed": seed, "finding": f"{type(exc).__name__}: {exc}"})
            status = f"FINDING: {type(exc).__name__}: {exc}"
        totals["scenarios"] += 1
        print(f"torture: seed {seed}: {status} ({time.time() - t:.0f} s)", flush=True)
    report = {"seeds": args.seeds, "seconds": round(time.time() - t0), "totals": dict(sorted(totals.items())),
              "findings": findings}
    print(json.dumps(report, indent=1))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    if args.write_md:
        write_figures(report)
    if s3 is not None:
        s3.stop()
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
