"""One problem, every inner solver: iterations, evaluations and meta-gradient agreement.

The promise of implicit differentiation is that the meta-gradient depends on the inner
solution only, not on the algorithm that found it.  This script solves one proximal
problem (iMAML's inner problem on L2-logistic regression, float64)

    φ*(θ) = argmin_φ  mean log(1 + exp(−y · Xφ)) + λ/2 ‖φ − θ‖²

with each solver in :mod:`bilevel.solvers` inside the same :class:`bilevel.Proximal`
layer (CG backward), and prints, per solver, its status, iterations, objective / gradient
/ Hessian-vector-product evaluations, the final inner gradient norm, and the relative
difference of its meta-gradient ∂ℓ_val/∂θ from the one obtained with a tight Newton-CG
solve.

    python -m benchmarks.solver_comparison [--dim 5] [--n 80] [--lam 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import LBFGS, Adam, GradientDescent, NewtonCG, ScipyMinimize
from bilevel.tree import tree_relative_error


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=5)
    p.add_argument("--n", type=int, default=80)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dt = torch.float64
    g = torch.Generator().manual_seed(a.seed)
    X = torch.randn(a.n, a.dim, generator=g, dtype=dt)
    w_true = torch.randn(a.dim, generator=g, dtype=dt)
    y = torch.where(X @ w_true + 0.5 * torch.randn(a.n, generator=g, dtype=dt) > 0, 1.0, -1.0).to(dt)
    Xv = torch.randn(a.n, a.dim, generator=g, dtype=dt)
    yv = torch.where(Xv @ w_true > 0, 1.0, -1.0).to(dt)
    theta0 = 0.3 * torch.randn(a.dim, generator=g, dtype=dt)

    def inner(phi: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-y * (X @ phi)).mean()

    def meta_grad(solver: object) -> tuple[torch.Tensor, bilevel.SolverResult]:
        layer = bilevel.Proximal(inner, a.lam, solver=solver, linsolve=CG(rtol=1e-13), on_failure="ignore")
        theta = theta0.clone().requires_grad_(True)
        phi = layer(theta, X, y)
        (gt,) = torch.autograd.grad(inner(phi, Xv, yv), theta)
        return gt, layer.diagnostics.forward  # type: ignore[return-value]

    # Curvature bound of the objective for a safe GD step: L = λ + ||X||²/(4n).
    L = a.lam + float(torch.linalg.matrix_norm(X, 2) ** 2) / (4 * a.n)
    solvers = {
        "NewtonCG(rtol=1e-12)  [reference]": NewtonCG(rtol=1e-12),
        "GradientDescent(1/L, rtol=1e-9)": GradientDescent(lr=1.0 / L, maxiter=20000, rtol=1e-9),
        "GradientDescent(Nesterov, rtol=1e-9)": GradientDescent(lr=1.0 / L, maxiter=20000, momentum=0.9, nesterov=True, rtol=1e-9),
        "Adam(lr=0.02, rtol=1e-9)": Adam(lr=0.02, maxiter=20000, rtol=1e-9),
        "LBFGS()": LBFGS(),
        "NewtonCG()": NewtonCG(),
        "ScipyMinimize('L-BFGS-B')": ScipyMinimize("L-BFGS-B", tol=1e-12),
        "ScipyMinimize('Newton-CG')": ScipyMinimize("Newton-CG", tol=1e-12),
        "ScipyMinimize('Nelder-Mead')": ScipyMinimize(
            "Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000, "maxfev": 40000}
        ),
        "ScipyMinimize('Powell')": ScipyMinimize("Powell", options={"xtol": 1e-10, "ftol": 1e-14}),
    }
    rows = []
    ref: torch.Tensor | None = None
    for name, solver in solvers.items():
        gt, res = meta_grad(solver)
        if ref is None:
            ref = gt
        rel = float(tree_relative_error(gt, ref))
        rows.append(
            {
                "solver": name,
                "status": res.status.name,
                "iterations": res.iterations,
                "n_fun": res.n_fun,
                "n_grad": res.n_grad,
                "n_hvp": res.n_hvp,
                "grad_norm": float(res.grad_norm) if res.grad_norm is not None else float("nan"),
                "rel_diff": rel,
            }
        )
    print(f"Proximal L2-logistic regression, n={a.n}, d={a.dim}, λ={a.lam}, float64; backward CG(rtol=1e-13)")
    print(f"reference meta-gradient (NewtonCG tight): {[round(v, 6) for v in ref.tolist()]}")  # type: ignore[union-attr]
    hdr = f"{'solver':38s} {'status':10s} {'iters':>6s} {'n_fun':>6s} {'n_grad':>6s} {'n_hvp':>6s} {'|grad|':>9s} {'rel. diff of meta-grad':>22s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['solver']:38s} {r['status']:10s} {r['iterations']:6d} {r['n_fun']:6d} {r['n_grad']:6d} {r['n_hvp']:6d} "
            f"{r['grad_norm']:9.1e} {r['rel_diff']:22.2e}"
        )
    return rows


if __name__ == "__main__":
    main()
