"""Gradient descent with optional (Nesterov) momentum."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch

from .._result import SolverResult, Status
from .._tree import tree_axpy, tree_detach, tree_dtype, tree_norm, tree_where, tree_zeros_like
from ._base import Objective, Solver, check_finite_value, value_and_grad
from ._linesearch import check_int, check_real, check_tol, check_finite_grad, finish_result, status_codes


@dataclasses.dataclass(frozen=True)
class GradientDescent(Solver):
    """Fixed-step gradient descent, the inner solver of first-order (i)MAML.

    Update (the PyTorch ``SGD`` convention for momentum ``mu``)::

        v <- mu * v + g;   x <- x - lr * (g + mu * v if nesterov else v)

    With ``tol=None`` it takes exactly ``steps`` steps and reports ``COMPLETED``.  With a
    tolerance it stops as soon as ``||g|| <= tol * max(1, ||g0||)`` (``g0``: the gradient
    at ``x0``) and reports ``SUCCESS``, or ``MAX_ITERATIONS`` after ``steps`` steps.  In
    batched mode that test is per task and a converged task stops moving (its momentum is
    frozen too), so each task follows exactly the iterates of its own unbatched solve.

    The gradient is evaluated once per step plus once at the returned point (so
    ``grad_norm`` and ``value`` describe the returned ``x``): ``n_fun = n_grad = steps + 1``
    for a full run.  A NaN/Inf objective value or gradient raises
    :class:`~bilevel.NonFiniteError` naming the iteration.

    Args:
        lr: step size (> 0).
        steps: maximum number of steps (>= 0; 0 returns ``x0``).
        momentum: heavy-ball coefficient in [0, 1).
        nesterov: use Nesterov's look-ahead form (needs ``momentum > 0``).
        tol: optional tolerance in (0, 1) on the gradient norm (see above).
    """

    lr: float
    steps: int
    momentum: float = 0.0
    nesterov: bool = False
    tol: Optional[float] = None

    supports_batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_real(name, "lr", self.lr, 0.0)
        check_int(name, "steps", self.steps, 0)
        check_real(name, "momentum", self.momentum, 0.0, 1.0, lo_open=False)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"{name}: nesterov must be a bool, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError(f"{name}: nesterov=True needs momentum > 0")
        check_tol(name, self.tol)

    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        tree_dtype(x0)  # validates the tree (raises on a non-tensor leaf or an empty tree)
        x = tree_detach(x0)
        f, g = value_and_grad(objective, x, args, batched)
        n_eval = 1
        check_finite_value(f, 0, name)
        gnorm = tree_norm(g, batched)
        check_finite_grad(gnorm, 0, name)
        use_tol = self.tol is not None
        thresh = (self.tol if use_tol else 0.0) * torch.clamp(gnorm, min=1.0)
        converged = (gnorm <= thresh) if use_tol else torch.zeros_like(gnorm, dtype=torch.bool)
        iters = torch.zeros(gnorm.shape, dtype=torch.long, device=gnorm.device)
        vel = tree_zeros_like(g) if self.momentum > 0 else None

        for k in range(1, self.steps + 1):
            if use_tol and not bool((~converged).any()):  # one host sync per step (the test)
                break
            active = ~converged
            if vel is not None:
                new_vel = tree_axpy(self.momentum, vel, g)
                vel = tree_where(active, new_vel, vel)
                upd = tree_axpy(self.momentum, vel, g) if self.nesterov else vel
            else:
                upd = g
            # Converged tasks take a zero step: they stay exactly where they converged.
            lr = torch.where(active, torch.full_like(gnorm, self.lr), torch.zeros_like(gnorm))
            x = tree_axpy(-lr, upd, x, batched)
            iters = iters + active.long()
            f_new, g_new = value_and_grad(objective, x, args, batched)
            n_eval += 1
            check_finite_value(f_new, k, name)
            f = torch.where(active, f_new, f)
            g = tree_where(active, g_new, g)
            gnorm = torch.where(active, tree_norm(g_new, batched), gnorm)
            check_finite_grad(gnorm, k, name)
            if use_tol:
                converged = converged | (active & (gnorm <= thresh))

        default = Status.MAX_ITERATIONS if use_tol else Status.COMPLETED
        codes = status_codes(gnorm.shape, gnorm.device, default, SUCCESS=converged)
        return finish_result(x, codes, iters, gnorm, f, batched, n_fun=n_eval, n_grad=n_eval)
