"""Tests of ``applications.experiments.fig2a`` (iMAML paper, Figure 2a).

The references are independent of the code under test: autograd through a dense
closed-form φ*(θ), central finite differences, and the closed form of the Jacobian of K
unrolled gradient-descent steps on a quadratic.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import Tensor

from applications.experiments import fig2a
from applications.experiments.fig2a import (
    Tasks,
    default_lr,
    exact_meta_gradient,
    fomaml_meta_gradient,
    imaml_meta_gradient,
    main,
    make_tasks,
    maml_meta_gradient,
    run,
    step_grid,
)
from bilevel.tree import tree_relative_error


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny matrices: one thread is faster (much faster on shared cores); restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(g: Tensor, ref: Tensor) -> Tensor:
    """Per-task relative error ‖g − ref‖ / ‖ref‖ (rows of a ``(B, d)`` g are tasks)."""
    return tree_relative_error(g, ref, batched=g.dim() == 2)


def _closed_form_query_loss(theta: Tensor, tasks: Tasks, b: int, lam: float) -> Tensor:
    """ℓ_q(φ*(θ)) for task b with φ* from a dense solve: differentiable in θ by autograd."""
    x, y = tasks.x_support[b], tasks.y_support[b]
    n, d = x.shape
    phi = torch.linalg.solve(x.T @ x / n + lam * torch.eye(d, dtype=x.dtype), x.T @ y / n + lam * theta)
    xq, yq = tasks.x_query[b], tasks.y_query[b]
    return 0.5 * ((xq @ phi - yq) ** 2).sum() / xq.shape[0]


@pytest.mark.parametrize("lam", [0.3, 1.0, 3.0])
def test_exact_meta_gradient_matches_autograd_and_finite_differences(lam: float) -> None:
    tasks = make_tasks(n_tasks=3, dim=8, n_support=5, n_query=12, seed=3)
    g = exact_meta_gradient(tasks, lam)
    assert g.shape == (3, 8) and g.dtype == torch.float64
    for b in range(3):
        theta = tasks.theta.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(_closed_form_query_loss(theta, tasks, b, lam), theta)
        assert float(_rel(g[b], ref)) < 1e-10
        # Central differences are exact for a quadratic up to rounding (~eps·|ℓ|/h).
        h = 1e-5
        eye = torch.eye(8, dtype=torch.float64)
        fd = torch.stack(
            [
                (_closed_form_query_loss(tasks.theta + h * e, tasks, b, lam)
                 - _closed_form_query_loss(tasks.theta - h * e, tasks, b, lam)) / (2 * h)
                for e in eye
            ]
        )
        assert float(_rel(g[b], fd)) < 1e-8


def test_maml_matches_closed_form_of_the_unrolled_jacobian() -> None:
    # K GD steps on G from θ: φ_K − φ* = E^K (θ − φ*), E = I − αA, A = H + λI, so
    # dφ_K/dθ = E^K + (I − E^K) λA⁻¹ (symmetric), and the MAML gradient is that times ∇ℓ_q(φ_K).
    tasks = make_tasks(n_tasks=2, dim=10, n_support=6, n_query=15, seed=4)
    lam, k = 0.7, 9
    lr = default_lr(tasks, lam)
    g = maml_meta_gradient(tasks, lam, lr, k)
    for b in range(2):
        x, y = tasks.x_support[b], tasks.y_support[b]
        n, d = x.shape
        eye = torch.eye(d, dtype=torch.float64)
        a = x.T @ x / n + lam * eye
        phi_star = torch.linalg.solve(a, x.T @ y / n + lam * tasks.theta)
        ek = torch.linalg.matrix_power(eye - lr * a, k)
        phi_k = phi_star + ek @ (tasks.theta - phi_star)
        xq, yq = tasks.x_query[b], tasks.y_query[b]
        grad_q = xq.T @ (xq @ phi_k - yq) / xq.shape[0]
        jac = ek + (eye - ek) @ (lam * torch.linalg.inv(a))
        assert float(_rel(g[b], jac.T @ grad_q)) < 1e-10
        # FOMAML replaces the Jacobian by the identity.
        assert float(_rel(fomaml_meta_gradient(tasks, lam, lr, k)[b], grad_q)) < 1e-10


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_imaml_converged_matches_exact(lam: float) -> None:
    tasks = make_tasks(n_tasks=3, dim=20, n_support=10, n_query=30, seed=5)
    lr = default_lr(tasks, lam)
    exact = exact_meta_gradient(tasks, lam)
    # Converged inner solve and CG solved to a tight tolerance (on_failure="raise": it must converge).
    g = imaml_meta_gradient(tasks, lam, lr, steps=500, cg_steps=100, cg_tol=1e-13, on_failure="raise")
    assert g.shape == exact.shape
    assert float(_rel(g, exact).max()) < 1e-8
    # The unrolled gradient converges to the same limit.
    assert float(_rel(maml_meta_gradient(tasks, lam, lr, 500), exact).max()) < 1e-8


def test_error_trends_are_the_papers() -> None:
    tasks = make_tasks(n_tasks=5, seed=1)  # the default d = 50, n_support = 25: H rank deficient
    ks = (1, 2, 4, 8, 16, 32, 64)
    rows = run(tasks, lam=1.0, steps=ks, cg_steps=(2, 20))
    err = {(r.method, r.cg_steps, r.inner_steps): r.rel_error for r in rows}
    maml = [err[("MAML", 0, k)] for k in ks]
    assert all(later < earlier for earlier, later in zip(maml, maml[1:])), maml
    for k in (16, 32, 64):
        assert err[("iMAML", 20, k)] < err[("MAML", 0, k)], k
    # A 2-step CG solve and the first-order approximation are biased: more inner steps do
    # not remove their error, unlike MAML's.
    assert err[("iMAML", 2, 64)] > 100 * err[("MAML", 0, 64)]
    assert err[("FOMAML", 0, 64)] > 100 * err[("MAML", 0, 64)]
    # The cost model of the second panel.
    compute = {(r.method, r.cg_steps, r.inner_steps): r.compute for r in rows}
    assert compute[("MAML", 0, 8)] == 24 and compute[("iMAML", 20, 8)] == 48 and compute[("FOMAML", 0, 8)] == 8
    assert all(r.rel_error_std >= 0 for r in rows)


def test_step_grid() -> None:
    assert step_grid(1) == [1]
    grid = step_grid(200)
    assert grid[0] == 1 and grid[-1] == 200
    assert all(a < b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError):
        step_grid(0)


def test_main_writes_csv_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    argv = ["--tasks", "2", "--dim", "10", "--support", "5", "--query", "20", "--max-steps", "8",
            "--cg-steps", "2", "5", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    csv_path, png_path = tmp_path / "fig2a.csv", tmp_path / "fig2a.png"
    assert f"wrote {csv_path}" in out and f"wrote {png_path}" in out
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == fig2a.CSV_COLUMNS
    # MAML, FOMAML and iMAML with 2 and 5 CG steps, at every K of the grid.
    assert len(rows) == 4 * len(step_grid(8))
    curves = {(r["method"], r["cg_steps"]) for r in rows}
    assert curves == {("MAML", "0"), ("FOMAML", "0"), ("iMAML", "2"), ("iMAML", "5")}
    assert all(float(r["rel_error"]) >= 0 for r in rows)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--lam", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--cg-steps", "0", "--out", str(tmp_path)])
