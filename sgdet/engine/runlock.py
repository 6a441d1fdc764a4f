"""Engine stage: one live run per OUTPUT_DIR, and the run id every report line carries.

A run holds ``OUTPUT_DIR/run.lock`` for its whole life: an ``flock`` on the file (released by
the kernel when the process dies, kill -9 included) plus a JSON line naming the holder (pid,
host, start time, command, run id). A second run in the same folder is refused with one line
naming the holder; a lock file nobody holds any more (a killed run) is taken over, and said so.
Where ``fcntl`` is missing (Windows) the folder is not locked and a warning says so.

Re-entrant within a process: the demos and sweeps open nested sessions on one folder.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
import time

from sgdet.errors import ConfigError

try:
    import fcntl
except ImportError:                  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger("sgdet.engine")

LOCK = "run.lock"


class OutputDirBusy(ConfigError):
    """OUTPUT_DIR is held by a live run."""


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: sortable by start time, unique across hosts."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _holder_text(info: dict) -> str:
    if not info:
        return "another run (no holder recorded)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (f"run {info.get('run_id', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"started {started}: {info.get('command', '?')})")


def _read_holder(handle) -> dict:
    try:
        handle.seek(0)
        return json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return {}


_held: dict[str, list] = {}          # realpath -> [RunLock, depth]


class RunLock:
    """``with RunLock(folder) as lock:`` holds ``folder/run.lock``; ``lock.run_id`` names the run."""

    def __init__(self, folder: str, run_id: str | None = None) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK)
        self.run_id = run_id or new_run_id()
        self._handle = None

    def acquire(self) -> "RunLock":
        key = os.path.realpath(self.folder)
        if key in _held:                           # nested session of this process
            _held[key][1] += 1
            self.run_id, self._handle = _held[key][0].run_id, None
            return self
        if fcntl is None:                          # pragma: no cover - Windows
            log.warning("cannot lock %s on this platform; do not start two runs in it", self.folder)
            _held[key] = [self, 1]
            return self
        os.makedirs(self.folder, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(handle)
                handle.close()
                raise OutputDirBusy(f"OUTPUT_DIR {self.folder} is in use by {_holder_text(holder)}; "
                                    "wait for it to finish or choose another OUTPUT_DIR") from None
            # the holder may have removed the file between our open and our lock: lock the new one
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        stale = _read_holder(handle)
        if stale:
            log.warning("taking over %s from %s, which is no longer running", self.path,
                        _holder_text(stale))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.time(), "command": " ".join(sys.argv)[:300]}) + "\n")
        handle.flush()
        self._handle = handle
        _held[key] = [self, 1]
        return self

    def release(self) -> None:
        key = os.path.realpath(self.folder)
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        owner = entry[0]
        if owner._handle is not None:
            # unlink while still holding the lock, so nobody locks a file about to vanish
            try:
                os.unlink(owner.path)
            except FileNotFoundError:
                pass
            owner._handle.close()
            owner._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
