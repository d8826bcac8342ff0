"""A solver PyTorch cannot differentiate, made differentiable: an ``ImplicitLayer`` around a
ridge-regression solve that runs in a separate process and exchanges numpy arrays.

    python -m applications.hyperopt.external

The inner problem, with one log-strength ρ_j per feature::

    w*(ρ) = argmin_w ½‖X w − y‖²/n + ½ Σ_j exp(ρ_j) w_j²

``solve`` ships ``X``, ``y`` and ``exp(ρ)`` as numpy arrays to a worker process, which
returns ``w*`` from its normal equations (``numpy.linalg.solve``) -- no autograd graph can
cross that boundary.  ``optimality`` is the gradient of the objective written in torch;
it is zero at ``w*``, and the implicit function theorem gives ``∂w*/∂ρ`` from it alone.
The script (and ``tests/applications/test_hyperopt.py``) checks the resulting gradient of
a validation loss with :func:`bilevel.testing.check_implicit_grad` against finite
differences.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any

import numpy as np
import torch

import bilevel
from bilevel.linsolve import CG
from bilevel.testing import check_implicit_grad

DT = torch.float64


def _ridge_in_numpy(x: np.ndarray, y: np.ndarray, strengths: np.ndarray) -> np.ndarray:
    """Runs in the worker process: the normal equations (XᵀX/n + diag(s)) w = Xᵀy/n."""
    n = x.shape[0]
    return np.linalg.solve(x.T @ x / n + np.diag(strengths), x.T @ y / n)


class ExternalRidge(bilevel.ImplicitLayer):
    """Ridge regression solved in another process; differentiable in ρ, X and y."""

    symmetric = True  # the optimality map is a gradient: its Jacobian is the Hessian
    positive_definite = True  # of a strictly convex objective: CG (the default would be MINRES)

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        super().__init__(CG(rtol=1e-12, maxiter=500))
        self.pool = pool

    def solve(self, w0: torch.Tensor, rho: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        arrays = (x.numpy(), y.numpy(), np.exp(rho.numpy()))
        w = self.pool.submit(_ridge_in_numpy, *arrays).result()
        return torch.from_numpy(np.ascontiguousarray(w)).to(w0.dtype)

    def optimality(self, w: torch.Tensor, rho: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.T @ (x @ w - y) / x.shape[0] + torch.exp(rho) * w


def problem(seed: int = 0, n: int = 60, d: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=DT)
    x, xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, d, generator=g, dtype=DT)
    noise = 0.5
    return {"x": x, "y": x @ w_true + noise * torch.randn(n, generator=g, dtype=DT),
            "xv": xv, "yv": xv @ w_true + noise * torch.randn(n, generator=g, dtype=DT)}


def check(pool: concurrent.futures.Executor, seed: int = 0) -> Any:
    """The gradient check of the validation loss through the external solver (a report)."""
    p = problem(seed)
    layer = ExternalRidge(pool)
    d = p["x"].shape[1]

    def validation_loss(rho: torch.Tensor) -> torch.Tensor:
        w = layer(torch.zeros(d, dtype=DT), rho, p["x"], p["y"])
        return ((p["xv"] @ w - p["yv"]) ** 2).mean()

    rho = torch.full((d,), -1.0, dtype=DT, requires_grad=True)
    # The worker's direct solve is exact to rounding: declare it tight.
    return check_implicit_grad(validation_loss, (rho,), solver_tol=1e-12, raise_exception=False)


def main() -> int:
    ctx = multiprocessing.get_context("spawn")  # a clean process: nothing of torch's state shared
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        report = check(pool)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
