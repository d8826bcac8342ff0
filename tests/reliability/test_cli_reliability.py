"""Issue 9, items 1, 2, 8-11, 13, 14: the training CLI loses nothing and explains every bad input
in one line (exit 2, or 130 for Ctrl-C), never a traceback.  Small sinusoid runs on the CPU,
each bounded in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from applications.imaml.checkpoint import load_checkpoint
from applications.imaml.cli import main
from applications.imaml.runlog import read_log

REPO = Path(__file__).resolve().parents[2]
FAST = ["--dataset", "sinusoid", "--meta-batch", "2", "--inner-steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _threads():  # type: ignore[no-untyped-def]
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse / parser.exit
        rc = int(e.code or 0)
    cap = capsys.readouterr()
    return rc, cap.err


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _train(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", *FAST, "--meta-steps", str(steps), "--out", str(out), *extra]


# -- 1. overwrite, then a crash before the first checkpoint --------------------------------
def test_overwrite_makes_the_old_run_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_train(out, 4, "--checkpoint-every", "2")) == 0
    capsys.readouterr()
    # A new run with --overwrite that dies at once (before its first checkpoint): simulated
    # by a run whose first step raises.
    from applications.imaml import train as train_mod

    original = train_mod.Trainer.train_step

    def boom(self):  # type: ignore[no-untyped-def]
        raise FloatingPointError("simulated crash before the first checkpoint")

    train_mod.Trainer.train_step = boom  # type: ignore[method-assign]
    try:
        rc, _ = _cli(_train(out, 10, "--overwrite"), capsys)
    finally:
        train_mod.Trainer.train_step = original  # type: ignore[method-assign]
    assert rc == 2
    assert not (out / "checkpoint.pt").exists()
    rc, err = _cli(["train", "--dataset", "sinusoid", "--out", str(out), "--resume", "--no-progress"], capsys)
    _one_line_error(rc, err, "no checkpoint")


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_train(a, 2)) == 0 and main(_train(b, 2)) == 0
    capsys.readouterr()
    (a / "checkpoint.pt").write_bytes((b / "checkpoint.pt").read_bytes())  # b's checkpoint in a's folder
    rc, err = _cli(["train", "--dataset", "sinusoid", "--out", str(a), "--resume", "--meta-steps", "4", "--no-progress"], capsys)
    _one_line_error(rc, err, "belongs to another run")


# -- 2. two processes on one folder ---------------------------------------------------------
def test_second_concurrent_run_fails_at_once_naming_the_holder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.imaml.rundir import RunLock

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from applications.imaml.rundir import RunLock; "
         f"l = RunLock({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t = time.perf_counter()
        rc, err = _cli(_train(out, 2), capsys)
        assert time.perf_counter() - t < 20
        _one_line_error(rc, err, "in use by pid", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    # The holder was killed: its lock is gone with it (no stale lock).
    with RunLock(out):
        pass
    assert main(_train(out, 2)) == 0


# -- 8. truncated, empty, foreign or malicious checkpoints ----------------------------------
class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["truncated", "empty", "foreign", "malicious", "random"])
def test_bad_checkpoints_give_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_train(out, 2)) == 0
    capsys.readouterr()
    ck = out / "checkpoint.pt"
    if kind == "truncated":
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    elif kind == "empty":
        ck.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, ck)
    elif kind == "malicious":
        import pickle

        ck.write_bytes(pickle.dumps(_Evil()))
    else:
        ck.write_bytes(np.random.default_rng(0).bytes(4096))
    for argv in (["evaluate", "--checkpoint", str(ck), "--episodes", "2", "--no-progress"],
                 ["train", "--dataset", "sinusoid", "--out", str(out), "--resume", "--meta-steps", "4", "--no-progress"]):
        rc, err = _cli(argv, capsys)
        _one_line_error(rc, err, "checkpoint")
        assert "pwned" not in err


# -- 9. corrupt data files ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "missing-arrays", "random", "pickled"])
def test_corrupt_omniglot_npz_gives_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.imaml.data.omniglot._read import read_omniglot_npz

    path = tmp_path / "images_background.npz"
    if kind == "truncated":
        np.savez(path, images=np.zeros((2, 20, 28, 28), np.uint8), alphabet_names=np.array(["a"]),
                 alphabet=np.zeros(2, np.int64), character=np.zeros(2, np.int64))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "missing-arrays":
        np.savez(path, other=np.zeros(3))
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(2048))
    else:
        np.savez(path, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError) as info:
        read_omniglot_npz(path, source_split="background")
    msg = str(info.value)
    assert str(path) in msg and "allow_pickle" not in msg and "\n" not in msg


def test_corrupt_official_zip_gives_a_value_error(tmp_path: Path) -> None:
    from applications.imaml.data.omniglot._read import _official_entries

    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("Latin/character01/0001_01.png", b"x" * 100)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable zip"):
        _official_entries(path, None)


# -- 10. devices ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["nonsense", "mps", "cuda:7"])
def test_bad_device_gives_one_line(device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if device == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    rc, err = _cli(["train", "--dataset", "sinusoid", "--meta-steps", "1", "--out", str(tmp_path / "x"),
                    "--no-progress", "--device", device], capsys)
    _one_line_error(rc, err, "--device")
    out = tmp_path / "run"
    assert main(_train(out, 1)) == 0
    capsys.readouterr()
    rc, err = _cli(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--episodes", "2", "--no-progress",
                    "--device", device], capsys)
    _one_line_error(rc, err, "--device")


# -- 11. Ctrl-C -----------------------------------------------------------------------------
def _default_sigint() -> None:
    # A background job of a non-interactive shell (e.g. CI started with "&") inherits an
    # *ignored* SIGINT, and Python then installs no KeyboardInterrupt handler: restore the
    # default so that the child behaves as under a terminal's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_prints_where_to_resume_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "applications.imaml", *_train(out, 100000, "--checkpoint-every", "5")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.communicate()  # reap it and close the pipes, whatever happened
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err and "checkpoint" in err
    ck = load_checkpoint(out / "checkpoint.pt")  # still loadable
    assert ck["step"] >= 5
    assert main(_train(out, ck["step"] + 2, "--resume")) == 0


def test_sigkill_during_training_leaves_a_resumable_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "applications.imaml", *_train(out, 100000, "--checkpoint-every", "1")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()
    # A fake stale temporary file, as a kill inside a checkpoint write leaves.
    (out / "checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    ck = load_checkpoint(out / "checkpoint.pt")
    assert main(_train(out, ck["step"] + 2, "--resume")) == 0  # the lock died with the process
    assert not list(out.glob("*.tmp"))  # 14: stale temporaries removed at start
    steps = [int(r["step"]) for r in read_log(out / "log.csv")]
    assert steps == list(range(1, ck["step"] + 3))


# -- 13. non-finite learning rates, huge evaluations -----------------------------------------
@pytest.mark.parametrize("flag", ["--outer-lr", "--inner-lr", "--lam"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_nonfinite_rates_are_refused_up_front(flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(_train(tmp_path / "r", 1, flag, value), capsys)
    assert rc == 2 and "finite" in err and "Traceback" not in err


def test_huge_evaluation_prints_its_estimated_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_train(out, 1)) == 0
    capsys.readouterr()
    lines: list[str] = []

    class Stop(Exception):
        pass

    def log(s: str) -> None:
        lines.append(s)
        if s.startswith("evaluating"):
            raise Stop

    with pytest.raises(Stop):
        main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--episodes", "1e9", "--batch", "4",
              "--no-progress"], log=log)
    assert lines and lines[-1].startswith("evaluating 1000000000 episodes: about ")
