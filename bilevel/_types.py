"""The vocabulary of the public API as types: modes as ``Literal``s, components as ``Protocol``s.

A layer accepts any object that satisfies :class:`InnerSolver` (forward) and
:class:`LinearSolverLike` (backward), not only the library's own classes: a scipy
wrapper, an external program, a hand-written loop.  The backward never looks inside
either; it reads only the returned solution and, if present, the status fields of
:class:`~bilevel.SolverResult` / :class:`~bilevel.LinearSolveResult`.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, Union, runtime_checkable

import torch

#: What a layer does when a forward or backward solve does not converge.
OnFailure = Literal["warn", "raise", "ignore"]
#: How symmetric Jacobian-vector products are computed in the backward.
HvpMode = Literal["forward", "reverse"]
#: The precision of the backward: ``"auto"`` (float32 for half-precision inputs), ``None``
#: (the inputs' dtype) or a floating ``torch.dtype``.
BackwardDtype = Union[Literal["auto"], None, "torch.dtype"]
#: How a batch of tasks runs: ``False`` (one task), ``True``/``"auto"``, ``"vmap"`` or ``"loop"``.
Batched = Union[bool, Literal["auto", "vmap", "loop"]]


@runtime_checkable
class InnerSolver(Protocol):
    """``solver(objective, x0, *args, batched=False) -> SolverResult | tree``.

    Called under ``torch.no_grad()`` with detached arguments; it may be
    non-differentiable or run outside PyTorch.  A solver that cannot solve a batch of
    tasks at once may say so with a class attribute ``supports_batched = False``: a layer
    called with ``batched=True`` (``"auto"``) then runs it task by task (the ``"loop"``
    strategy); ``batched="vmap"`` calls it with ``batched=True`` regardless.
    """

    def __call__(self, objective: Any, x0: Any, *args: Any, batched: bool = ...) -> Any: ...


@runtime_checkable
class LinearSolverLike(Protocol):
    """``solver(matvec, b, x0=None, *, batched=False) -> LinearSolveResult`` on tensor trees."""

    def __call__(self, matvec: Any, b: Any, x0: Any = ..., *, batched: bool = ...) -> Any: ...


__all__ = ["BackwardDtype", "Batched", "HvpMode", "InnerSolver", "LinearSolverLike", "OnFailure"]
