"""How good is iMAML's implicit meta-gradient?  A measurement tool.

iMAML (Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients",
NeurIPS 2019) adapts per task by solving the proximal problem

    φ*(θ) = argmin_φ  L̂_support(φ) + ½ λ ‖φ − θ‖²

and replaces back-propagation through the inner loop by the implicit gradient (their
Eq. 6) ``g = (I + H/λ)^{-1} ∇L_query(φ*) = λ (H + λI)^{-1} v`` with ``H = ∇²L̂(φ*)``,
computed by a few conjugate-gradient steps.  That formula is only the derivative of the
algorithm that is actually run when (a) the inner solve converged to φ* and (b) ``H + λI``
is positive definite (otherwise CG is invalid and even the exact solution of the linear
system is a gradient of a saddle point, not of a minimiser).  With batch norm on batch
statistics — MAML's and iMAML's conv nets — the support loss is invariant to the scale
of the conv weights, which puts negative curvature into ``H``, so (b) is a question of
λ, not a given.

For the meta-parameters θ of a checkpoint, or of a seeded fresh initialisation, and a
few Omniglot training episodes, this tool computes per task and per λ (all in float64,
so that what it measures is the mathematics, not float32 rounding):

* φ from :class:`bilevel.Proximal` with :class:`bilevel.solvers.GradientDescent`
  (``K`` steps of size ``lr`` on the proximal objective from θ: the application's
  iMAML-GD inner procedure);
* the implicit meta-gradient ``g_n`` for each Krylov budget ``n``, each linear solver
  (CG, MINRES) and each damping δ (the layer's ``damping=``: it solves
  ``(H + λI + δI) u = v`` and returns ``λu``);
* reference "tight": the exact implicit gradient at that φ (undamped MINRES with a large
  budget; its relative residual says whether it was reached);
* reference "unrolled": the true derivative of the K-step GD procedure (reverse mode
  through the unrolled steps with :mod:`torch.func`), i.e. what MAML would compute on
  the proximal objective;
* the extreme eigenvalues of ``H`` at φ (:func:`bilevel.hessian_extremes`: Lanczos on
  Hessian-vector products):
  ``λ_min(H) + λ > 0`` is the condition for the exact implicit gradient to be well
  posed and for CG to be valid; ``lr (λ_max(H) + λ) > 2`` means inner GD is unstable;
  ``‖∇inner(φ)‖ / ‖∇inner(θ)‖`` says whether the inner solve converged at all.

The meta-gradients are those of :mod:`applications.meta_gradients`, the code the
application trains with (the unrolled reference is its MAML on the proximal objective).

Outputs: a CSV with one row per (λ, δ, linsolve, n) averaged over the tasks (cosine and
relative error to both references, mean and worst case, and the per-λ curvature and
convergence columns), a per-task CSV (``*_tasks.csv``), a PNG (cosine against Krylov
steps, one panel per λ) and a short table on stdout.

Run::

    python -m applications.experiments.metagrad_quality --data-root ../shared/data/omniglot
    python -m applications.experiments.metagrad_quality --data-root DIR --checkpoint runs/x/checkpoint.pt
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

import bilevel
from applications import meta_gradients
from applications.cliargs import OneLineParser, nonneg_int, output_dir, positive_float, positive_int
from bilevel import Status
from bilevel.linsolve import CG, MINRES
from bilevel.tree import tree_cosine, tree_detach, tree_norm, tree_relative_error

__all__ = [
    "ImplicitGradient",
    "TaskRecord",
    "aggregate",
    "implicit_meta_gradient",
    "main",
    "unrolled_meta_gradient",
]

Params = dict[str, Tensor]
Loss = Callable[..., Tensor]

LINSOLVERS: dict[str, Any] = {"cg": CG, "minres": MINRES}
# A tolerance that is never reached in practice: the Krylov budget n alone stops the solve,
# which is the protocol of the paper (a fixed number of CG steps), not a convergence test.
KRYLOV_TOL = 1e-12
# The tight reference asks MINRES for 1e-10 but counts as converged below this relative
# residual: float64 MINRES typically stalls at 1e-9–1e-8 on these Hessians (loss of
# orthogonality of the Lanczos basis), which is still far below any Krylov budget measured.
TIGHT_CONVERGED = 1e-6
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------
# meta-gradients
# --------------------------------------------------------------------------------------
def unrolled_meta_gradient(
    inner_loss: Loss,
    outer_loss: Loss,
    theta: Mapping[str, Tensor],
    lam: float,
    *,
    lr: float,
    steps: int,
    inner_args: Sequence[Any] = (),
    outer_args: Sequence[Any] = (),
) -> Params:
    """The true derivative ``d outer_loss(φ_K(θ)) / dθ`` of K proximal GD steps.

    MAML on the proximal objective (:func:`applications.meta_gradients.maml_meta_gradient`:
    reverse mode through the unrolled loop, second order).  It is the gradient of the
    algorithm that is actually run, whereas the implicit gradient is that of the exact
    minimiser; the two agree when the K steps converge and ``H + λI`` is positive definite
    (Rajeswaran et al. 2019, Sec. 3: the implicit gradient is exact only at φ*).  For a
    quadratic ``L̂`` with Hessian ``H`` the Jacobian is
    ``M^K + λ (H + λI)^{-1} (I − M^K)`` with ``M = I − lr (H + λI)``.
    """
    return meta_gradients.maml_meta_gradient(
        inner_loss, lambda phi: outer_loss(phi, *outer_args), meta_gradients.requiring_grad(dict(theta)),
        tuple(inner_args), lr=lr, steps=steps, lam=lam, batched=False,
    ).grads


class _FixedSolution:
    """An "inner solver" that returns a precomputed φ.

    The implicit gradient depends on the inner solution only, never on the path of the
    solver (docs/design.md §1).  Re-running the deterministic K GD steps for every Krylov budget
    and linear solver would give the same φ at K times the cost, so the forward is done
    once and this stands in for it in every backward measured at that φ.
    """

    supports_batched = False

    def __init__(self, phi: Mapping[str, Tensor]) -> None:
        self.phi = tree_detach(dict(phi))

    def __call__(self, objective: Any, x0: Any, *args: Any, batched: bool = False) -> Params:
        if batched:
            raise ValueError("_FixedSolution is for one task")
        return {k: v.clone() for k, v in self.phi.items()}


@dataclasses.dataclass(frozen=True)
class ImplicitGradient:
    """One implicit meta-gradient and its backward solve.

    Attributes:
        grad: ``d outer / dθ = λu`` with ``(H + λI + δI) u = ∇outer(φ)``.
        phi: the inner solution it was computed at.
        residual_norm: ``‖(H + λI + δI)u − v‖`` of the linear solve.
        relative_residual: ``residual_norm / ‖v‖``.
        iterations: Krylov iterations used.
        status: the linear solver's status (``SUCCESS``, ``MAX_ITERATIONS``,
            ``NEGATIVE_CURVATURE``, ...).
    """

    grad: Params
    phi: Params
    residual_norm: float
    relative_residual: float
    iterations: int
    status: Status


def implicit_meta_gradient(
    inner_loss: Loss,
    outer_loss: Loss,
    theta: Mapping[str, Tensor],
    lam: float,
    linsolve: Any,
    *,
    inner_args: Sequence[Any] = (),
    outer_args: Sequence[Any] = (),
    phi: Mapping[str, Tensor] | None = None,
    solver: Any = None,
    damping: float = 0.0,
    hvp: str = "reverse",
) -> ImplicitGradient:
    """The implicit meta-gradient of :class:`bilevel.Proximal` (Rajeswaran et al. 2019, Eq. 6).

    Runs the library's layer itself — the object under test — so that what is measured is
    exactly what the application trains with: forward ``φ = layer(θ, *inner_args)``, then
    ``outer_loss(φ, *outer_args)`` is differentiated w.r.t. θ; the layer's backward solves
    ``(H + λI + δI) u = ∇outer(φ)`` with ``linsolve`` and returns ``λu``.

    Args:
        inner_loss: ``inner_loss(φ, *inner_args) -> scalar`` (the support loss).
        outer_loss: ``outer_loss(φ, *outer_args) -> scalar`` (the query loss).
        theta: meta-parameters (a dict of tensors; not modified).
        lam: proximal weight λ > 0.
        linsolve: a :mod:`bilevel.linsolve` solver (its ``maxiter`` caps the Krylov steps; with
            :data:`KRYLOV_TOL` the cap, not the tolerance, ends the solve in practice).
        phi: a precomputed inner solution (then ``solver`` must be ``None``).
        solver: an inner solver from :mod:`bilevel.solvers` (when ``phi`` is ``None``).
        damping: δ ≥ 0 of the backward system (biases the gradient when > 0).
        hvp: the layer's Hessian-vector-product mode.

    Returns:
        :class:`ImplicitGradient`.
    """
    if (phi is None) == (solver is None):
        raise ValueError("implicit_meta_gradient needs exactly one of phi= (a precomputed solution) or solver=")
    layer = bilevel.Proximal(
        inner_loss,
        lam=lam,
        solver=solver if phi is None else _FixedSolution(phi),
        linsolve=linsolve,
        damping=damping,
        on_failure="ignore",  # a fixed Krylov budget is the protocol; statuses are reported instead
        hvp=hvp,
    )
    step = meta_gradients.imaml_meta_gradient(
        layer, lambda phi: outer_loss(phi, *outer_args), meta_gradients.requiring_grad(dict(theta)),
        tuple(inner_args), batched=False,
    )
    bwd = layer.diagnostics.backward
    assert bwd is not None
    rn = float(bwd.residual_norm)
    vn = float(tree_norm(step.rhs))
    return ImplicitGradient(
        grad=tree_detach(step.grads),
        phi=step.phi,
        residual_norm=rn,
        relative_residual=rn / vn if vn > 0 else math.nan,
        iterations=int(bwd.iterations),
        status=bwd.status,
    )


# --------------------------------------------------------------------------------------
# the measurement on one task
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Point:
    """One approximate meta-gradient g_n compared with both references."""

    cos_tight: float
    err_tight: float
    cos_unrolled: float
    err_unrolled: float
    iterations: int
    status: Status


@dataclasses.dataclass
class TaskRecord:
    """Everything measured for one task at one λ; ``curves[(δ, linsolve, n)]`` is a :class:`Point`."""

    task: int
    lam: float
    hess_min: float
    hess_max: float
    inner_grad_ratio: float
    gd_stability: float
    tight_relres: float
    tight_status: Status
    tight_iterations: int
    cos_unrolled_tight: float
    err_unrolled_tight: float
    curves: dict[tuple[float, str, int], Point]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure (the CLI's options, resolved)."""

    lams: tuple[float, ...] = (0.1, 0.5, 2.0)
    dampings: tuple[float, ...] = (0.0, 1.0)
    krylov: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    linsolves: tuple[str, ...] = ("cg", "minres")
    inner_steps: int = 16
    inner_lr: float = 0.1
    tight_maxiter: int = 500
    tight_tol: float = 1e-10
    lanczos_iters: int = 30


def measure_task(
    loss: Loss,
    theta: Params,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    lam: float,
    settings: Settings,
    task: int = 0,
    seed: int = 0,
) -> TaskRecord:
    """All quantities of the tool for one task and one λ (see the module docstring)."""
    s = settings
    gd = bilevel.solvers.GradientDescent(lr=s.inner_lr, steps=s.inner_steps)
    # The forward once, through the layer (the application's iMAML-GD inner procedure);
    # the tight solve reuses it.
    tight = implicit_meta_gradient(
        loss, loss, theta, lam, MINRES(rtol=s.tight_tol, maxiter=s.tight_maxiter),
        inner_args=support, outer_args=query, solver=gd,
    )
    phi = tight.phi
    unrolled = unrolled_meta_gradient(
        loss, loss, theta, lam, lr=s.inner_lr, steps=s.inner_steps, inner_args=support, outer_args=query
    )

    # Curvature at φ: H + λI positive definite iff λ_min(H) > −λ.
    hmin, hmax = (float(e) for e in bilevel.hessian_extremes(loss, phi, *support, steps=s.lanczos_iters, seed=seed))

    # Did the inner solve converge?  Gradient of the proximal objective at φ vs at θ (where
    # the proximal term vanishes).
    g_phi = grad(loss)(phi, *support)
    g_theta = grad(loss)(tree_detach(theta), *support)
    prox = {k: g_phi[k] + lam * (phi[k] - theta[k].detach()) for k in phi}
    ratio = float(tree_norm(prox) / tree_norm(g_theta))

    curves: dict[tuple[float, str, int], Point] = {}
    for delta in s.dampings:
        for name in s.linsolves:
            for n in s.krylov:
                r = implicit_meta_gradient(
                    loss, loss, theta, lam, LINSOLVERS[name](rtol=KRYLOV_TOL, maxiter=n),
                    inner_args=support, outer_args=query, phi=phi, damping=delta,
                )
                curves[(delta, name, n)] = Point(
                    float(tree_cosine(r.grad, tight.grad)),
                    float(tree_relative_error(r.grad, tight.grad)),
                    float(tree_cosine(r.grad, unrolled)),
                    float(tree_relative_error(r.grad, unrolled)),
                    r.iterations,
                    r.status,
                )
    return TaskRecord(
        task=task,
        lam=lam,
        hess_min=hmin,
        hess_max=hmax,
        inner_grad_ratio=ratio,
        gd_stability=s.inner_lr * (hmax + lam),
        tight_relres=tight.relative_residual,
        tight_status=tight.status,
        tight_iterations=tight.iterations,
        cos_unrolled_tight=float(tree_cosine(unrolled, tight.grad)),
        err_unrolled_tight=float(tree_relative_error(unrolled, tight.grad)),
        curves=curves,
    )


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def aggregate(records: Sequence[TaskRecord], settings: Settings) -> list[dict[str, Any]]:
    """One CSV row per (λ, δ, linsolve, n), averaged over the tasks.

    Cosines get their mean and minimum over tasks (the worst task); relative errors their
    mean and maximum (again the worst).  The per-λ columns (curvature, inner convergence,
    tight residual; "converged" means a relative residual ≤ ``TIGHT_CONVERGED``) repeat on
    every row of that λ so that each row stands alone.
    """
    rows: list[dict[str, Any]] = []
    for lam in settings.lams:
        rs = [r for r in records if r.lam == lam]
        if not rs:
            continue
        per_lam = {
            "tasks": len(rs),
            "hess_min_mean": _mean([r.hess_min for r in rs]),
            "hess_min_min": min(r.hess_min for r in rs),
            "hess_max_mean": _mean([r.hess_max for r in rs]),
            "hess_max_max": max(r.hess_max for r in rs),
            "posdef_tasks": sum(r.hess_min + lam > 0 for r in rs),
            "inner_grad_ratio_mean": _mean([r.inner_grad_ratio for r in rs]),
            "inner_grad_ratio_max": max(r.inner_grad_ratio for r in rs),
            "gd_stability_max": max(r.gd_stability for r in rs),
            "tight_relres_mean": _mean([r.tight_relres for r in rs]),
            "tight_relres_max": max(r.tight_relres for r in rs),
            "tight_converged_tasks": sum(r.tight_relres <= TIGHT_CONVERGED for r in rs),
            "cos_unrolled_tight_mean": _mean([r.cos_unrolled_tight for r in rs]),
            "err_unrolled_tight_mean": _mean([r.err_unrolled_tight for r in rs]),
        }
        for delta in settings.dampings:
            for name in settings.linsolves:
                for n in settings.krylov:
                    vals = [r.curves[(delta, name, n)] for r in rs]
                    rows.append(
                        {
                            "lam": lam,
                            "damping": delta,
                            "linsolve": name,
                            "krylov": n,
                            "cos_tight_mean": _mean([v.cos_tight for v in vals]),
                            "cos_tight_min": min(v.cos_tight for v in vals),
                            "relerr_tight_mean": _mean([v.err_tight for v in vals]),
                            "relerr_tight_max": max(v.err_tight for v in vals),
                            "cos_unrolled_mean": _mean([v.cos_unrolled for v in vals]),
                            "cos_unrolled_min": min(v.cos_unrolled for v in vals),
                            "relerr_unrolled_mean": _mean([v.err_unrolled for v in vals]),
                            "relerr_unrolled_max": max(v.err_unrolled for v in vals),
                            "iterations_mean": _mean([float(v.iterations) for v in vals]),
                            # stopped before the budget for a reason other than convergence
                            # (CG on an indefinite system stops at its first non-positive curvature)
                            "early_stop_tasks": sum(v.status.early_stop for v in vals),
                            **per_lam,
                        }
                    )
    return rows


def task_rows(records: Sequence[TaskRecord]) -> list[dict[str, Any]]:
    """Per-task rows (one per task, λ, δ, linsolve, n) for the ``*_tasks.csv`` file."""
    out = []
    for r in records:
        for (delta, name, n), pt in r.curves.items():
            out.append(
                {
                    "task": r.task, "lam": r.lam, "damping": delta, "linsolve": name, "krylov": n,
                    "cos_tight": pt.cos_tight, "relerr_tight": pt.err_tight, "cos_unrolled": pt.cos_unrolled,
                    "relerr_unrolled": pt.err_unrolled, "iterations": pt.iterations, "status": pt.status.name,
                    "hess_min": r.hess_min, "hess_max": r.hess_max, "inner_grad_ratio": r.inner_grad_ratio,
                    "gd_stability": r.gd_stability, "tight_relres": r.tight_relres, "tight_status": r.tight_status.name,
                    "tight_iterations": r.tight_iterations, "cos_unrolled_tight": r.cos_unrolled_tight,
                }
            )
    return out


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(rows: Sequence[dict[str, Any]], settings: Settings, path: Path, title: str) -> None:
    """Cosine to both references against the Krylov budget, one panel per λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [lam for lam in settings.lams if any(r["lam"] == lam for r in rows)]
    fig, axes = plt.subplots(1, len(lams), figsize=(4.2 * len(lams), 3.6), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    combos = [(d, n) for d in settings.dampings for n in settings.linsolves]
    for ax, lam in zip(axes[0], lams):
        sel = [r for r in rows if r["lam"] == lam]
        for i, (delta, name) in enumerate(combos):
            pts = sorted((r["krylov"], r["cos_tight_mean"], r["cos_unrolled_mean"]) for r in sel
                         if r["damping"] == delta and r["linsolve"] == name)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            c = colors[i % len(colors)]
            ax.plot(xs, [p[1] for p in pts], "-o", color=c, ms=3, label=f"{name} δ={delta:g} vs tight")
            ax.plot(xs, [p[2] for p in pts], "--", color=c, label=f"{name} δ={delta:g} vs unrolled")
        head = sel[0]
        ax.axhline(head["cos_unrolled_tight_mean"], color="k", lw=0.8, ls=":", label="unrolled vs tight")
        ax.set_xscale("log")
        ax.set_xticks(list(settings.krylov), [str(n) for n in settings.krylov])
        ax.minorticks_off()
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("Krylov steps n")
        ax.set_title(
            f"λ={lam:g}: λmin(H)+λ={head['hess_min_min'] + lam:.2g}, tight res {head['tight_relres_max']:.1e}",
            fontsize=8,
        )
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cosine (mean over tasks)")
    # One legend below the panels: inside a panel it would hide the curves.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=6, frameon=False)
    fig.suptitle(title, fontsize=9)
    rows_of_legend = math.ceil(len(labels) / min(4, max(1, len(labels))))
    fig.tight_layout(rect=(0.0, 0.02 + 0.04 * rows_of_legend, 1.0, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: Sequence[dict[str, Any]], settings: Settings) -> str:
    """The short printed summary: per λ, the curvature line and the cosine curves."""
    lines = []
    for lam in settings.lams:
        sel = [r for r in rows if r["lam"] == lam]
        if not sel:
            continue
        h = sel[0]
        lines.append(
            f"λ={lam:g}: λ(H) ∈ [{h['hess_min_mean']:.3g}, {h['hess_max_mean']:.3g}] (worst min {h['hess_min_min']:.3g}); "
            f"H+λI PD on {h['posdef_tasks']}/{h['tasks']} tasks; lr(λmax+λ) ≤ {h['gd_stability_max']:.3g}; "
            f"inner grad ratio {h['inner_grad_ratio_mean']:.3g}; tight rel.res ≤ {h['tight_relres_max']:.2g} "
            f"({h['tight_converged_tasks']}/{h['tasks']} converged); cos(unrolled, tight) {h['cos_unrolled_tight_mean']:.3f}"
        )
        lines.append("   δ  solver" + "".join(f"{'n=' + str(n):>14} " for n in settings.krylov) + "  (cos vs tight / vs unrolled, mean)")
        for delta in settings.dampings:
            for name in settings.linsolves:
                cells = []
                for n in settings.krylov:
                    r = next(x for x in sel if x["damping"] == delta and x["linsolve"] == name and x["krylov"] == n)
                    mark = "*" if r["early_stop_tasks"] else " "
                    cells.append(f"{r['cos_tight_mean']:6.3f}/{r['cos_unrolled_mean']:6.3f}{mark}".rjust(15))
                lines.append(f"  {delta:>2g}  {name:<6}" + "".join(cells))
    lines.append("* the solver stopped before its budget (negative curvature, breakdown) on at least one task")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the program
# --------------------------------------------------------------------------------------
def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _names(s: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [n for n in names if n not in LINSOLVERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown linear solver(s) {bad}; choose from {', '.join(LINSOLVERS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m applications.experiments.metagrad_quality",
        description="Quality of iMAML's implicit meta-gradient against the exact implicit gradient and the "
        "unrolled derivative, with the curvature that decides whether it is well posed.",
    )
    p.add_argument("--data-root", required=True, help="Omniglot data folder (e.g. ../shared/data/omniglot)")
    p.add_argument("--checkpoint", default=None, help="training checkpoint; default: a seeded fresh initialisation")
    p.add_argument("--ways", type=positive_int, default=None, help="default 5 (or the checkpoint's)")
    p.add_argument("--shots", type=positive_int, default=None, help="default 1 (or the checkpoint's)")
    p.add_argument("--queries", type=positive_int, default=None, help="default 15 (or the checkpoint's)")
    p.add_argument("--filters", type=positive_int, default=None, help="default 64 (or the checkpoint's)")
    p.add_argument("--tasks", type=positive_int, default=4, help="training episodes to average over")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initialisation, the episodes and Lanczos")
    p.add_argument("--lams", type=_floats, default=(0.1, 0.5, 2.0), help="comma-separated λ values")
    p.add_argument("--dampings", type=_floats, default=(0.0, 1.0), help="comma-separated backward dampings δ")
    p.add_argument("--krylov", type=_ints, default=(1, 2, 5, 10, 20, 50), help="comma-separated Krylov budgets")
    p.add_argument("--linsolves", type=_names, default=("cg", "minres"), help="comma-separated: cg, minres")
    p.add_argument("--inner-steps", type=positive_int, default=None, help="inner GD steps K (default 16 or the checkpoint's)")
    p.add_argument("--inner-lr", type=positive_float, default=None, help="inner GD step size (default 0.1 or the checkpoint's)")
    p.add_argument("--tight-maxiter", type=positive_int, default=500, help="MINRES budget of the tight reference")
    p.add_argument("--lanczos", type=positive_int, default=30, help="Lanczos steps for the extreme eigenvalues of H")
    p.add_argument("--out", default=str(DEFAULT_RESULTS), help="output folder")
    p.add_argument("--tag", default=None, help="file name tag (default 'init' or 'step<N>' of the checkpoint)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    return p


def _classification_loss(model: nn.Module) -> Loss:
    """Cross-entropy of ``model`` run with the parameter dict φ (the app's support/query loss)."""

    def loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement; returns the exit status."""
    from applications.imaml.checkpoint import load_checkpoint
    from applications.imaml.models import build_model
    from applications.imaml.tasks import make_task_source

    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root}: no such folder (the Omniglot data, e.g. ../shared/data/omniglot)")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    output_dir(parser, args.out)
    torch.set_num_threads(args.threads)
    ckpt_cfg: dict[str, Any] = {}
    ckpt: dict[str, Any] | None = None
    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint)
        ckpt_cfg = dict(ckpt.get("config") or {})
        if ckpt_cfg.get("dataset", "omniglot") != "omniglot":
            raise SystemExit(f"error: the checkpoint is for {ckpt_cfg.get('dataset')!r}; this tool measures Omniglot")

    def pick(name: str, default: Any) -> Any:
        v = getattr(args, name)
        if v is not None:
            return v
        c = ckpt_cfg.get(name)
        return default if c is None else c

    ways, shots, queries = pick("ways", 5), pick("shots", 1), pick("queries", 15)
    filters = pick("filters", 64)
    settings = Settings(
        lams=args.lams,
        dampings=args.dampings,
        krylov=args.krylov,
        linsolves=args.linsolves,
        inner_steps=pick("inner_steps", 16),
        inner_lr=pick("inner_lr", 0.1),
        tight_maxiter=args.tight_maxiter,
        lanczos_iters=args.lanczos,
    )
    if not settings.lams or min(settings.lams) <= 0:
        raise SystemExit("error: --lams needs values > 0")
    if not settings.krylov or min(settings.krylov) < 1:
        raise SystemExit("error: --krylov needs budgets >= 1")
    if settings.dampings and min(settings.dampings) < 0:
        raise SystemExit("error: --dampings needs values >= 0")

    source = make_task_source(
        "omniglot", "train", ways=ways, shots=shots, queries=queries, seed=args.seed, data_root=args.data_root
    )
    torch.manual_seed(args.seed)
    model = build_model("omniglot", ways, filters=filters, image_shape=tuple(source.image_shape))  # type: ignore[arg-type]
    # float64 throughout: the references must not be limited by float32 rounding.
    model = model.double()
    for p in model.parameters():
        # θ and φ are passed explicitly; the module's own parameters must not look like
        # closed-over tensors that need a gradient.
        p.requires_grad_(False)
    if ckpt is not None:
        saved = ckpt["theta"]
        names = [k for k, _ in model.named_parameters()]
        if sorted(saved) != sorted(names):
            raise SystemExit("error: the checkpoint's parameters do not match the model built from its config")
        theta = {k: saved[k].detach().to(torch.float64) for k in names}
        tag = args.tag or f"step{int(ckpt.get('step', 0))}"
    else:
        theta = {k: p.detach().clone() for k, p in model.named_parameters()}
        tag = args.tag or "init"
    batch = source.sample(args.tasks).to("cpu", torch.float64)
    loss = _classification_loss(model)

    what = f"checkpoint {args.checkpoint}" if ckpt is not None else f"initialisation (seed {args.seed})"
    print(
        f"metagrad_quality: {what}, omniglot {ways}-way {shots}-shot, {queries} queries, {filters} filters, "
        f"{args.tasks} tasks, K={settings.inner_steps} GD steps of lr {settings.inner_lr}, "
        f"{sum(t.numel() for t in theta.values())} parameters, float64",
        flush=True,
    )
    records: list[TaskRecord] = []
    t0 = time.perf_counter()
    for b in range(args.tasks):
        support = (batch.support_x[b], batch.support_y[b])
        query = (batch.query_x[b], batch.query_y[b])
        for lam in settings.lams:
            rec = measure_task(loss, theta, support, query, lam, settings, task=b, seed=args.seed)
            records.append(rec)
            print(
                f"  task {b} λ={lam:g}: λ(H) ∈ [{rec.hess_min:.3g}, {rec.hess_max:.3g}], tight {rec.tight_status.name} "
                f"rel.res {rec.tight_relres:.2g}, cos(unrolled, tight) {rec.cos_unrolled_tight:.3f} "
                f"[{time.perf_counter() - t0:.0f}s]",
                flush=True,
            )

    rows = aggregate(records, settings)
    out = Path(args.out)
    csv_path = out / f"metagrad_quality_{tag}.csv"
    png_path = out / f"metagrad_quality_{tag}.png"
    write_csv(rows, csv_path)
    write_csv(task_rows(records), out / f"metagrad_quality_{tag}_tasks.csv")
    plot(rows, settings, png_path, f"iMAML meta-gradient quality\n{what}, {ways}-way {shots}-shot, {args.tasks} tasks")
    print(format_table(rows, settings))
    print(f"wrote {csv_path} and {png_path} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
