"""The protocol of the inner solvers: the :class:`Solver` base class.

An inner solver is an immutable configuration called as
``solver(objective, x0, *args, batched=False) -> SolverResult``.  It never knows whether
it is being differentiated: the layers call it under ``torch.no_grad()`` with detached
arguments, and it computes the derivatives it needs itself through
:mod:`bilevel._autodiff` (which works under an outer ``no_grad``).  Where the other
pieces live: tolerances and finiteness checks in ``_checks.py``, the monitored path of
the first-order solvers in ``_tracker.py``, their lean fixed-step path in ``_lean.py``,
the compiled step in ``_compiled.py`` (docs/design.md §3).

Batched mode (``batched=True``): every leaf of ``x0`` has a leading task dimension ``B``
and ``objective(x, *args)`` returns a ``(B,)`` tensor of per-task values, task ``b``
depending only on slice ``b`` of ``x``.  Gradients are then those of the sum, which are
the per-task gradients; step sizes, convergence tests and statuses are per task.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

from .._autodiff import Objective
from .._errors import UnsupportedError
from .._result import SolverResult
from .._validate import Budgeted


@dataclasses.dataclass(frozen=True)
class Solver(abc.ABC):
    """Base class of the inner solvers (immutable, validated at construction).

    A subclass is a frozen dataclass implementing ``__call__(objective, x0, *args,
    batched=False) -> SolverResult``; ``supports_batched`` says whether it solves a batch
    of tasks at once (a layer otherwise loops over the tasks).  Any callable with that
    signature works as a layer's solver too (:class:`~bilevel.InnerSolver`); subclassing
    only adds the immutability and the batched check.

    Examples:
        >>> import dataclasses, torch
        >>> from bilevel import SolverResult, Status
        >>> from bilevel.solvers import Solver
        >>> @dataclasses.dataclass(frozen=True)
        ... class Newton1D(Solver):
        ...     steps: int = 20
        ...     def __call__(self, objective, x0, *args, batched=False):
        ...         self._check_batched(batched)
        ...         x = x0.clone()
        ...         for _ in range(self.steps):
        ...             x = x.detach().requires_grad_(True)
        ...             (g,) = torch.autograd.grad(objective(x, *args), x, create_graph=True)
        ...             (h,) = torch.autograd.grad(g.sum(), x)
        ...             x = (x - g / h).detach()
        ...         return SolverResult(x=x, status=Status.COMPLETED, iterations=self.steps)
        >>> res = Newton1D()(lambda x: (x ** 4 - 4 * x).sum(), torch.tensor([2.0]))
        >>> res.status.name, round(float(res.x), 4)                   # 4 x³ = 4
        ('COMPLETED', 1.0)
    """

    supports_batched: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        """Minimise ``objective(x, *args)`` starting from ``x0`` (a tensor tree)."""

    @property
    def traceable(self) -> bool:
        """Whether ``torch.compile`` can trace a solve into a graph: no value is read on the
        host (a fixed budget, no tolerance test); a layer then takes the traced path
        (docs/works-with.md).  ``False`` unless a solver says otherwise."""
        return False

    def _check_batched(self, batched: bool) -> None:
        if batched and not self.supports_batched:
            raise UnsupportedError(f"{type(self).__name__} does not support batched (multi-task) solves")


@dataclasses.dataclass(frozen=True)
class BudgetedSolver(Solver):
    """A first-order solver run for a fixed budget ``steps`` or to a tolerance capped by
    ``maxiter`` (docs/design.md §4; the subclass settles the two in ``__post_init__`` with
    :func:`bilevel._validate.normalise_budget`)."""

    @property
    def _steps(self: Budgeted) -> int:
        """The fixed budget (settled at construction: set whenever there is no tolerance)."""
        assert self.steps is not None
        return self.steps

    @property
    def _cap(self: Budgeted) -> int:
        """Steps the monitored path may take: the cap with a tolerance, else the budget."""
        if self.maxiter is not None:
            return self.maxiter
        assert self.steps is not None
        return self.steps
