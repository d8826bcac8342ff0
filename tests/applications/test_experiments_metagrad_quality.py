"""Tests of the meta-gradient quality tool against dense closed forms on a quadratic.

Inner loss ``L̂(φ) = ½ φᵀHφ + cᵀφ`` (φ a dict of two tensors, flattened in key order),
outer loss ``ℓ(φ) = wᵀφ + ½‖φ‖²``, so ``v = ∇ℓ(φ) = w + φ``.

* implicit (exact):  λ (H + λI)^{-1} v           (Rajeswaran et al. 2019, Eq. 6)
* implicit, damped:  λ (H + (λ + δ)I)^{-1} v
* unrolled K GD steps on L̂ + ½λ‖φ − θ‖² from θ: φ_{k+1} = M φ_k + lr(λθ − c) with
  M = I − lr(H + λI), so dφ_K/dθ = M^K + lr λ Σ_{j<K} M^j (symmetric), and the
  meta-gradient is that matrix times v(φ_K).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import bilevel
from applications import meta_gradients
from applications.experiments import metagrad_quality as mq
from bilevel.linsolve import CG, MINRES
from bilevel.tree import tree_cosine, tree_ravel, tree_relative_error, tree_unravel

DT = torch.float64
SHAPES = {"a": (3,), "b": (2, 2)}
DIM = 7


def _sym(eigs: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=DT))
    return q @ torch.diag(torch.tensor(eigs, dtype=DT)) @ q.T


def _problem(eigs: list[float], seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    H = _sym(eigs, seed)
    c = torch.randn(DIM, generator=g, dtype=DT)
    w = torch.randn(DIM, generator=g, dtype=DT)
    theta_flat = torch.randn(DIM, generator=g, dtype=DT)
    theta = tree_unravel({k: torch.empty(s, dtype=DT) for k, s in SHAPES.items()}, theta_flat)

    def inner(phi):
        x = tree_ravel(phi)
        return 0.5 * x @ (H @ x) + c @ x

    def outer(phi):
        x = tree_ravel(phi)
        return w @ x + 0.5 * x @ x

    return H, c, w, theta, inner, outer


def _v(phi, w):
    return w + tree_ravel(phi)


# A well-posed problem (H + λI positive definite for λ = 1.5) and an indefinite one.
PD_EIGS = [-1.0, -0.3, 0.2, 0.5, 1.0, 2.0, 3.0]
LAM = 1.5


@pytest.mark.parametrize("linsolve", [CG(rtol=1e-13, maxiter=100), MINRES(rtol=1e-13, maxiter=100)], ids=["cg", "minres"])
def test_implicit_matches_dense_formula(linsolve):
    H, _, w, theta, inner, outer = _problem(PD_EIGS)
    phi = {k: v + 0.1 for k, v in theta.items()}  # any point: H is constant on a quadratic
    r = mq.implicit_meta_gradient(inner, outer, theta, LAM, linsolve, phi=phi)
    expected = LAM * torch.linalg.solve(H + LAM * torch.eye(DIM, dtype=DT), _v(phi, w))
    torch.testing.assert_close(tree_ravel(r.grad), expected, rtol=1e-9, atol=1e-11)
    assert r.relative_residual < 1e-10
    assert r.status is bilevel.Status.SUCCESS


def test_implicit_indefinite_minres_and_damping():
    # λ = 0.5 < 1 = −λ_min(H): H + λI is indefinite; MINRES still solves the system exactly.
    H, _, w, theta, inner, outer = _problem(PD_EIGS, seed=3)
    phi = {k: 0.5 * v for k, v in theta.items()}
    lam, delta = 0.5, 1.0
    eye = torch.eye(DIM, dtype=DT)
    exact = mq.implicit_meta_gradient(inner, outer, theta, lam, MINRES(rtol=1e-13, maxiter=200), phi=phi)
    torch.testing.assert_close(tree_ravel(exact.grad), lam * torch.linalg.solve(H + lam * eye, _v(phi, w)), rtol=1e-8, atol=1e-10)
    damped = mq.implicit_meta_gradient(inner, outer, theta, lam, CG(rtol=1e-13, maxiter=100), phi=phi, damping=delta)
    torch.testing.assert_close(
        tree_ravel(damped.grad), lam * torch.linalg.solve(H + (lam + delta) * eye, _v(phi, w)), rtol=1e-9, atol=1e-11
    )


def test_implicit_needs_exactly_one_of_phi_or_solver():
    _, _, _, theta, inner, outer = _problem(PD_EIGS)
    with pytest.raises(ValueError, match="exactly one"):
        mq.implicit_meta_gradient(inner, outer, theta, LAM, CG())


def _dense_unrolled(H, c, w, theta, lam, lr, steps):
    eye = torch.eye(DIM, dtype=DT)
    M = eye - lr * (H + lam * eye)
    th = tree_ravel(theta)
    x = th.clone()
    J = eye.clone()  # dφ_0/dθ
    for _ in range(steps):
        x = M @ x + lr * (lam * th - c)
        J = M @ J + lr * lam * eye
    return J.T @ (w + x), x, M


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_unrolled_matches_dense_derivative(steps):
    H, c, w, theta, inner, outer = _problem(PD_EIGS, seed=1)
    lr = 0.2
    expected, x_K, M = _dense_unrolled(H, c, w, theta, LAM, lr, steps)
    got = mq.unrolled_meta_gradient(inner, outer, theta, LAM, lr=lr, steps=steps)
    torch.testing.assert_close(tree_ravel(got), expected, rtol=1e-10, atol=1e-12)
    # The closed form M^K + λ(H + λI)^{-1}(I − M^K) of the same Jacobian.
    eye = torch.eye(DIM, dtype=DT)
    MK = torch.linalg.matrix_power(M, steps)
    J = MK + LAM * torch.linalg.solve(H + LAM * eye, eye - MK)
    torch.testing.assert_close(J @ (w + x_K), expected, rtol=1e-10, atol=1e-12)
    # The iterates are those of the library's GradientDescent inside Proximal.
    phi = meta_gradients.gd_steps(inner, theta, lr=lr, steps=steps, lam=LAM)
    layer_phi = bilevel.Proximal(inner, lam=LAM, solver=bilevel.solvers.GradientDescent(lr=lr, steps=steps))(theta)
    torch.testing.assert_close(tree_ravel(phi), x_K, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tree_ravel(layer_phi), x_K, rtol=1e-12, atol=1e-12)


def test_unrolled_tends_to_implicit():
    H, c, w, theta, inner, outer = _problem(PD_EIGS, seed=2)
    lr = 0.2  # lr (λ_max + λ) = 0.9 < 2: GD converges, at rate max |1 − lr(h + λ)| = 0.9
    errs = []
    for steps in (2, 10, 40, 300):
        unrolled = mq.unrolled_meta_gradient(inner, outer, theta, LAM, lr=lr, steps=steps)
        phi = meta_gradients.gd_steps(inner, theta, lr=lr, steps=steps, lam=LAM)
        implicit = mq.implicit_meta_gradient(inner, outer, theta, LAM, MINRES(rtol=1e-13, maxiter=100), phi=phi)
        errs.append(float(tree_relative_error(unrolled, implicit.grad)))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-8


def test_implicit_with_gd_solver_runs_the_forward():
    H, c, w, theta, inner, outer = _problem(PD_EIGS, seed=4)
    gd = bilevel.solvers.GradientDescent(lr=0.2, steps=300)
    r = mq.implicit_meta_gradient(inner, outer, theta, LAM, CG(rtol=1e-13, maxiter=100), solver=gd)
    eye = torch.eye(DIM, dtype=DT)
    phi_star = torch.linalg.solve(H + LAM * eye, LAM * tree_ravel(theta) - c)
    torch.testing.assert_close(tree_ravel(r.phi), phi_star, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(tree_ravel(r.grad), LAM * torch.linalg.solve(H + LAM * eye, w + phi_star), rtol=1e-9, atol=1e-10)


def test_hessian_extremes_match_eigvalsh():
    # The tool's curvature estimate is bilevel.hessian_extremes (Lanczos on Hessian-vector products).
    A = _sym([-3.0, -1.0, -0.5, 0.0, 0.1, 0.7, 1.0, 2.0, 5.0, 9.0, 9.5, 12.0], seed=5)
    exact = torch.linalg.eigvalsh(A)

    def quadratic(x):
        return 0.5 * x @ (A @ x)

    x0 = torch.zeros(A.shape[0], dtype=DT)
    lo, hi = (float(e) for e in bilevel.hessian_extremes(quadratic, x0, steps=A.shape[0]))
    assert math.isclose(lo, float(exact[0]), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(hi, float(exact[-1]), rel_tol=1e-9, abs_tol=1e-9)
    # Fewer steps: Ritz values lie inside the spectrum.
    lo6, hi6 = (float(e) for e in bilevel.hessian_extremes(quadratic, x0, steps=6))
    assert float(exact[0]) - 1e-9 <= lo6 and hi6 <= float(exact[-1]) + 1e-9


def test_hessian_of_the_tree_objective_is_h():
    # The tool's Hessian-vector products are those of bilevel.hessian_extremes on the loss of a
    # parameter dict: the dense Hessian of the dict objective is H, and its extremes are H's.
    H, _, _, theta, inner, _ = _problem(PD_EIGS, seed=6)
    dense = torch.func.hessian(lambda v: inner(tree_unravel(theta, v)))(tree_ravel(theta))
    torch.testing.assert_close(dense, H, rtol=1e-12, atol=1e-12)
    lo, hi = (float(e) for e in bilevel.hessian_extremes(inner, theta, steps=DIM))
    assert math.isclose(lo, min(PD_EIGS), abs_tol=1e-9) and math.isclose(hi, max(PD_EIGS), abs_tol=1e-9)


def test_cosine_and_relative_error():
    # The tool compares meta-gradients with bilevel.tree's cosine and relative error.
    a = {"x": torch.tensor([1.0, 0.0], dtype=DT)}
    b = {"x": torch.tensor([1.0, 1.0], dtype=DT)}
    assert math.isclose(float(tree_cosine(a, b)), 1 / math.sqrt(2))
    assert math.isclose(float(tree_relative_error(a, b)), 1 / math.sqrt(2))
    assert math.isnan(float(tree_cosine(a, {"x": torch.zeros(2, dtype=DT)})))


def _omniglot_root() -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    for p in (Path("/work/shared/data/omniglot"), repo.parent / "shared" / "data" / "omniglot"):
        if p.is_dir():
            return p
    return None


def test_main_writes_csv_and_png(tmp_path, capsys):
    root = _omniglot_root()
    if root is None:
        pytest.skip("Omniglot data not found at /work/shared/data/omniglot or ../shared/data/omniglot (relative to the repo)")
    rc = mq.main(
        [
            "--data-root", str(root), "--filters", "8", "--tasks", "1", "--krylov", "1,2", "--lams", "0.5",
            "--dampings", "0,1", "--linsolves", "cg,minres", "--inner-steps", "2", "--tight-maxiter", "40",
            "--lanczos", "8", "--out", str(tmp_path),
        ]
    )
    assert rc == 0
    csv_path, png_path = tmp_path / "metagrad_quality_init.csv", tmp_path / "metagrad_quality_init.png"
    assert png_path.stat().st_size > 1000
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 * 2 * 2 * 2  # λ × δ × linsolve × n
    for row in rows:
        for key in ("cos_tight_mean", "cos_unrolled_min", "relerr_tight_max", "hess_min_min", "gd_stability_max"):
            assert math.isfinite(float(row[key])), (key, row)
        assert -1.0 - 1e-9 <= float(row["cos_tight_mean"]) <= 1.0 + 1e-9
    assert "cos vs tight" in capsys.readouterr().out
