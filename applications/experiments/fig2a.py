"""Figure 2a of the iMAML paper: accuracy of the meta-gradient against inner steps and compute.

Rajeswaran, Finn, Kakade & Levine, *Meta-Learning with Implicit Gradients*, NeurIPS 2019,
Section 4 and Figure 2a: on a problem whose exact meta-gradient (Definition 1) is known,
compare the meta-gradients that MAML and iMAML compute with it, as a function of the
number of inner gradient steps K and of the compute spent.

Set-up (a synthetic few-shot regression family, float64 throughout):

* A task is linear regression with ``d`` features (default 50): support data
  ``X ∈ R^{n×d}``, ``y = X w_t + σ ε`` with ``n`` (default 25) < ``d`` examples, so the
  support Hessian ``H = XᵀX/n`` is rank deficient, as in few-shot learning; query data
  ``(X_q, y_q)`` (default 100 examples) from the same ``w_t``.  Features, task weights
  ``w_t`` and the meta-parameters ``θ`` (one θ shared by the tasks, the point at which
  the meta-gradients are evaluated) are standard normal; ``σ = 0.1``.
* Inner problem (the paper's proximal objective, Eq. 4)::

      φ*(θ) = argmin_φ  G(φ) = L̂(φ) + ½ λ ‖φ − θ‖²,     L̂(φ) = ½ ‖Xφ − y‖² / n

  with λ = 1 by default (``--lam``).  Closed form: ``φ* = (H + λI)⁻¹ (Xᵀy/n + λθ)``.
  The proximal term is what makes φ* depend on θ, for the implicit gradient to see.
* Outer (query) loss ``ℓ_q(φ) = ½ ‖X_q φ − y_q‖² / n_q``.  Exact meta-gradient
  (Definition 1 and Lemma 1 of the paper)::

      g* = d ℓ_q(φ*(θ)) / dθ = λ (H + λI)⁻¹ ∇ℓ_q(φ*) = (I + H/λ)⁻¹ ∇ℓ_q(φ*)

  computed with a dense ``torch.linalg.solve``.
* The inner solver of every method is the same K steps of gradient descent on ``G``
  started at θ, with step size ``1/(L + λ)`` (``L`` the largest eigenvalue of the support
  Hessians of the tasks; stable for the quadratic ``G``) unless ``--lr`` fixes it.  K runs
  over a log grid of about two points per doubling from 1 to ``--max-steps`` (default 200).
* Methods:

  - **MAML**: reverse-mode differentiation through the K unrolled GD steps (the
    proximal term included, so this is the unrolled gradient of the same inner problem);
  - **FOMAML**: the first-order approximation ``∇ℓ_q(φ_K)`` (``dφ_K/dθ`` taken as I),
    the paper's third method, as a reference;
  - **iMAML**: :class:`bilevel.Proximal` with ``GradientDescent(lr, steps=K)`` as the
    black-box inner solver and ``CG(rtol, maxiter=n)`` in the backward -- a cap of n = 2, 5,
    20 (``--cg-steps``) conjugate-gradient steps on ``(H + λI) u = ∇ℓ_q(φ_K)``, which
    ends the solve before the float64 default tolerance in practice.

  The three are the shared computations of :mod:`applications.meta_gradients` (the
  few-shot application trains with the same code); the functions here only give them
  this problem's losses and a θ per task, so that each task's meta-gradient is its own.

* Error: ``‖g − g*‖ / ‖g*‖`` per task, mean and standard deviation over ``--tasks``
  (default 10) random tasks drawn from ``--seed``.

Cost model (the x-axis of the second panel), in gradient-equivalents per task:

* forward: K gradients of ``G`` (every method);
* MAML backward: one Hessian-vector product per unrolled step, about 2 gradients each
  (a reverse pass through a gradient costs about twice a gradient): total ``3K``;
* iMAML backward: n CG steps, one Hessian-vector product (≈ 2 gradients) each:
  total ``K + 2n`` (the final ``λu`` is free);
* FOMAML backward: nothing more: total ``K``.

The one gradient of the query loss that every method needs is left out.

Run::

    python -m applications.experiments.fig2a [--out DIR] [--tasks N] [--dim D] [--lam L] [--max-steps K]

It writes ``fig2a.csv`` (one row per method × K) and ``fig2a.png`` (two log-log panels)
to ``applications/experiments/results/`` by default and prints a compact table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

import bilevel
from applications import meta_gradients
from applications.cliargs import OneLineParser, output_dir
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent
from bilevel.tree import tree_relative_error

DTYPE = torch.float64
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = ("method", "cg_steps", "inner_steps", "rel_error", "rel_error_std", "compute")
HVP_COST = 2  # gradient-equivalents per Hessian-vector product (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Tasks:
    """A batch of B regression tasks and the meta-parameters θ shared by all of them.

    Attributes:
        x_support: ``(B, n, d)`` support features.
        y_support: ``(B, n)`` support targets.
        x_query: ``(B, n_q, d)`` query features.
        y_query: ``(B, n_q)`` query targets.
        theta: ``(d,)`` meta-parameters (the initial point and proximal centre of every task).
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor
    theta: Tensor

    def __len__(self) -> int:
        return self.x_support.shape[0]


@dataclasses.dataclass(frozen=True)
class Row:
    """One point of the figure: a method at one number of inner steps, averaged over tasks."""

    method: str
    cg_steps: int
    inner_steps: int
    rel_error: float
    rel_error_std: float
    compute: int


def make_tasks(
    n_tasks: int = 10,
    dim: int = 50,
    n_support: int = 25,
    n_query: int = 100,
    noise: float = 0.1,
    seed: int = 0,
) -> Tasks:
    """Draw random linear-regression tasks (seeded, float64).

    Args:
        n_tasks: number of tasks B.
        dim: number of features d.
        n_support: support examples per task; ``< dim`` makes ``H`` rank deficient.
        n_query: query examples per task.
        noise: standard deviation σ of the label noise.
        seed: seed of a private generator (the global RNG is left alone).

    Returns:
        The tasks, each with its own data and true weights, and one θ.
    """
    if n_tasks < 1 or dim < 1 or n_support < 1 or n_query < 1:
        raise ValueError("n_tasks, dim, n_support and n_query must be >= 1")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    theta = randn(dim)
    w = randn(n_tasks, dim, 1)
    xs, xq = randn(n_tasks, n_support, dim), randn(n_tasks, n_query, dim)
    ys = (xs @ w).squeeze(-1) + noise * randn(n_tasks, n_support)
    yq = (xq @ w).squeeze(-1) + noise * randn(n_tasks, n_query)
    return Tasks(xs, ys, xq, yq, theta)


def support_loss(phi: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Inner loss of one task, ``L̂(φ) = ½ ‖Xφ − y‖² / n`` (``φ: (d,)``, ``x: (n, d)``)."""
    return 0.5 * ((x @ phi - y) ** 2).sum() / x.shape[0]


def _query_objective(tasks: Tasks) -> Callable[[Tensor], Tensor]:
    """``φ ↦ Σ_b ℓ_q,b(φ_b)`` (``φ: (B, d)``): separable by task, so its gradient with respect
    to row b of a per-task θ is task b's own meta-gradient."""
    return lambda phi: torch.vmap(support_loss)(phi, tasks.x_query, tasks.y_query).sum()


def _query_grad(phi: Tensor, tasks: Tasks) -> Tensor:
    """``∇ℓ_q(φ_b)`` for every task, ``(B, d)`` (closed form, for the exact meta-gradient)."""
    xq = tasks.x_query
    r = torch.einsum("bnd,bd->bn", xq, phi) - tasks.y_query
    return torch.einsum("bnd,bn->bd", xq, r) / xq.shape[1]


def _system(tasks: Tasks, lam: float) -> tuple[Tensor, Tensor]:
    """``(H_b + λI, H_b)`` for every task, ``(B, d, d)`` each."""
    x = tasks.x_support
    h = x.mT @ x / x.shape[1]
    return h + lam * torch.eye(x.shape[2], dtype=x.dtype), h


def default_lr(tasks: Tasks, lam: float) -> float:
    """Inner step size ``1/(L + λ)``, ``L`` the largest eigenvalue of the support Hessians.

    One step size for the whole meta-batch, as in practice.  ``G`` is a quadratic with
    Hessian ``H + λI``, so this step is stable and contracts the error by
    ``1 − (μ + λ)/(L + λ)`` per step (μ: the smallest eigenvalue that the error excites;
    in the null space of ``H`` the start θ is already optimal).
    """
    _, h = _system(tasks, lam)
    return 1.0 / (float(torch.linalg.eigvalsh(h).max()) + lam)


def exact_solution(tasks: Tasks, lam: float) -> Tensor:
    """``φ*_b = (H_b + λI)⁻¹ (X_bᵀy_b/n + λθ)`` by a dense solve, ``(B, d)``."""
    x, y = tasks.x_support, tasks.y_support
    a, _ = _system(tasks, lam)
    rhs = torch.einsum("bnd,bn->bd", x, y) / x.shape[1] + lam * tasks.theta
    return torch.linalg.solve(a, rhs)


def exact_meta_gradient(tasks: Tasks, lam: float) -> Tensor:
    """The exact meta-gradient ``λ (H + λI)⁻¹ ∇ℓ_q(φ*)`` of every task (paper, Definition 1, Lemma 1).

    Args:
        tasks: the tasks and θ.
        lam: proximal weight λ > 0.

    Returns:
        ``d ℓ_q(φ*_b(θ)) / dθ`` for every task b, shape ``(B, d)``.
    """
    a, _ = _system(tasks, lam)
    # H + λI is symmetric, so the transpose that the chain rule asks for is not needed.
    return lam * torch.linalg.solve(a, _query_grad(exact_solution(tasks, lam), tasks))


def maml_meta_gradient(tasks: Tasks, lam: float, lr: float, steps: int) -> Tensor:
    """MAML: reverse-mode differentiation through ``steps`` unrolled GD steps on ``G``.

    The graph of every step is kept, so memory grows with ``steps`` and the backward costs
    one Hessian-vector product per step (:func:`applications.meta_gradients.maml_meta_gradient`
    with one copy of θ per task).

    Args:
        tasks: the tasks and θ.
        lam: proximal weight λ.
        lr: inner step size.
        steps: number of inner steps K (>= 0).

    Returns:
        ``d ℓ_q(φ_K,b(θ)) / dθ`` for every task, ``(B, d)``.
    """
    return meta_gradients.maml_meta_gradient(
        support_loss, _query_objective(tasks), _per_task_theta(tasks), (tasks.x_support, tasks.y_support),
        lr=lr, steps=steps, lam=lam, theta_batched=True,
    ).grads


def fomaml_meta_gradient(tasks: Tasks, lam: float, lr: float, steps: int) -> Tensor:
    """First-order MAML: ``∇ℓ_q(φ_K)``, the Jacobian ``dφ_K/dθ`` replaced by the identity."""
    return meta_gradients.fomaml_meta_gradient(
        support_loss, _query_objective(tasks), _per_task_theta(tasks), (tasks.x_support, tasks.y_support),
        lr=lr, steps=steps, lam=lam, theta_batched=True,
    ).grads


def _per_task_theta(tasks: Tasks) -> Tensor:
    # One copy of θ per task: the computation is separable by task, so the gradient of the
    # summed query loss with respect to row b is task b's own meta-gradient.
    return meta_gradients.requiring_grad(tasks.theta.expand(len(tasks), -1))


def imaml_meta_gradient(
    tasks: Tasks,
    lam: float,
    lr: float,
    steps: int,
    cg_steps: int,
    cg_tol: float | None = None,
    on_failure: str = "ignore",
) -> Tensor:
    """iMAML: :class:`bilevel.Proximal` with K GD steps forward and n CG steps backward.

    The forward runs ``GradientDescent(lr, steps=K)`` from θ under no grad; the backward
    solves ``(H_b + λI) u = ∇ℓ_q(φ_K,b)`` with ``CG(rtol=cg_tol, maxiter=cg_steps)`` and
    returns ``λu`` (paper, Algorithm 2 and Eq. 7).  The K steps are a fixed budget and the
    n CG steps a cap that ends the solve in practice, so failures to converge are ignored
    by default: measuring what the budgets cost is the point of the figure.

    The layer shares θ between the tasks of a batched call and returns the sum of their
    meta-gradients; the figure needs them per task, so each task is one call of
    :func:`applications.meta_gradients.imaml_meta_gradient`.

    Args:
        tasks: the tasks and θ.
        lam: proximal weight λ.
        lr: inner step size.
        steps: number of inner GD steps K.
        cg_steps: CG iteration cap n.
        cg_tol: CG relative tolerance (``None``: the float64 default).
        on_failure: passed to :class:`bilevel.Proximal` (``"raise"`` to demand convergence).

    Returns:
        The implicit meta-gradient with respect to θ of every task, ``(B, d)``.
    """
    layer = bilevel.Proximal(
        support_loss,
        lam=lam,
        solver=GradientDescent(lr=lr, steps=steps),
        linsolve=CG(rtol=cg_tol, maxiter=cg_steps),
        on_failure=on_failure,
        # Reverse-over-reverse products reuse one gradient graph for all n CG steps: cheaper
        # in eager PyTorch than forward-over-reverse (see benchmarks/), and the same numbers.
        hvp="reverse",
    )

    def task_meta_gradient(b: int) -> Tensor:
        def query_loss(phi: Tensor) -> Tensor:
            return support_loss(phi, tasks.x_query[b], tasks.y_query[b])

        return meta_gradients.imaml_meta_gradient(
            layer, query_loss, meta_gradients.requiring_grad(tasks.theta), (tasks.x_support[b], tasks.y_support[b]),
            batched=False,
        ).grads

    return torch.stack([task_meta_gradient(b) for b in range(len(tasks))])


def step_grid(max_steps: int, per_octave: int = 2) -> list[int]:
    """Log grid of inner-step counts from 1 to ``max_steps``, about ``per_octave`` per doubling.

    ``step_grid(200)`` is ``[1, 2, 3, 4, 6, 8, 12, 17, 24, 34, 49, 69, 99, 140, 200]``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    n = round(per_octave * math.log2(max_steps))
    return sorted({round(max_steps ** (i / n)) for i in range(n + 1)} if n else {1})


def run(
    tasks: Tasks,
    lam: float = 1.0,
    steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
    cg_steps: Sequence[int] = (2, 5, 20),
    lr: float | None = None,
) -> list[Row]:
    """Relative meta-gradient errors of every method at every K, averaged over tasks.

    Args:
        tasks: tasks from :func:`make_tasks`.
        lam: proximal weight λ.
        steps: the numbers of inner steps K.
        cg_steps: the CG budgets n of the iMAML curves.
        lr: inner step size; ``None`` picks :func:`default_lr`.

    Returns:
        Rows ordered by method (MAML, FOMAML, iMAML by n) and then by K.
    """
    exact = exact_meta_gradient(tasks, lam)
    step = default_lr(tasks, lam) if lr is None else lr

    def row(method: str, n: int, k: int, g: Tensor, compute: int) -> Row:
        err = tree_relative_error(g, exact, batched=True)
        std = float(err.std()) if len(err) > 1 else 0.0
        return Row(method, n, k, float(err.mean()), std, compute)

    rows = [row("MAML", 0, k, maml_meta_gradient(tasks, lam, step, k), k + HVP_COST * k) for k in steps]
    rows += [row("FOMAML", 0, k, fomaml_meta_gradient(tasks, lam, step, k), k) for k in steps]
    for n in cg_steps:
        rows += [row("iMAML", n, k, imaml_meta_gradient(tasks, lam, step, k, n), k + HVP_COST * n) for k in steps]
    return rows


def label(row: Row) -> str:
    """Curve name: ``MAML``, ``FOMAML`` or ``iMAML (n CG)``."""
    return f"iMAML ({row.cg_steps} CG)" if row.method == "iMAML" else row.method


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per method × K with the columns :data:`CSV_COLUMNS`."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r.method, r.cg_steps, r.inner_steps, f"{r.rel_error:.6e}", f"{r.rel_error_std:.6e}", r.compute])


def format_table(rows: Sequence[Row]) -> str:
    """Mean relative errors: one line per K, one column per curve."""
    curves = list(dict.fromkeys(label(r) for r in rows))
    ks = sorted({r.inner_steps for r in rows})
    cell = {(label(r), r.inner_steps): r.rel_error for r in rows}
    width = max(12, *(len(c) + 2 for c in curves))
    lines = ["K".rjust(5) + "".join(c.rjust(width) for c in curves)]
    for k in ks:
        lines.append(f"{k:5d}" + "".join(f"{cell[(c, k)]:.2e}".rjust(width) for c in curves))
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Two log-log panels: error against inner steps K, and against compute.

    Drawn on a bare :class:`matplotlib.figure.Figure`, which renders PNG with the Agg
    backend, not through pyplot: no display needed and no global backend state touched.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    curves: dict[str, list[Row]] = {}
    for r in rows:
        curves.setdefault(label(r), []).append(r)
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    imaml = [c for c in curves if c.startswith("iMAML")]
    for name, rs in curves.items():
        style: dict[str, object]
        if name == "MAML":
            style = {"color": "k", "marker": "o", "ls": "-"}
        elif name == "FOMAML":
            style = {"color": "0.5", "marker": "s", "ls": ":"}
        else:
            style = {"color": cmap(0.15 + 0.7 * imaml.index(name) / max(1, len(imaml) - 1)), "marker": "^", "ls": "-"}
        # Keep log axes finite should an error be exactly 0 (float64 rounding is ~1e-16).
        err = [max(r.rel_error, 1e-17) for r in rs]
        for ax, xs in zip(axes, ([r.inner_steps for r in rs], [r.compute for r in rs])):
            ax.loglog(xs, err, ms=4, label=name, **style)
    axes[0].set_xlabel("inner gradient steps K")
    axes[1].set_xlabel("compute (gradient-equivalents per task)")
    for ax in axes:
        ax.set_ylabel("relative error ‖g − g*‖ / ‖g*‖")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, format="png")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m applications.experiments.fig2a",
        description="iMAML paper, Figure 2a: meta-gradient accuracy of MAML, FOMAML and iMAML "
        "against inner steps and compute, on synthetic linear regression with a closed-form meta-gradient.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--tasks", type=int, default=10, help="random tasks to average over (default: %(default)s)")
    p.add_argument("--dim", type=int, default=50, help="features d (default: %(default)s)")
    p.add_argument("--support", type=int, default=25, help="support examples n (default: %(default)s)")
    p.add_argument("--query", type=int, default=100, help="query examples (default: %(default)s)")
    p.add_argument("--lam", type=float, default=1.0, help="proximal weight λ (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=200, help="largest K of the log grid (default: %(default)s)")
    p.add_argument("--cg-steps", type=int, nargs="+", default=[2, 5, 20], help="CG budgets of iMAML (default: 2 5 20)")
    p.add_argument(
        "--lr", type=float, default=None,
        help="inner step size (default: 1/(L+λ), L the largest eigenvalue of the support Hessians)",
    )
    p.add_argument("--noise", type=float, default=0.1, help="label noise σ (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment, write ``fig2a.csv`` and ``fig2a.png``, print the table.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status, 0 on success.
    """
    p = _parser()
    args = p.parse_args(argv)
    if args.lam <= 0 or not math.isfinite(args.lam):
        p.error("--lam must be finite and > 0")
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be > 0")
    if args.max_steps < 1 or args.tasks < 1 or args.dim < 1 or args.support < 1 or args.query < 1:
        p.error("--max-steps, --tasks, --dim, --support and --query must be >= 1")
    if any(n < 1 for n in args.cg_steps):
        p.error("--cg-steps must be >= 1")
    if not (args.noise >= 0 and math.isfinite(args.noise)):
        p.error("--noise must be a finite number >= 0")
    output_dir(p, args.out)  # before the run: a bad --out fails in one line, not after the work

    # Tiny matrices: extra threads only add synchronisation (and slow down sharply when the
    # cores are shared); restore the caller's setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        tasks = make_tasks(args.tasks, args.dim, args.support, args.query, args.noise, args.seed)
        rows = run(tasks, args.lam, step_grid(args.max_steps), args.cg_steps, args.lr)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    csv_path, png_path = args.out / "fig2a.csv", args.out / "fig2a.png"
    write_csv(rows, csv_path)
    setting = (
        f"d={args.dim}, n_support={args.support}, n_query={args.query}, λ={args.lam:g}, "
        f"lr={'1/(L+λ)' if args.lr is None else f'{args.lr:g}'}, {args.tasks} tasks"
    )
    plot(rows, png_path, title=f"meta-gradient accuracy ({setting})")

    print(f"Figure 2a (iMAML paper): mean relative meta-gradient error ‖g − g*‖/‖g*‖; {setting}")
    print(format_table(rows))
    print(f"compute per task: MAML 3K, FOMAML K, iMAML K + 2n  ({elapsed:.1f} s)")
    print(f"wrote {csv_path}")
    print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
