"""Atomic checkpoints that make ``--resume`` continue exactly.

A checkpoint is a plain dict saved with :func:`torch.save` and loadable with
``torch.load(..., weights_only=True)`` (no pickled code): meta-parameters, raw λ
parameters, Adam's state, the step, the full run configuration, the task sampler's
position, the random-number-generator states (torch CPU and CUDA, numpy's legacy global
generator, Python's ``random``) and the torchrun launch that wrote it (a restart of that
launch resumes from it: :mod:`.elastic`).  Writing goes to a temporary file in the same folder,
flushed and fsynced, then :func:`os.replace` moves it into place, so a crash leaves
either the previous checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_NAME", "atomic_torch_save", "capture_rng_state", "load_checkpoint", "restore_rng_state"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` atomically (temporary file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the training loop (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        with warnings.catch_warnings():
            # torch's note on a foreign pickle protocol would be a second line of output for
            # a file that is refused anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError,
            AttributeError, TypeError, IndexError) as e:
        # Truncated/empty (EOFError, "PytorchStreamReader failed"), foreign, or a pickle that
        # weights_only refuses (code in it): one line, never a traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__
        raise ValueError(
            f"{str(path)!r} is not a readable checkpoint of this program (truncated, empty, from another program, "
            f"or holding code that is refused for safety): {reason}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this program (format {FORMAT_VERSION})")
    return ckpt
