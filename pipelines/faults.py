"""Fault injection for the torture test (tests/torture.py), off unless its environment variables are set — like
Ray's own `RAY_testing_*` knobs. Nothing here runs in a normal run.

* `LATENTRAY_KILL_AT=<point>:<n>`: the n-th time this process passes `point(<point>)`, the whole run is killed with
  SIGKILL (the driver's process group, recorded when the driver first imports this module, and this process), as a
  lost machine would be. Points: task (a CPU stage task), actor (before a model stage's batch), write (a part's
  bytes on their way to storage), index (a segment about to be written), lease (a lease refresh), tidy (between
  writing a merged part and removing the parts it replaces), train_step (a training worker's step).
  With `LATENTRAY_KILL_SCOPE=process` only this process dies (a lost worker, not a lost machine), and with
  `LATENTRAY_KILL_ONCE=<file>` only the first process to get there (the file records it; restarted workers live).
* `LATENTRAY_FLAKY_RATE=<p>`: outputs given as `flaky:///path` live on the local disk, but every storage call fails
  with an OSError with probability p (before it acts), seeded by `LATENTRAY_FLAKY_SEED` and the process id.
"""

from __future__ import annotations

import os
import random
import signal

from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import register_implementation

KILL = "LATENTRAY_KILL_AT"
GROUP = "LATENTRAY_KILL_PGID"
if os.environ.get(KILL):
    os.environ.setdefault(GROUP, str(os.getpgrp()))  # the driver's group; its Ray workers inherit the variable
_passes: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(KILL)
    if not spec or spec.rsplit(":", 1)[0] != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] != int(spec.rsplit(":", 1)[1]):
        return
    once = os.environ.get("LATENTRAY_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    try:
        if os.environ.get("LATENTRAY_KILL_SCOPE") != "process":
            os.killpg(int(os.environ[GROUP]), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


class FlakyFileSystem(LocalFileSystem):
    """The local disk behind a store that fails now and then."""

    protocol = "flaky"
    root_marker = "/"
    _rng = None

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return LocalFileSystem._strip_protocol(path)

    def _maybe_fail(self, what: str) -> None:
        if FlakyFileSystem._rng is None:
            FlakyFileSystem._rng = random.Random(f"{os.environ.get('LATENTRAY_FLAKY_SEED', '0')}-{os.getpid()}")
        if FlakyFileSystem._rng.random() < float(os.environ.get("LATENTRAY_FLAKY_RATE", "0")):
            raise OSError(f"injected storage error in {what}")


def _flaky(name):
    real = getattr(LocalFileSystem, name)

    def call(self, *args, **kwargs):
        self._maybe_fail(name)
        return real(self, *args, **kwargs)

    return call


for _name in ("cat_file", "_open", "ls", "info", "mv", "rm", "rm_file", "makedirs", "exists", "pipe_file"):
    setattr(FlakyFileSystem, _name, _flaky(_name))

if os.environ.get("LATENTRAY_FLAKY_RATE"):
    register_implementation("flaky", FlakyFileSystem, clobber=True)
