"""Common protocol of the inner solvers and the AD helpers they share.

An inner solver is an immutable configuration called as
``solver(objective, x0, *args, batched=False) -> SolverResult``.  It never knows whether
it is being differentiated: the layers call it under ``torch.no_grad()`` with detached
arguments, and it computes the derivatives it needs itself with :mod:`torch.func`
(whose transforms ignore an outer ``no_grad``).

Batched mode (``batched=True``): every leaf of ``x0`` has a leading task dimension ``B``
and ``objective(x, *args)`` returns a ``(B,)`` tensor of per-task values, task ``b``
depending only on slice ``b`` of ``x``.  Gradients are then those of the sum, which are
the per-task gradients; step sizes, convergence tests and statuses are per task.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .._result import NonFiniteError, SolverResult

Objective = Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class Solver(abc.ABC):
    """Base class of the inner solvers (immutable, validated at construction)."""

    supports_batched: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        """Minimise ``objective(x, *args)`` starting from ``x0`` (a tensor tree)."""

    def _check_batched(self, batched: bool) -> None:
        if batched and not self.supports_batched:
            raise NotImplementedError(f"{type(self).__name__} does not support batched (multi-task) solves")


def _total(objective: Objective, batched: bool) -> Callable[..., Tensor]:
    """Scalar function whose gradient is the (per-task) gradient of ``objective``."""

    def f(x: Any, *args: Any) -> Tensor:
        v = objective(x, *args)
        if not isinstance(v, Tensor):
            raise TypeError(f"the objective must return a tensor, got {type(v).__name__}")
        if batched:
            if v.dim() != 1:
                raise ValueError(f"in batched mode the objective must return a (B,) tensor, got shape {tuple(v.shape)}")
            return v.sum(), v
        if v.dim() != 0:
            raise ValueError(f"the objective must return a scalar (0-d) tensor, got shape {tuple(v.shape)}")
        return v, v

    return f


def value_and_grad(objective: Objective, x: Any, args: tuple, batched: bool = False) -> tuple[Tensor, Any]:
    """Objective value(s) and gradient tree at ``x`` (works under an outer ``no_grad``)."""
    g, (_, v) = torch.func.grad_and_value(_total(objective, batched), has_aux=True)(x, *args)
    return v.detach(), _detach(g)


def value(objective: Objective, x: Any, args: tuple, batched: bool = False) -> Tensor:
    """Objective value(s) without a gradient."""
    with torch.no_grad():
        return _total(objective, batched)(x, *args)[1].detach()


def hvp(objective: Objective, x: Any, v: Any, args: tuple, batched: bool = False) -> Any:
    """Hessian-vector product, forward-over-reverse (block-diagonal over tasks when batched)."""

    def g(y: Any) -> Any:
        return torch.func.grad(lambda z: _total(objective, batched)(z, *args)[0])(y)

    _, hv = torch.func.jvp(g, (x,), (v,))
    return _detach(hv)


def _detach(t: Any) -> Any:
    if isinstance(t, Tensor):
        return t.detach()
    if isinstance(t, dict):
        return {k: _detach(v) for k, v in t.items()}
    if isinstance(t, (tuple, list)):
        return type(t)(_detach(v) for v in t)
    return t


def check_finite_value(v: Tensor, iteration: int, solver: str) -> None:
    """Raise :class:`NonFiniteError` naming the iteration (and tasks) if ``v`` is not finite."""
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        where = ""
        if v.dim() == 1:
            where = f" for task(s) {bad.nonzero().reshape(-1).tolist()}"
        raise NonFiniteError(f"{solver}: the objective value became non-finite at iteration {iteration}{where}")
