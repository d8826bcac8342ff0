"""``torchrun --nproc_per_node=2 -m applications.imaml train``: the same meta-parameters as one
process with the same global meta-batch, ranks in sync, rank 0's checkpoint resumable by a
2-process run, and launches that cannot work fail fast with a clear message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from applications.imaml.checkpoint import load_checkpoint
from applications.imaml.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
ARGS = ["train", "--dataset", "sinusoid", "--meta-batch", "4", "--inner-steps", "3", "--no-progress", "--device", "cpu",
        "--threads", "1"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["BILEVEL_DIST_TIMEOUT"] = "120"
    return env


def _run(n: int, out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    if n == 1:
        cmd = [sys.executable, "-m", "applications.imaml"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "applications.imaml"]
    return subprocess.run([*cmd, *ARGS, "--meta-steps", str(steps), "--out", str(out), *extra], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _theta(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoint.pt")["theta"]


def test_two_processes_match_one_and_resume(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run(1, one, 6)
    assert r1.returncode == 0, r1.stderr
    r2 = _run(2, two, 3, "--checkpoint-every", "3")
    assert r2.returncode == 0, r2.stderr
    r3 = _run(2, two, 6, "--resume")  # rank 0's checkpoint, read by both ranks
    assert r3.returncode == 0, r3.stderr
    for k, v in _theta(one).items():
        torch.testing.assert_close(_theta(two)[k], v, rtol=1e-5, atol=1e-6)
    assert [int(r["step"]) for r in read_log(two / "log.csv")] == list(range(1, 7))  # one writer, no duplicate rows
    assert "2 processes" in r2.stdout


def test_a_meta_batch_that_does_not_split_fails_fast(tmp_path: Path) -> None:
    r = _run(2, tmp_path / "x", 2, "--meta-batch", "3")
    assert r.returncode != 0 and "does not split evenly over 2 processes" in r.stderr


def test_a_world_size_without_a_rendezvous_fails_fast(tmp_path: Path) -> None:
    env = _env()
    env.update({"WORLD_SIZE": "2", "RANK": "0"})
    r = subprocess.run([sys.executable, "-m", "applications.imaml", *ARGS, "--meta-steps", "2", "--out",
                        str(tmp_path / "y")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr and "Traceback" not in r.stderr
