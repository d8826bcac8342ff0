"""``batched="vmap"`` and ``batched="loop"`` give the same solutions, gradients (θ, λ and
per-task data) and per-task diagnostics; ``"auto"`` (= ``True``) is vmap; bad values are
refused; the loop runs solvers that have no batched mode."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel import Argmin, Proximal
from bilevel.linsolve import CG, MINRES
from bilevel.solvers import GradientDescent, ScipyMinimize

DT = torch.float64


def _problem(seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = {"w": torch.randn(4, 3, generator=g, dtype=DT), "b": torch.zeros(4, dtype=DT)}
    return theta, torch.randn(3, 12, 3, generator=g, dtype=DT), torch.randn(3, 12, 4, generator=g, dtype=DT)


def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((torch.tanh(x @ p["w"].T + p["b"]) - y) ** 2).mean()


def _grads(strategy: str, linsolve: object, damping: float = 0.0) -> tuple[list, dict, bilevel.Diagnostics]:
    theta0, xs, ys = _problem()
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    lam = {"w": torch.tensor(0.7, dtype=DT, requires_grad=True), "b": torch.tensor(1.3, dtype=DT, requires_grad=True)}
    xs = xs.clone().requires_grad_(True)
    layer = Proximal(loss, solver=GradientDescent(lr=0.3, steps=60, monitor=True), linsolve=linsolve, damping=damping,
                     on_failure="ignore")
    phi = layer(theta, xs, ys, lam=lam, batched=strategy)
    out = sum((torch.sin(phi[k]) * (1 + i)).sum() for i, k in enumerate(phi))
    grads = list(torch.autograd.grad(out, [*theta.values(), *lam.values(), xs]))
    return grads, {k: v.detach() for k, v in phi.items()}, layer.diagnostics


@pytest.mark.parametrize("linsolve", [CG(rtol=1e-12, maxiter=100), MINRES(maxiter=5)], ids=["cg-tight", "minres-5"])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_vmap_and_loop_agree(linsolve: object, damping: float) -> None:
    gv, pv, dv = _grads("vmap", linsolve, damping)
    gl, pl, dl = _grads("loop", linsolve, damping)
    for k in pv:
        torch.testing.assert_close(pl[k], pv[k], rtol=1e-10, atol=1e-12)
    for a, b in zip(gl, gv):  # θ (2 leaves), λ (2 leaves), per-task data xs
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for d in (dv, dl):
        assert d.forward.task_status is not None and len(d.forward.task_status) == 3
        assert d.forward.grad_norm.shape == (3,) and d.forward.grad_norm_initial.shape == (3,)
        assert d.backward.task_status is not None and len(d.backward.task_status) == 3
        assert d.backward.residual_norm.shape == (3,)
    assert dl.forward.task_status == dv.forward.task_status
    assert dl.backward.task_status == dv.backward.task_status
    torch.testing.assert_close(dl.backward.residual_norm, dv.backward.residual_norm, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(dl.forward.grad_norm, dv.forward.grad_norm, rtol=1e-8, atol=1e-12)


def test_auto_runs_the_strategy_it_measured_and_true_means_auto() -> None:
    """``"auto"`` (and ``True``) runs exactly the strategy it reports; which one is a timing
    on this machine (it may differ between the two calls on a loaded one)."""
    ga, _, da = _grads("auto", CG(rtol=1e-12, maxiter=100))
    gt, _, dt = _grads(True, CG(rtol=1e-12, maxiter=100))  # type: ignore[arg-type]
    assert da.strategy in ("vmap", "loop") and dt.strategy in ("vmap", "loop")
    assert da.strategy_seconds is not None and dt.strategy_seconds is not None
    want = {s: _grads(s, CG(rtol=1e-12, maxiter=100))[0] for s in {da.strategy, dt.strategy}}
    for a, b, c, d in zip(ga, gt, want[da.strategy], want[dt.strategy]):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("bad", ["chunks", "Loop", 1, None])
def test_bad_strategy_is_refused(bad: object) -> None:
    theta, xs, ys = _problem()
    with pytest.raises(ValueError, match="batched must be False, True or one of"):
        Proximal(loss, lam=1.0, solver=GradientDescent(lr=0.3, steps=2))(theta, xs, ys, batched=bad)  # type: ignore[arg-type]


def test_loop_runs_a_solver_without_batched_mode() -> None:
    """scipy has no batched mode: the loop strategy calls it once per task."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 6, 4, generator=g, dtype=DT)
    b = torch.randn(2, 6, generator=g, dtype=DT)
    theta = torch.randn(4, generator=g, dtype=DT, requires_grad=True)

    def obj(x: torch.Tensor, th: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((A @ x - b) ** 2).sum() + 0.5 * ((x - th) ** 2).sum()

    layer = Argmin(obj, solver=ScipyMinimize(method="L-BFGS-B", tol=1e-12), linsolve=CG(rtol=1e-12))
    x = layer(torch.zeros(2, 4, dtype=DT), theta, A, b, batched="loop", in_dims=(None, 0, 0))
    (g_loop,) = torch.autograd.grad(x.sum(), theta)
    want = torch.zeros(4, dtype=DT)
    for i in range(2):
        H = A[i].T @ A[i] + torch.eye(4, dtype=DT)
        want += torch.linalg.solve(H, torch.ones(4, dtype=DT))  # dx/dθ = H^{-1}, summed over tasks
    torch.testing.assert_close(g_loop, want, rtol=1e-6, atol=1e-8)
    assert len(layer.diagnostics.forward.task_status) == 2
