"""Compiled steps of the lean fixed-step loops (``GradientDescent``/``Adam(compile=...)``).

A fixed-step inner loop (iMAML's 16 gradient steps) is a chain of small kernels -- the
objective's forward and backward, then an update per leaf -- whose cost on a GPU is the
launch of each kernel and on a CPU the Python and dispatcher overhead around it.
``torch.compile`` fuses one step (gradient by ``torch.func.grad_and_value``, the update,
the running sum of values for the finiteness check) into one compiled function;
``mode="reduce-overhead"`` additionally replays it as a CUDA graph on a GPU.

The compiled step is cached per objective function (weakly: it goes when the objective
does) and per solver configuration, so that a layer called again with the same objective
reuses it instead of recompiling; the layers keep their objective wrappers stable across
calls for this reason.  Measured on the CPU (``benchmarks/small_problem.py``).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from .._autodiff import Objective
from .._autodiff import total as _total
from .._errors import BilevelValueError
from .._tree import tree_flatten

#: objective -> {key: compiled step}.  Keyed weakly: a compiled step lives as long as its objective.
_CACHE: weakref.WeakKeyDictionary[Callable[..., Any], dict[Hashable, Callable[..., Any]]] = weakref.WeakKeyDictionary()

#: The values ``compile=`` accepts besides ``True``/``False``: ``torch.compile``'s modes.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compiled_step(
    objective: Objective,
    key: Hashable,
    batched: bool,
    mode: bool | str,
    make: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Callable[..., Any]:
    """The compiled step for ``objective`` and ``key`` (a solver's configuration), built once.

    Args:
        objective: the objective the step differentiates (the cache key, weakly held).
        key: what else the step depends on (the solver's configuration).
        batched: the objective returns per-task values (its gradient is that of their sum).
        mode: ``True`` (torch.compile's default mode) or one of :data:`MODES`.
        make: ``make(value_and_grad) -> step``, the Python step to compile, given the
            function ``(x, *args) -> (values, gradient tree)`` of the objective.
    """
    try:
        per_objective = _CACHE.setdefault(objective, {})
    except TypeError:  # not weak-referenceable (e.g. a builtin): no cache, compile per call
        per_objective = {}
    fn = per_objective.get((key, batched))
    if fn is None:
        total = _total(objective, batched)

        def value_and_grad(x: Any, *args: Any) -> tuple[torch.Tensor, Any]:
            g, (_, v) = torch.func.grad_and_value(total, has_aux=True)(x, *args)
            return v, g

        with _hide_torch_jit_deprecation():  # torch.compile imports inductor here
            compiled = torch.compile(make(value_and_grad), mode=mode if isinstance(mode, str) else None, dynamic=False)
        fn = _quiet_first_call(compiled)
        per_objective[(key, batched)] = fn
    return fn


def check_compile(owner: str, compile: Any, tolerance: bool) -> None:
    """``compile`` is a bool or a torch.compile mode, and only for the fixed-step loop
    (``monitor`` is allowed: its health statistics are computed inside the compiled step)."""
    if not (isinstance(compile, bool) or compile in MODES):
        raise BilevelValueError(f"{owner}: compile must be a bool or one of {MODES}, got {compile!r}")
    if compile and tolerance:
        raise BilevelValueError(
            f"{owner}: compile applies to the lean fixed-step loop (steps=, no rtol/atol): a tolerance reads the gradient "
            "norm on the host at every step"
        )


def value_sum_start(x: Any, batched: bool) -> torch.Tensor:
    """The zero that the running sum of objective values starts from: ``()`` or ``(B,)``,
    so that every compiled step sees the same input shapes (no recompilation)."""
    leaf = tree_flatten(x)[0][0]
    return torch.zeros(leaf.shape[:1] if batched else (), dtype=leaf.dtype, device=leaf.device)


@contextlib.contextmanager
def _hide_torch_jit_deprecation() -> Iterator[None]:
    """Hide torch's own ``torch.jit`` DeprecationWarning, which torch 2.13's compile stack
    emits (importing inductor, compiling) and which a user running with ``-W error`` would
    otherwise get from our option -- it is not about their code or ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script(_method)?`? is deprecated", category=DeprecationWarning)
        yield


def _quiet_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose first call (the compilation) runs under :func:`_hide_torch_jit_deprecation`;
    later calls go straight through."""
    done = False

    def call(*args: Any) -> Any:
        nonlocal done
        if done:
            return fn(*args)
        with _hide_torch_jit_deprecation():
            out = fn(*args)
        done = True
        return out

    return call
