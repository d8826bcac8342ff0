"""The run folder's integrity: one writer at a time, an overwrite that leaves nothing of the
old run reachable, and a log, configuration and checkpoint that provably belong together.

* :class:`RunLock` — an exclusive ``fcntl.flock`` on ``OUT/.lock``.  The kernel drops it
  when the holder exits, however it exits (a crash or ``SIGKILL`` included), so a stale
  lock cannot block a later run; the file names the holder (pid, host, start time) for
  the error message of a second run.
* :func:`discard_old_run` — ``--overwrite`` first deletes the old checkpoint (then the
  rest of the old run's files), so that a new run that dies before its first checkpoint
  cannot be ``--resume``\\ d into the old run's state with the new run's log.
* a **run id** (random, per fresh start) written to ``run_info.json`` and into every
  checkpoint: ``--resume`` refuses a checkpoint whose id is not the folder's.
* :func:`remove_stale_temporaries` — temporary files of an atomic write that a kill
  interrupted (``checkpoint.pt.*.tmp``, ``*.csv.tmp``), removed at start under the lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import uuid
from pathlib import Path
from typing import IO, Any

from ..cliargs import refuse_file_out

__all__ = ["RUN_FILES", "RunLock", "RunLockedError", "discard_old_run", "new_run_id", "read_run_id",
           "remove_stale_temporaries"]

#: The files of a run, the checkpoints first (what --resume reads must go first).
RUN_FILES = ("checkpoint.pt", "best.pt", "log.csv", "val.csv", "config.json", "run_info.json")
LOCK_NAME = ".lock"


class RunLockedError(OSError):
    """Another process is writing to the run folder."""


class RunLock:
    """Exclusive lock on a run folder for the life of this object (or a ``with`` block)."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self._f: IO[str] | None = None  # set first: release() must work whatever fails below
        self.out = refuse_file_out(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / LOCK_NAME
        self._f = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "another process"
            self._f.close()
            self._f = None
            raise RunLockedError(
                f"{str(self.out)!r} is in use by {holder}: two runs must not write to one folder "
                "(wait for it, stop it, or choose another --out)"
            ) from None
        self._f.seek(0)
        self._f.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self._f.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        self._f.flush()

    def release(self) -> None:
        if self._f is not None:
            try:
                self._f.seek(0)
                self._f.truncate()
                fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            finally:
                self._f.close()
                self._f = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a Trainer dropped without close(): do not hold the folder
        self.release()


def discard_old_run(out: str | os.PathLike[str]) -> list[str]:
    """Delete the old run's files, the checkpoints first; returns the names removed."""
    removed = []
    for name in RUN_FILES:
        p = Path(out) / name
        if p.exists():
            p.unlink()
            removed.append(name)
    return removed


def remove_stale_temporaries(out: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary files of interrupted atomic writes (call with the lock held)."""
    removed = []
    for pattern in ("checkpoint.pt.*.tmp", "best.pt.*.tmp", "*.csv.tmp", "*.json.tmp"):
        for p in Path(out).glob(pattern):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def new_run_id() -> str:
    return uuid.uuid4().hex


def read_run_id(out: str | os.PathLike[str]) -> str | None:
    """The run id recorded in ``run_info.json`` (None: absent, e.g. a run of an older version)."""
    try:
        info = json.loads((Path(out) / "run_info.json").read_text())
    except (OSError, ValueError):
        return None
    rid = info.get("run_id") if isinstance(info, dict) else None
    return rid if isinstance(rid, str) else None
