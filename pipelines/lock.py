"""One writer per output: numbered leases, taken race-free, refreshed, and fenced.

A lease is a file `<output>/_lease/<generation>.json` (host, pid, token, start, last refresh); the holder of an
output is its highest generation. A run takes the output by *creating* the next generation exclusively (`io.create_exclusive`: a hard link
of a complete file locally, a conditional PUT with If-None-Match on S3), so of several runs that judged the same
lease free or stale exactly one wins, and a run that judged an old lease stale can never remove a newer one.
Generations only grow, so they also order the writes of successive runs (`part-<generation>-...`).

A lease is free when its holder released it, stale when its process is gone (same host) or when nobody refreshed it
for `ttl` seconds (a lease whose content is damaged: for `ttl` seconds since the file last changed). The holder refreshes it every ttl/4,
retrying errors, and has *lost* it when a newer generation exists or when it could not refresh for FENCE * ttl
(before anyone may judge it stale): the run then stops with LeaseLost and writes nothing more. Every writer — the
driver before run.json, stats.json, the index, and every task before a part — calls `fence(ticket)` first.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from pipelines import faults, io

LEASES = "_lease"
TTL = float(os.environ.get("LATENTRAY_LEASE_TTL", 120))  # seconds without a refresh after which a lease is stale
FENCE = 0.75  # a holder that could not refresh for this share of the TTL stops writing
POLL = 2.0  # seconds between attempts with --wait
LEASE_RE = re.compile(r"^(\d+)\.json$")  # exclusive creation is on this name: one winner per generation


class OutputLocked(RuntimeError):
    """Another run holds the output."""


class LeaseLost(RuntimeError):
    """This run no longer holds its output: it stops and writes nothing more."""


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class Ticket:
    """What a writer needs to check it still holds the output (shipped to Ray tasks)."""

    out_dir: str
    gen: int
    ttl: float = TTL


def leases(out_dir: str) -> dict[int, dict]:
    """{generation: listing info} of an output's lease files."""
    fs, folder = io.join(out_dir, LEASES)
    out = {}
    for name, info in io.listing(fs, folder).items():
        match = LEASE_RE.match(name)
        if match:
            out[int(match.group(1))] = {**info, "file": name}
    return out


def read_lease(out_dir: str, entry: dict) -> dict:
    """A lease's content; when it does not parse, its listing's mtime as its last refresh."""
    fs, path = io.join(out_dir, posixpath.join(LEASES, entry["file"]))
    fallback = {"pid": "?", "host": "?", "damaged": True, "refreshed": io.modified(entry)}
    try:
        lease = json.loads(io.fetch(fs, path))
        return lease if isinstance(lease, dict) and {"refreshed", "pid", "host"} <= set(lease) else fallback
    except FileNotFoundError:
        return {**fallback, "released": True}
    except ValueError:
        return fallback


def is_stale(lease: dict, ttl: float) -> bool:
    if lease.get("released"):
        return True
    if lease.get("host") == host_name() and isinstance(lease.get("pid"), int) and lease["pid"] > 0 and \
            not pid_alive(lease["pid"]):
        return True
    return time.time() - float(lease.get("refreshed", 0)) > ttl


def describe(lease: dict) -> str:
    age = time.time() - float(lease.get("refreshed", lease.get("started", 0)))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0) or 0)))
    if lease.get("damaged"):
        return f"a run whose lease is unreadable (changed {age:.0f} s ago; taken as stale {TTL:.0f} s after that)"
    return f"pid {lease.get('pid')} on {lease.get('host')} (started {started}, refreshed {age:.0f} s ago)"


def fence(ticket: Ticket) -> None:
    """Raise LeaseLost unless `ticket` is still the newest, unreleased, recently refreshed lease."""
    found = leases(ticket.out_dir)
    top = max(found, default=0)
    if top != ticket.gen:
        raise LeaseLost(f"{ticket.out_dir}: another run took the output (lease generation {top}, ours {ticket.gen});"
                        " this run stops and writes nothing more")
    lease = read_lease(ticket.out_dir, found[top])
    if lease.get("released") or time.time() - float(lease.get("refreshed", 0)) > FENCE * ticket.ttl:
        raise LeaseLost(f"{ticket.out_dir}: our lease (generation {ticket.gen}) was not refreshed for "
                        f"{FENCE * ticket.ttl:.0f} s; this run stops and writes nothing more")


class OutputLock:
    def __init__(self, out_dir: str, wait: bool = False, ttl: float = TTL, poll: float = POLL):
        self.out_dir, self.wait, self.ttl, self.poll = out_dir, wait, ttl, poll
        self.gen = 0
        self.lease = {"host": host_name(), "pid": os.getpid(), "started": time.time(), "token": uuid.uuid4().hex}
        self.last_refresh = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = None

    @property
    def ticket(self) -> Ticket:
        return Ticket(self.out_dir, self.gen, self.ttl)

    def _file(self, gen: int) -> str:
        return posixpath.join(LEASES, f"{gen:012d}.json")

    def _content(self, **extra) -> bytes:
        return json.dumps({**self.lease, "gen": self.gen, "refreshed": time.time(), **extra}).encode()

    def holder(self) -> dict | None:
        """The live lease holding the output, or None when it is free."""
        found = leases(self.out_dir)
        if not found:
            return None
        lease = read_lease(self.out_dir, found[max(found)])
        return None if is_stale(lease, self.ttl) else lease

    def acquire(self) -> None:
        while True:
            found = leases(self.out_dir)
            top = max(found, default=0)
            if top:
                lease = read_lease(self.out_dir, found[top])
                if not is_stale(lease, self.ttl):
                    if not self.wait:
                        raise OutputLocked(f"{self.out_dir} is in use by another run: {describe(lease)}. Wait for "
                                           "it to finish or pass --wait")
                    time.sleep(self.poll)
                    continue
            self.gen = top + 1
            fs, path = io.join(self.out_dir, self._file(self.gen))
            if io.retrying(lambda: self._create(fs, path), f"creating lease {path}"):
                if max(leases(self.out_dir), default=0) != self.gen:
                    # our listing was out of date (a directory read while another run created its generation and
                    # removed the one before can miss both; CI saw a generation 1 taken beside a live 2): back off
                    io.remove(fs, path)
                    time.sleep(0.05)
                    continue
                self.last_refresh = time.time()
                for gen, entry in found.items():  # older generations are history now
                    io.remove(fs, posixpath.join(posixpath.dirname(path), entry["file"]))
                return
            time.sleep(0.05)  # another run created this generation first: judge again

    def _create(self, fs, path: str) -> bool:
        data = self._content()
        if io.create_exclusive(fs, path, data):
            return True
        try:  # an earlier attempt may have gone through with its answer lost: then the lease is ours
            return json.loads(io.fetch(fs, path)).get("token") == self.lease["token"]
        except (FileNotFoundError, ValueError):
            return False

    def refresh(self) -> None:
        """Rewrite our lease (one attempt); notice when a newer generation exists or refreshing kept failing."""
        faults.point("lease")
        try:
            top = max(leases(self.out_dir), default=0)
            if top != self.gen:
                self.lost = f"another run took the output (lease generation {top}, ours {self.gen})"
                return
            io.write_bytes(self.out_dir, self._file(self.gen), self._content())
            self.last_refresh = time.time()
        except Exception:
            pass  # retried at the next tick; the fence below decides when it is too late
        if time.time() - self.last_refresh > FENCE * self.ttl:
            self.lost = f"could not refresh our lease for {FENCE * self.ttl:.0f} s"

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl / 8) and self.lost is None:
            self.refresh()

    def check(self, storage: bool = True) -> None:
        """Raise LeaseLost when this run lost its output; with `storage`, also ask the store (before a write)."""
        if self.lost is None and storage:
            try:
                fence(self.ticket)
            except LeaseLost as exc:
                self.lost = str(exc)
        if self.lost is not None:
            raise LeaseLost(f"{self.out_dir}: {self.lost}; this run stops and writes nothing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self.gen:
            try:
                if max(leases(self.out_dir), default=0) == self.gen:
                    io.write_bytes(self.out_dir, self._file(self.gen), self._content(released=True))
            except io.StorageError:
                pass  # the lease goes stale by itself after the TTL

    def __enter__(self) -> "OutputLock":
        self.acquire()
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
