"""``torchrun --max-restarts=N``: a killed worker restarts the group, which resumes from the
last checkpoint and ends with an uninterrupted run's meta-parameters; what a restart does
with a missing, corrupt or foreign checkpoint (simulated restarts in this process: the
restart count and run id are torchrun's environment variables)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import applications.imaml.train as train_module
from applications.imaml.checkpoint import load_checkpoint
from applications.imaml.cli import main
from applications.imaml.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
# Fixed batching strategies: "auto" times vmap against the loop in each process, and two
# processes (a run started over and its reference) may choose differently under load, which
# changes the meta-parameters by rounding; these tests compare them bitwise.
ARGS = ["train", "--dataset", "sinusoid", "--meta-batch", "4", "--inner-steps", "3", "--no-progress", "--device", "cpu",
        "--threads", "1", "--batching", "vmap", "--query-batching", "vmap"]
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "BILEVEL_FAULT_AT_STEP", "BILEVEL_FAULT_RANK")
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    n = torch.get_num_threads()  # the CLI sets one thread for sinusoid
    yield
    torch.set_num_threads(n)


def _theta(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoint.pt")["theta"]


def _steps(path: Path) -> list[int]:
    return [int(r["step"]) for r in read_log(path)]


# -- a real restart: two gloo processes, rank 0 killed after meta-step 5 ----------------------

@needs_gloo
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, ref = tmp_path / "elastic", tmp_path / "ref"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(BILEVEL_DIST_TIMEOUT="60", BILEVEL_FAULT_AT_STEP="5")  # rank 0 dies after step 5; checkpoint at 3
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "applications.imaml", *ARGS, "--meta-steps", "6", "--checkpoint-every", "3", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BILEVEL_FAULT_AT_STEP=5: rank 0 exits after meta-step 5" in r.stderr  # it did die (and held the run lock)
    resumed = [line for line in r.stdout.splitlines() if "torchrun restart 1: resumed" in line]
    assert len(resumed) == 1 and "meta-step 3" in resumed[0], r.stdout
    assert _steps(out / "log.csv") == list(range(1, 7))  # rows 4-5 of the dead attempt replaced, once each
    assert not list(out.glob("*.tmp"))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 6 and isinstance(ckpt["launch"], str)
    # An uninterrupted run (one process: tests/distributed/test_torchrun.py has 2 processes equal 1 to 1e-5).
    assert main([*ARGS, "--meta-steps", "6", "--out", str(ref)]) == 0
    capsys.readouterr()
    for k, v in _theta(ref).items():
        torch.testing.assert_close(ckpt["theta"][k], v, rtol=1e-5, atol=1e-6)


@needs_gloo
def test_a_corrupt_checkpoint_at_a_torchrun_restart_stops_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")  # the first attempt refuses it (no --resume) and exits
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1",
           "-m", "applications.imaml", *ARGS, "--meta-steps", "2", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "torchrun restart" in line]
    assert len(lines) == 1 and "cannot resume" in lines[0] and "not a readable checkpoint" in lines[0], r.stderr
    assert "[rank0]: Traceback" not in r.stderr and "Traceback" not in r.stderr.split("torchrun restart 1")[0]


# -- simulated restarts (one process: torchrun's environment, a fault that raises) -----------

class _Died(BaseException):
    """The injected fault, raised instead of os._exit so that the test survives it."""


def _attempt(monkeypatch: pytest.MonkeyPatch, count: int, argv: list[str], *, run_id: str = "launch-A",
             fault_at: int | None = None) -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(count))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    if fault_at is None:
        monkeypatch.delenv("BILEVEL_FAULT_AT_STEP", raising=False)
        assert main(argv) == 0
        return
    monkeypatch.setenv("BILEVEL_FAULT_AT_STEP", str(fault_at))

    def die(step: int, rank: int) -> None:
        raise _Died(step)

    monkeypatch.setattr(train_module, "inject_fault", die)
    with pytest.raises(_Died):
        main(argv)


def test_a_restart_resumes_from_this_launchs_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, ref = tmp_path / "run", tmp_path / "ref"
    argv = [*ARGS, "--meta-steps", "6", "--checkpoint-every", "2", "--out", str(out), "--overwrite"]
    _attempt(monkeypatch, 0, argv, fault_at=5)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4 and _steps(out / "log.csv") == [1, 2, 3, 4, 5]
    (out / "checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a write the failure cut short
    capsys.readouterr()
    _attempt(monkeypatch, 1, argv)  # --overwrite again: this launch's checkpoint is resumed, not discarded
    said = [line for line in capsys.readouterr().out.splitlines() if "torchrun restart 1" in line]
    assert len(said) == 1 and "resumed from the last checkpoint, meta-step 4" in said[0]
    assert not list(out.glob("*.tmp")) and _steps(out / "log.csv") == list(range(1, 7))
    _attempt(monkeypatch, 0, [*ARGS, "--meta-steps", "6", "--out", str(ref)], run_id="launch-B")
    for k, v in _theta(ref).items():
        assert torch.equal(_theta(out)[k], v), k  # one process: resume is bit-identical


def test_a_failure_before_the_first_checkpoint_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out, ref = tmp_path / "run", tmp_path / "ref"
    val = ["--eval-every", "1", "--val-episodes", "4"]
    argv = [*ARGS, "--meta-steps", "4", "--checkpoint-every", "3", *val, "--out", str(out)]
    _attempt(monkeypatch, 0, argv, fault_at=2)
    assert not (out / "checkpoint.pt").exists() and (out / "best.pt").exists()  # validated, never checkpointed
    capsys.readouterr()
    _attempt(monkeypatch, 1, argv)
    assert "no checkpoint had been written before the failure: starting over" in capsys.readouterr().out
    assert _steps(out / "log.csv") == [1, 2, 3, 4] and _steps(out / "val.csv") == [1, 2, 3, 4]
    _attempt(monkeypatch, 0, [*ARGS, "--meta-steps", "4", *val, "--out", str(ref)], run_id="launch-B")
    for k, v in _theta(ref).items():
        assert torch.equal(_theta(out)[k], v), k
    assert load_checkpoint(out / "best.pt")["run_id"] == load_checkpoint(out / "checkpoint.pt")["run_id"]


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_a_restart_without_a_usable_checkpoint_stops_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = [*ARGS, "--meta-steps", "6", "--checkpoint-every", "2", "--out", str(out)]
    _attempt(monkeypatch, 0, argv, fault_at=3)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv("BILEVEL_FAULT_AT_STEP")
    good = (out / "checkpoint.pt").read_bytes()

    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])  # truncated
    line = _one_line_error(argv, capsys)
    assert "torchrun restart 1: cannot resume" in line and "not a readable checkpoint" in line

    (out / "checkpoint.pt").unlink()  # gone, although meta-step 2 was checkpointed (the log reached 3)
    line = _one_line_error(argv, capsys)
    assert "torchrun restart 1: cannot resume" in line and "is gone although the log reached meta-step 3" in line

    line = _one_line_error([*argv, "--resume"], capsys)  # the checkpoint a --resume launch started from is gone
    assert "torchrun restart 1: cannot resume" in line and "no checkpoint" in line


def test_a_restart_treats_an_earlier_runs_checkpoint_as_the_first_attempt_did(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _attempt(monkeypatch, 0, [*ARGS, "--meta-steps", "2", "--out", str(out)], run_id="an-earlier-launch")
    argv = [*ARGS, "--meta-steps", "4", "--out", str(out)]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-A")
    line = _one_line_error(argv, capsys)  # refused, as the first attempt was: not quietly continued
    assert "exists: pass --resume" in line
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0  # the first attempt resumed it and died before its own checkpoint
    said = capsys.readouterr().out
    assert "resumed from meta-step 2" in said and "the checkpoint this launch started from" in said
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
