"""Elastic training: a ``torchrun --max-restarts=N`` restart resumes from the last checkpoint.

When a worker dies, ``torchrun`` stops the whole group and starts it again with the same
command and ``TORCHELASTIC_RESTART_COUNT`` one higher.  On such a restart
(:func:`restart_count` > 0) rank 0 looks at the run folder's checkpoint and decides, for
every rank (:func:`plan_restart`, one broadcast):

* a checkpoint written by **this launch** (every checkpoint records ``launch``,
  :func:`launch_key`: torchrun's rendezvous id, unique per launch with ``--standalone`` or
  a single-node launch without ``--master-port``) → resume from it, whatever the flags
  (``--overwrite`` included); the meta-steps after it are run again, identically;
* no checkpoint, on a launch that started a fresh run, and a log that goes no further than
  the first checkpoint's step → the failure came before the first checkpoint: start over
  from meta-step 0; the failed attempt's partial log, validation log and ``best.pt`` are
  discarded, so the folder holds one run (the same meta-steps are run again, identically);
* a checkpoint of an earlier launch → exactly what the first attempt did with it:
  ``--resume`` resumes it (the first attempt died before writing its own), ``--overwrite``
  starts over, neither refuses (the first attempt refused too: a restart must not
  quietly continue an unrelated run);
* an unreadable (corrupt, truncated) checkpoint, or none where one had been written (the
  log goes past the first checkpoint's step) or where ``--resume`` needs one → one
  line and exit status 2 on every rank; torchrun tries again until ``--max-restarts`` is
  spent, then stops.

The run lock (:class:`.rundir.RunLock`, an ``flock``) of a rank 0 that died goes with its
process, and the restarted rank 0 removes the temporary files of a write the failure cut
short, as any start does.

:func:`fault_step` is a **test hook**: ``BILEVEL_FAULT_AT_STEP=k`` makes rank
``BILEVEL_FAULT_RANK`` (default 0) exit abruptly (``os._exit(1)``) right after meta-step k
(after that step's checkpoint, if it has one), on the first attempt only.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import socket
import sys
from pathlib import Path

import torch.distributed as dist

from .checkpoint import load_checkpoint
from .distributed import DistContext

__all__ = ["RestartPlan", "fault_step", "inject_fault", "launch_key", "plan_restart", "restart_count"]


def restart_count() -> int:
    """Worker-group restarts so far under torchrun (0: the first attempt, or no torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def launch_key() -> str | None:
    """What identifies this torchrun launch across its restarts (None without torchrun).

    torchrun's rendezvous id (``TORCHELASTIC_RUN_ID``: a fresh UUID with ``--standalone``
    or a single-node launch without ``--master-port``, else ``--rdzv-id``).  Its default
    ``none`` is not unique: then the host and the launcher's process id stand in (the
    launcher outlives its restarts; rank 0 decides for every rank).
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    if run_id == "none":
        return f"none@{socket.gethostname()}:{os.getppid()}"
    return run_id


@dataclasses.dataclass(frozen=True)
class RestartPlan:
    """How a restarted attempt starts: the ``resume``/``overwrite`` it trains with, the line
    it logs (``message``), or the one-line ``error`` it stops with."""

    resume: bool
    overwrite: bool
    message: str | None = None
    error: str | None = None


def _last_logged_step(log_csv: Path) -> int:
    """The largest meta-step in a ``log.csv`` (0: none, or no readable log)."""
    try:
        with open(log_csv, newline="") as f:
            return max((int(r["step"]) for r in csv.DictReader(f) if (r.get("step") or "").isdigit()), default=0)
    except (OSError, ValueError, csv.Error):
        return 0


def _decide(ckpt_path: Path, count: int, resume: bool, overwrite: bool, checkpoint_every: int) -> RestartPlan:
    where = f"torchrun restart {count}"
    if not ckpt_path.exists():
        if resume:
            return RestartPlan(resume, overwrite, error=f"{where}: cannot resume: the checkpoint {str(ckpt_path)!r} that "
                               "this launch resumed (--resume) is gone; stopping")
        logged = _last_logged_step(ckpt_path.parent / "log.csv")
        if logged > checkpoint_every:  # meta-step checkpoint_every was saved before the next one began
            return RestartPlan(resume, overwrite, error=f"{where}: cannot resume: {str(ckpt_path)!r} is gone although "
                               f"the log reached meta-step {logged} (checkpoints every {checkpoint_every}); stopping "
                               "(restore it, or start over with --overwrite)")
        return RestartPlan(False, True, message=f"{where}: no checkpoint had been written before the failure: starting over "
                           "from meta-step 0 (the failed attempt's partial outputs are discarded)")
    try:
        ckpt = load_checkpoint(ckpt_path)
        step = int(ckpt["step"])
    except (ValueError, OSError, KeyError, TypeError) as err:
        return RestartPlan(resume, overwrite, error=f"{where}: cannot resume: {err}; stopping (restore the "
                           "checkpoint, or start over with --overwrite)")
    key = launch_key()
    if key is not None and ckpt.get("launch") == key:
        return RestartPlan(True, False, message=f"{where}: resumed from the last checkpoint, meta-step {step} "
                           f"({str(ckpt_path)!r}); the meta-steps after it are run again")
    if resume:  # the checkpoint the first attempt resumed; it died before writing its own
        return RestartPlan(True, False, message=f"{where}: resumed from meta-step {step} ({str(ckpt_path)!r}), the "
                           "checkpoint this launch started from (none written since)")
    return RestartPlan(resume, overwrite)  # an earlier run's: as the first attempt (refused, or --overwrite)


def plan_restart(ckpt_path: str | os.PathLike[str], *, resume: bool, overwrite: bool, checkpoint_every: int,
                 ctx: DistContext) -> RestartPlan | None:
    """None on a first attempt; on a restart, rank 0's decision (see the module's
    docstring), the same on every rank.  ``resume``/``overwrite``: the command's flags.

    The restart count is the largest over the ranks (each torchrun agent counts its own
    restarts; one whose workers did not fail may count fewer), so that every rank agrees
    that this is a restart."""
    count = restart_count()
    if ctx.enabled:
        counts: list[int | None] = [None] * ctx.world
        dist.all_gather_object(counts, count)
        count = max(c or 0 for c in counts)
    if count == 0:
        return None
    plan = _decide(Path(ckpt_path), count, resume, overwrite, checkpoint_every) if ctx.is_writer else None
    if ctx.enabled:
        box: list[RestartPlan | None] = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    assert plan is not None
    return plan


def fault_step(rank: int) -> int | None:
    """Test hook: the meta-step after which this rank should fail (``BILEVEL_FAULT_AT_STEP``
    on rank ``BILEVEL_FAULT_RANK``, default 0), on the first attempt only; else None."""
    at = os.environ.get("BILEVEL_FAULT_AT_STEP")
    if not at or restart_count() > 0:
        return None
    try:
        step, target = int(at), int(os.environ.get("BILEVEL_FAULT_RANK", "0"))
    except ValueError:
        raise ValueError(f"BILEVEL_FAULT_AT_STEP={at!r} / BILEVEL_FAULT_RANK={os.environ.get('BILEVEL_FAULT_RANK')!r}: "
                         "integers expected (a test hook)") from None
    return step if rank == target else None


def inject_fault(step: int, rank: int) -> None:
    """Die now, as a crash would (no clean-up, no lock release, exit status 1)."""
    sys.stdout.flush()
    sys.stderr.write(f"BILEVEL_FAULT_AT_STEP={step}: rank {rank} exits after meta-step {step} (test hook)\n")
    sys.stderr.flush()
    os._exit(1)
