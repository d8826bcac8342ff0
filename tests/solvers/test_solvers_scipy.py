"""ScipyMinimize: derivative-free and derivative-based methods, result mapping."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from bilevel import Status
from bilevel.solvers import SCIPY_METHODS, ScipyMinimize
from tests.problems import (
    LAM,
    logistic_dict,
    logistic_problem,
    logistic_reference,
    logistic_torch,
)

C = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
W = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)


def _smooth3(x: torch.Tensor) -> torch.Tensor:
    # Strictly convex, minimiser exactly C (closed form), not a pure quadratic.
    z = x - C
    return (W * z**2).sum() + (z**4).sum() + 0.5 * z[0] * z[1]


@pytest.mark.parametrize(
    "method, options",
    [
        ("Nelder-Mead", {"xatol": 1e-9, "fatol": 1e-14, "maxiter": 5000}),
        ("Powell", {"xtol": 1e-10, "ftol": 1e-14}),
    ],
)
def test_derivative_free_methods(method: str, options: dict) -> None:
    x0 = torch.zeros(3, dtype=torch.float64)
    calls = {"n": 0}

    def counted(x):
        calls["n"] += 1
        return _smooth3(x)

    res = ScipyMinimize(method, options=options)(counted, x0)
    assert res.status is Status.SUCCESS
    assert isinstance(res.raw, scipy.optimize.OptimizeResult)
    np.testing.assert_array_equal(res.x.numpy(), res.raw.x)
    # Derivative-free: no gradients or HVPs were computed, every evaluation was counted.
    assert res.n_grad == 0 and res.n_hvp == 0
    assert res.n_fun == calls["n"] == res.raw.nfev
    assert res.iterations == res.raw.nit > 0
    assert res.grad_norm is None
    # Looser than the gradient-based methods: simplex/direction-set methods stop on step sizes.
    assert float((res.x - C).abs().max()) < 1e-6
    assert float(res.value) == pytest.approx(float(_smooth3(res.x)), abs=1e-15)


def test_derivative_free_accepts_black_box_objective() -> None:
    # The objective leaves torch (NumPy in between): autograd cannot differentiate it, and a
    # derivative-free method never asks it to.
    cn, wn = C.numpy(), W.numpy()

    def black_box(x):
        z = x.detach().numpy() - cn
        return torch.tensor(float((wn * z**2).sum() + (z**4).sum() + 0.5 * z[0] * z[1]), dtype=x.dtype)

    solver = ScipyMinimize("Powell", options={"xtol": 1e-10, "ftol": 1e-14})
    res = solver(black_box, torch.zeros(3, dtype=torch.float64))
    assert res.status is Status.SUCCESS and res.n_grad == 0
    assert float((res.x - C).abs().max()) < 1e-6
    with pytest.raises(RuntimeError):  # the same objective cannot go through a gradient method
        ScipyMinimize("BFGS")(black_box, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "method, options, uses_hvp",
    [
        ("L-BFGS-B", {"gtol": 1e-11, "ftol": 0.0}, False),
        ("BFGS", {"gtol": 1e-10}, False),
        ("Newton-CG", {"xtol": 1e-14}, True),
        # The trust-region methods report "bad approximation" failures below ~1e-10 (their
        # model reduction is lost in rounding), so they get gtol 1e-9; trust-krylov's trlib
        # emits a RuntimeWarning (NaN in its own arithmetic) at 1e-9, so 1e-8.
        ("trust-ncg", {"gtol": 1e-9}, True),
        ("trust-krylov", {"gtol": 1e-8}, True),
        ("trust-exact", {"gtol": 1e-9}, True),
        ("trust-constr", {"gtol": 1e-9, "xtol": 1e-14}, True),
    ],
)
def test_gradient_based_methods_tight(method: str, options: dict, uses_hvp: bool) -> None:
    a, y = logistic_problem()
    ref = torch.tensor(logistic_reference())
    res = ScipyMinimize(method, options=options)(logistic_torch, torch.zeros(5, dtype=torch.float64), a, y)
    assert res.status is Status.SUCCESS, res.message
    assert res.raw.success and res.raw.x.shape == (5,)
    assert res.n_grad >= 1
    assert (res.n_hvp > 0) == uses_hvp
    # Every evaluation scipy requested went through our wrapper exactly once.  (scipy's
    # nhev counts differently per method -- operator builds, not products -- so n_hvp is
    # only checked to be positive for the methods that use second derivatives.)
    assert res.n_fun == res.raw.nfev
    x = res.x
    assert x.dtype == torch.float64 and x.shape == (5,)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logistic_torch(xg, a, y), xg)
    if res.grad_norm is not None:  # scipy's own final gradient, mapped through
        assert float(res.grad_norm) == pytest.approx(float(g.norm()), rel=1e-6, abs=1e-14)
    # Strong convexity (Hessian >= LAM I): ||x - x*|| <= ||g|| / LAM, plus the reference's error.
    err = float((x - ref).norm())
    assert err <= float(g.norm()) / LAM + 1e-10 / LAM
    assert err < 1e-7


def test_dict_tree_and_float32_round_trip() -> None:
    a, y = logistic_problem(torch.float32)
    x0 = {"w": torch.zeros(5, dtype=torch.float32), "b": torch.zeros((), dtype=torch.float32)}
    res = ScipyMinimize("L-BFGS-B")(logistic_dict, x0, a, y)
    assert res.status is Status.SUCCESS
    assert isinstance(res.x, dict) and res.x["w"].dtype == torch.float32 and res.x["b"].shape == ()
    ref = torch.tensor(logistic_reference(with_bias=True), dtype=torch.float32)
    # L-BFGS-B's default pgtol is 1e-5: ||x - x*|| <= 1e-5 / LAM plus float32 rounding.
    assert float((torch.cat([res.x["w"], res.x["b"].reshape(1)]) - ref).norm()) < 1e-3
    assert res.value.dtype == torch.float32


def test_failure_maps_to_external_failure() -> None:
    a, y = logistic_problem()
    res = ScipyMinimize("BFGS", options={"maxiter": 1})(logistic_torch, torch.zeros(5, dtype=torch.float64), a, y)
    assert res.status is Status.EXTERNAL_FAILURE and not res.raw.success
    assert "BFGS" in res.message


def test_nonfinite_result_maps_to_nonfinite() -> None:
    # NaN everywhere: Nelder-Mead can only return a NaN value.
    solver = ScipyMinimize("Nelder-Mead", options={"maxiter": 20})
    res = solver(lambda x: (x * torch.nan).sum(), torch.zeros(2, dtype=torch.float64))
    assert res.status is Status.NONFINITE


def test_method_names() -> None:
    assert ScipyMinimize("l-bfgs-b").method == "l-bfgs-b"  # scipy matches case-insensitively
    assert "Nelder-Mead" in SCIPY_METHODS and "trust-constr" in SCIPY_METHODS
    with pytest.raises(ValueError, match="unknown method"):
        ScipyMinimize("LBFGS")
