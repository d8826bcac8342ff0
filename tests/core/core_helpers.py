"""Reference solvers for the core tests, independent of bilevel.solvers.

They follow the solver protocol ``solver(objective, x0, *args, batched=False)`` but are
deliberately simple (dense Newton, plain gradient descent), so that a core test does not
depend on the production solvers it is not about.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel import SolverResult, Status
from bilevel._tree import tree_map, tree_ravel, tree_unravel


class DenseNewton:
    """Newton's method with the dense Hessian of the raveled unknowns (small problems)."""

    def __init__(self, steps: int = 30, tol: float = 1e-13) -> None:
        self.steps = steps
        self.tol = tol

    def __call__(self, objective: Any, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        flat0 = tree_ravel(x0, batched)

        def f(flat: torch.Tensor) -> torch.Tensor:
            return objective(tree_unravel(x0, flat, batched), *args).sum()

        flat = flat0.clone()
        for k in range(self.steps):
            g = torch.func.grad(f)(flat)
            if float(g.norm()) <= self.tol:
                return SolverResult(x=tree_unravel(x0, flat, batched), status=Status.SUCCESS, iterations=k)
            if batched:
                B, n = flat.shape
                H = torch.func.hessian(f)(flat).reshape(B * n, B * n)
                flat = flat - torch.linalg.solve(H, g.reshape(-1)).reshape(B, n)
            else:
                H = torch.func.hessian(f)(flat)
                flat = flat - torch.linalg.solve(H, g)
        return SolverResult(x=tree_unravel(x0, flat, batched), status=Status.MAX_ITERATIONS, iterations=self.steps)


class PlainGD:
    """Fixed-step gradient descent (used to count inner steps)."""

    def __init__(self, lr: float, steps: int) -> None:
        self.lr = lr
        self.steps = steps

    def __call__(self, objective: Any, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        x = x0
        for _ in range(self.steps):
            g = torch.func.grad(lambda y: objective(y, *args).sum())(x)
            x = tree_map(lambda a, b: a - self.lr * b, x, g)
        return SolverResult(x=x, status=Status.COMPLETED, iterations=self.steps)
