"""One run per output: a lease file `<output>/_lock.json` (host, pid, start time, last refresh, a random token).

A lease is stale when its pid is gone on this host, or when its holder has not refreshed it for `ttl` seconds (the
holder refreshes every ttl/4 from a background thread, so a run on another machine that died lets go after ttl).
The lease is created exclusively (O_EXCL locally, a conditional PUT on object stores that support it) and read back,
so of two runs starting together one wins; a stale lease is moved aside atomically before it is replaced.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid

import fsspec

LOCK_NAME = "_lock.json"
TTL = 120.0  # seconds without a refresh after which a lease held on another host is stale
POLL = 2.0  # seconds between attempts with --wait


class OutputLocked(RuntimeError):
    """Another run holds the output."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class OutputLock:
    def __init__(self, out_dir: str, wait: bool = False, ttl: float = TTL, poll: float = POLL):
        self.fs, root = fsspec.core.url_to_fs(out_dir)
        self.out_dir, self.path = out_dir, posixpath.join(root, LOCK_NAME)
        self.wait, self.ttl, self.poll = wait, ttl, poll
        self.lease = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                      "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread = None

    # ----- reading and judging a lease -------------------------------------------------------------------------
    def holder(self) -> dict | None:
        """The current lease, or None when the output is free."""
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:  # a lease being written right now: treat as held, read again later
            return {"host": "?", "pid": -1, "started": time.time(), "refreshed": time.time(), "token": "?"}

    def is_stale(self, lease: dict) -> bool:
        if lease.get("host") == socket.gethostname() and lease.get("pid", -1) > 0 and not pid_alive(lease["pid"]):
            return True
        return time.time() - float(lease.get("refreshed", lease.get("started", 0))) > self.ttl

    @staticmethod
    def describe(lease: dict) -> str:
        age = time.time() - float(lease.get("refreshed", lease.get("started", 0)))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
        return f"pid {lease.get('pid')} on {lease.get('host')} (started {started}, refreshed {age:.0f} s ago)"

    # ----- taking and giving back ------------------------------------------------------------------------------
    def _write(self, mode: str) -> None:
        data = json.dumps({**self.lease, "refreshed": time.time()}).encode()
        with self.fs.open(self.path, mode) as f:
            f.write(data)

    def _try_create(self) -> bool:
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        if self.fs.exists(self.path):
            return False
        try:
            self._write("xb")
        except FileExistsError:
            return False
        held = self.holder()  # stores without conditional writes: the last writer wins, so check
        return held is not None and held.get("token") == self.lease["token"]

    def _break(self, lease: dict) -> None:
        """Move a stale lease aside (only one of several runs doing this at once succeeds), then remove it."""
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.mv(self.path, aside)
            self.fs.rm(aside)
        except (FileNotFoundError, OSError):
            pass  # someone else broke it first

    def acquire(self) -> None:
        while True:
            if self._try_create():
                return
            lease = self.holder()
            if lease is None:
                continue
            if self.is_stale(lease):
                self._break(lease)
                continue
            if not self.wait:
                raise OutputLocked(f"{self.out_dir} is in use by another run: {self.describe(lease)}. Wait for it "
                                   f"to finish or pass --wait; if that run is gone, delete {self.path}")
            time.sleep(self.poll)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            held = self.holder()
            if held is not None and held.get("token") == self.lease["token"]:
                self._write("wb")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self.holder()
        if held is not None and held.get("token") == self.lease["token"]:
            self.fs.rm(self.path)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
