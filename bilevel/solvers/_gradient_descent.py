"""Gradient descent with optional (Nesterov) momentum."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch

from .._result import SolverResult
from .._tree import tree_axpy, tree_detach, tree_dtype, tree_where, tree_zeros_like
from ._base import GradientTracker, Objective, Solver, check_int, check_real, check_tol


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
        st = GradientTracker.start(objective, x, args, self.tol, name, batched)
        vel = tree_zeros_like(st.g) if self.momentum > 0 else None

        for k in range(1, self.steps + 1):
            if st.all_converged():  # with a tolerance: one host sync per step (the test); none without
                break
            active = st.active
            g = st.g
            if vel is not None:
                new_vel = tree_axpy(self.momentum, vel, g)
                vel = tree_where(active, new_vel, vel)
                upd = tree_axpy(self.momentum, vel, g) if self.nesterov else vel
            else:
                upd = g
            # Converged tasks take a zero step: they stay exactly where they converged.
            lr = torch.where(active, torch.full_like(st.gnorm, self.lr), torch.zeros_like(st.gnorm))
            x = tree_axpy(-lr, upd, x, batched)
            st.advance(objective, x, args, active, k, name, batched)

        return st.result(x, batched, name)
