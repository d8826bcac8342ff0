"""The inner solve's precision policy (``solve_dtype``): half-precision unknowns are solved
as a float32 problem and returned in their own dtype (issue 22's targets: the meta-gradient
within 1e-2 of the exact one on the rounded data in bfloat16, 2e-3 in float16, on a ridge
problem with n = 12, d = 4, λ = 0.7 and the default solver); the same policy for
``FixedPoint``, checked against three times the floor of computing only the outer gradient
in half precision."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import Anderson, FixedPointIteration, GradientDescent, NewtonCG

g = torch.Generator().manual_seed(0)
X64, Y64 = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)


def _inner(phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ phi - y) ** 2).mean()


def _meta_grad(dtype: torch.dtype, **kw: object) -> tuple[torch.Tensor, bilevel.Proximal, torch.Tensor]:
    x, y = X64.to(dtype), Y64.to(dtype)
    theta = torch.zeros(4, dtype=dtype, requires_grad=True)
    layer = bilevel.Proximal(_inner, lam=0.7, **kw)  # type: ignore[arg-type]
    phi = layer(theta, x, y)
    ((x @ phi - y) ** 2).mean().backward()
    assert theta.grad is not None
    return theta.grad.double(), layer, phi


def _exact_on_rounded(dtype: torch.dtype) -> torch.Tensor:
    """The meta-gradient in float64 of the data rounded to ``dtype`` (closed form)."""
    x, y = X64.to(dtype).double(), Y64.to(dtype).double()
    n, lam = x.shape[0], 0.7
    H = 2 * x.T @ x / n
    phi = torch.linalg.solve(H + lam * torch.eye(4, dtype=torch.float64), 2 * x.T @ y / n)
    v = 2 * x.T @ (x @ phi - y) / n
    return lam * torch.linalg.solve(H + lam * torch.eye(4, dtype=torch.float64), v)


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_meta_gradient_meets_its_target(dtype: torch.dtype, bound: float) -> None:
    grad, layer, phi = _meta_grad(dtype)
    exact = _exact_on_rounded(dtype)
    assert float((grad - exact).norm() / exact.norm()) < bound
    assert phi.dtype == dtype  # returned in the unknowns' precision
    assert layer.diagnostics.solve_dtype == torch.float32
    assert layer.diagnostics.forward.success
    assert "solved in float32" in str(layer.diagnostics)


def test_without_the_policy_bfloat16_stops_at_its_own_tolerance() -> None:
    """``solve_dtype=None`` is the old behaviour: the bfloat16 solve claims success far from
    φ*, and the meta-gradient is several times worse than the target."""
    grad, layer, _ = _meta_grad(torch.bfloat16, solve_dtype=None)
    exact = _exact_on_rounded(torch.bfloat16)
    assert float((grad - exact).norm() / exact.norm()) > 3e-2
    assert layer.diagnostics.solve_dtype is None


def test_float32_and_float64_are_untouched() -> None:
    for dtype in (torch.float32, torch.float64):
        _, layer, phi = _meta_grad(dtype)
        assert layer.diagnostics.solve_dtype is None and phi.dtype == dtype


@pytest.mark.parametrize("batched", ["vmap", "loop"])
def test_batched_half_precision_is_solved_in_float32(batched: str) -> None:
    xb = torch.stack([X64, 2 * X64]).to(torch.bfloat16)
    yb = torch.stack([Y64, Y64]).to(torch.bfloat16)
    theta = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    layer = bilevel.Proximal(_inner, lam=0.7, solver=NewtonCG(), linsolve=CG())
    phi = layer(theta, xb, yb, batched=batched)
    assert phi.dtype == torch.bfloat16 and phi.shape == (2, 4)
    assert layer.diagnostics.solve_dtype == torch.float32
    ref = [bilevel.Proximal(_inner, lam=0.7)(theta, xb[b], yb[b]) for b in range(2)]
    for b in range(2):
        torch.testing.assert_close(phi[b].float(), ref[b].float(), rtol=1e-2, atol=1e-2)


def test_a_fixed_budget_solver_keeps_its_budget() -> None:
    _, layer, _ = _meta_grad(torch.float16, solver=GradientDescent(lr=0.1, steps=7))
    assert layer.diagnostics.forward.iterations == 7
    assert layer.diagnostics.forward.grad_norm is None or layer.diagnostics.forward.grad_norm.dtype == torch.float32


def test_a_bad_solve_dtype_is_refused() -> None:
    with pytest.raises(bilevel.BilevelValueError, match="solve_dtype"):
        bilevel.Proximal(_inner, lam=0.7, solve_dtype=torch.int32)  # type: ignore[arg-type]


def test_a_bad_fixed_point_solve_dtype_is_refused() -> None:
    with pytest.raises(bilevel.BilevelValueError, match="solve_dtype"):
        bilevel.FixedPoint(lambda x: x, solve_dtype="float32")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# FixedPoint: x = A x + B a, a contraction, with the outer loss ½||x||² + c·x
# --------------------------------------------------------------------------------------
_gf = torch.Generator().manual_seed(1)
_D = 8
_A = torch.randn(_D, _D, generator=_gf, dtype=torch.float64)
_A = 0.9 * _A / torch.linalg.matrix_norm(_A, 2)
_B = torch.randn(_D, _D, generator=_gf, dtype=torch.float64) / _D**0.5
_a, _c = torch.randn(_D, generator=_gf, dtype=torch.float64), torch.randn(_D, generator=_gf, dtype=torch.float64)


def _affine(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return A @ x + B @ a


def _fp_exact(dtype: torch.dtype, round_x: bool = False) -> torch.Tensor:
    """dL/da in float64 on the data rounded to ``dtype``: Bᵀ (I − A)⁻ᵀ (x* + c).  With
    ``round_x``, the floor: the outer gradient x* + c computed in ``dtype`` (x* rounded to
    it) and the result returned in ``dtype``, everything else exact."""
    A, B, a, c = (t.to(dtype).double() for t in (_A, _B, _a, _c))
    eye = torch.eye(_D, dtype=torch.float64)
    x = torch.linalg.solve(eye - A, B @ a)
    if not round_x:
        return B.T @ torch.linalg.solve((eye - A).T, x + c)
    v = (x.to(dtype) + c.to(dtype)).double()
    return (B.T @ torch.linalg.solve((eye - A).T, v)).to(dtype).double()


def _fp_grad(dtype: torch.dtype, solver: object, **kw: object) -> tuple[torch.Tensor, bilevel.FixedPoint, torch.Tensor]:
    A, B, c = (t.to(dtype) for t in (_A, _B, _c))
    a = _a.to(dtype).clone().requires_grad_(True)
    layer = bilevel.FixedPoint(_affine, solver=solver, **kw)  # type: ignore[arg-type]
    x = layer(torch.zeros(_D, dtype=dtype), A, B, a)
    (0.5 * (x * x).sum() + (c * x).sum()).backward()
    assert a.grad is not None
    return a.grad.double(), layer, x


def _rel(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g - ref).norm() / ref.norm())


@pytest.mark.parametrize("solver", [FixedPointIteration(), Anderson()], ids=["iteration", "anderson"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fixed_point_is_iterated_in_float32(dtype: torch.dtype, solver: object) -> None:
    exact = _fp_exact(dtype)
    floor = _rel(_fp_exact(dtype, round_x=True), exact)
    grad, layer, x = _fp_grad(dtype, solver)
    assert _rel(grad, exact) < 3 * floor
    assert x.dtype == dtype and layer.diagnostics.solve_dtype == torch.float32
    assert layer.diagnostics.forward.success
    # Without the policy the half-precision iteration stops at its own tolerance, beyond that bound.
    grad_none, layer_none, _ = _fp_grad(dtype, solver, solve_dtype=None, on_failure="ignore")
    assert _rel(grad_none, exact) > 3 * floor and layer_none.diagnostics.solve_dtype is None


def test_batched_half_precision_fixed_point_is_iterated_in_float32() -> None:
    A, B = _A.to(torch.bfloat16), _B.to(torch.bfloat16)
    a = torch.stack([_a, -2 * _a]).to(torch.bfloat16)
    layer = bilevel.FixedPoint(_affine, solver=Anderson())
    x = layer(torch.zeros(2, _D, dtype=torch.bfloat16), A, B, a, batched=True, in_dims=(None, None, 0))
    assert x.dtype == torch.bfloat16 and layer.diagnostics.solve_dtype == torch.float32
    for b in range(2):
        single = bilevel.FixedPoint(_affine, solver=Anderson())(torch.zeros(_D, dtype=torch.bfloat16), A, B, a[b])
        torch.testing.assert_close(x[b], single, rtol=0, atol=0)


def test_float32_fixed_point_is_untouched() -> None:
    _, layer, x = _fp_grad(torch.float32, FixedPointIteration())
    assert layer.diagnostics.solve_dtype is None and x.dtype == torch.float32
