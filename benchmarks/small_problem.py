"""Small-problem latency: one meta-gradient of a 200-dimensional ridge (least-squares) inner
problem through ``bilevel.Proximal``, against the same computation written out by hand.

    python -m benchmarks.small_problem [--d 200 --n 400 --steps 100 --cg-steps 10 --rounds 200 --threads 1]
    python -m benchmarks.small_problem --quick      # fewer rounds: the smoke test
    python benchmarks/small_problem.py ...          # the same, run as a file

The problem (float32 by default, fixed seed)::

    φ*(θ) = argmin_φ  ½‖Aφ − b‖²/n + λ/2 ‖φ − θ‖²,       A: n×d = 400×200, λ = 1,
    meta-loss  ℓ(θ) = ½‖A_q φ*(θ) − b_q‖²/n              (A_q: another 400×200 draw).

Both ways run K = 100 gradient-descent steps (step 0.2; the Hessian ``AᵀA/n + λI`` has
eigenvalues in about [1.1, 3.9], so the step is stable) from θ, then exactly 10 CG
iterations from 0 on ``(AᵀA/n + λI) w = v``, ``v = ∂ℓ/∂φ`` at φ*, and return the
meta-gradient ``λ w``:

* ``bilevel``      — ``Proximal(inner_loss, λ, solver=GradientDescent(lr, steps=100),
  linsolve=CG(steps=10))`` (a fixed budget of 10 iterations, as the hand loop; the layer
  of ``benchmarks/metastep.py``'s ``make_layer``) called unbatched, then
  ``torch.autograd.grad`` of ℓ.  Its gradients and Hessian-vector products are the
  library's (``torch.func``).
* ``bilevel-compiled`` — ``bilevel`` with ``GradientDescent(compile=True)`` (each inner step
  one compiled function; the layer itself eager).
* ``bilevel-fullgraph`` — the whole meta-loss ``θ ↦ ℓ(layer(θ))`` under
  ``torch.compile(fullgraph=True)``: with fixed budgets the layer is traced (its inner loop in
  the forward graph, its CG in the compiled backward; docs/works-with.md), then
  ``torch.autograd.grad`` as above.  It compiles in the warm-up rounds.
* ``bilevel-forward`` — for the split: the same layer's forward alone (the 100 GD steps,
  under ``torch.no_grad``); its "gradient" is φ*, not compared.
* ``plain-autograd`` — the loop a user writes without a library: the same loss,
  ``torch.autograd.grad`` per GD step, double-backward Hessian-vector products in CG
  (the baseline of the hot-path issue: "a plain loop").
* ``hand-written`` — plain tensor code: ``φ ← φ − lr (Aᵀ(Aφ − b)/n + λ(φ − θ))``,
  ``v = A_qᵀ(A_q φ − b_q)/n``, CG with the explicit matvec ``Aᵀ(A p)/n + λ p``; no autograd.

The timing is in one process: after ``--warmup`` untimed rounds, each round times one
meta-gradient of each way in turn (interleaved), garbage collector off while timing.  The
table gives the median, max/min over ``--rounds`` (flagged ``!`` above 1.5, common for
millisecond timings on a shared machine) and the ratio to ``hand-written``.  The two
meta-gradients are compared (relative difference; float32 agreement to about 1e-6
expected) and ``bilevel``'s forward/backward iteration counts printed.  Writes
``small_problem.csv`` and ``small_problem.png`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (or loaded by path): make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import Tensor

from benchmarks.metastep import make_layer
from bilevel.tree import tree_relative_error

#: "bilevel-forward": the inner solve alone; "bilevel-compiled": GradientDescent(compile=True);
#: "bilevel-fullgraph": the whole meta-loss under torch.compile(fullgraph=True) (the traced layer).
METHODS = ("bilevel", "bilevel-compiled", "bilevel-fullgraph", "plain-autograd", "hand-written", "bilevel-forward")
NOISY = 1.5
QUICK = {"rounds": 20, "warmup": 3}


class RidgeProblem:
    """The ridge inner problem (support ``A, b``), the query ``A_q, b_q`` and the start θ₀."""

    def __init__(self, d: int, n: int, lam: float, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d, generator=g, dtype=dtype)
        self.A = torch.randn(n, d, generator=g, dtype=dtype)
        self.b = self.A @ w + 0.1 * torch.randn(n, generator=g, dtype=dtype)
        self.Aq = torch.randn(n, d, generator=g, dtype=dtype)
        self.bq = self.Aq @ w + 0.1 * torch.randn(n, generator=g, dtype=dtype)
        self.theta0 = 0.1 * torch.randn(d, generator=g, dtype=dtype)
        self.n, self.d, self.lam = n, d, lam


def inner_loss(phi: Tensor, A: Tensor, b: Tensor) -> Tensor:
    r = A @ phi - b
    return 0.5 * (r * r).sum() / A.shape[0]


def build(p: RidgeProblem, method: str, steps: int, lr: float, cg_steps: int) -> tuple[Callable[[], Tensor], Callable[[], str]]:
    if method in ("bilevel", "bilevel-compiled"):
        layer = make_layer(inner_loss, p.lam, steps, lr, cg_steps, compile=method == "bilevel-compiled")
        theta = p.theta0.clone().requires_grad_(True)

        def via_bilevel() -> Tensor:
            phi = layer(theta, p.A, p.b)
            (g,) = torch.autograd.grad(inner_loss(phi, p.Aq, p.bq), theta)
            return g

        def info() -> str:
            d = getattr(layer, "diagnostics", None)
            f, b = getattr(d, "forward", None), getattr(d, "backward", None)
            if f is None or b is None:
                return ""
            return (f"bilevel forward: {getattr(f.status, 'name', f.status)} after {f.iterations} steps; "
                    f"backward: {getattr(b.status, 'name', b.status)} after {b.iterations} CG iterations")

        return via_bilevel, info

    if method == "bilevel-fullgraph":
        # The traced layer (fixed budgets): the meta-loss -- inner loop, query loss -- is one
        # compiled graph, and its backward (the IFT's CG) the compiled backward.
        layer = make_layer(inner_loss, p.lam, steps, lr, cg_steps)
        theta = p.theta0.clone().requires_grad_(True)
        meta_loss = torch.compile(lambda th: inner_loss(layer(th, p.A, p.b), p.Aq, p.bq), fullgraph=True)

        def via_fullgraph() -> Tensor:
            (g,) = torch.autograd.grad(meta_loss(theta), theta)
            return g

        return via_fullgraph, lambda: ""

    if method == "bilevel-forward":
        layer = make_layer(inner_loss, p.lam, steps, lr, cg_steps)

        def forward_only() -> Tensor:
            with torch.no_grad():
                return layer(p.theta0, p.A, p.b)

        return forward_only, lambda: ""

    if method == "plain-autograd":
        # The loop a user writes with autograd and no library: the same black-box loss,
        # torch.autograd.grad per GD step, double-backward Hessian-vector products in CG.
        th = p.theta0

        def prox(phi: Tensor) -> Tensor:
            return inner_loss(phi, p.A, p.b) + 0.5 * p.lam * ((phi - th) ** 2).sum()

        def by_autograd() -> Tensor:
            phi = th.clone()
            for _ in range(steps):
                x = phi.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(prox(x), x)
                phi = phi - lr * g
            x = phi.detach().requires_grad_(True)
            (v,) = torch.autograd.grad(inner_loss(x, p.Aq, p.bq), x)
            (gx,) = torch.autograd.grad(prox(x), x, create_graph=True)
            w = torch.zeros_like(v)
            r = v.clone()
            q = r.clone()
            rs = r @ r
            for _ in range(cg_steps):
                (hq,) = torch.autograd.grad(gx, x, q, retain_graph=True)
                alpha = rs / (q @ hq)
                w = w + alpha * q
                r = r - alpha * hq
                rs_new = r @ r
                q = r + (rs_new / rs) * q
                rs = rs_new
            return p.lam * w

        return by_autograd, lambda: ""

    if method == "hand-written":
        A, b, Aq, bq, lam, n, nq = p.A, p.b, p.Aq, p.bq, p.lam, p.A.shape[0], p.Aq.shape[0]
        At, Aqt = A.t(), Aq.t()

        def by_hand() -> Tensor:
            th = p.theta0
            phi = th.clone()
            for _ in range(steps):
                phi = phi - lr * (At @ (A @ phi - b) / n + lam * (phi - th))
            v = Aqt @ (Aq @ phi - bq) / nq
            x = torch.zeros_like(v)
            r = v.clone()
            q = r.clone()
            rs = r @ r
            for _ in range(cg_steps):
                Aq_ = At @ (A @ q) / n + lam * q
                alpha = rs / (q @ Aq_)
                x = x + alpha * q
                r = r - alpha * Aq_
                rs_new = r @ r
                q = r + (rs_new / rs) * q
                rs = rs_new
            return lam * x

        return by_hand, lambda: ""

    raise ValueError(f"unknown method {method!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_problem",
                                description=" ".join((__doc__ or "").split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=200, help="dimension of φ and θ")
    p.add_argument("--n", type=int, default=400, help="rows of A (and of A_q)")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.2, help="inner GD step")
    p.add_argument("--steps", type=int, default=100, help="K, inner GD steps")
    p.add_argument("--cg-steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="a smoke test (explicit options win): "
                   + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.quick:
        parser.set_defaults(**QUICK)
        a = parser.parse_args(argv)
    if min(a.d, a.n, a.steps, a.cg_steps, a.rounds, a.warmup) < 1 or a.threads < 0 or not (a.lam > 0 and a.lr > 0):
        parser.error("sizes, --steps, --cg-steps, --rounds, --warmup must be >= 1; --lam, --lr > 0; --threads >= 0")
    threads_before = torch.get_num_threads()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        res = _run(a)
    finally:
        torch.set_num_threads(threads_before)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "small_problem.csv", out / "small_problem.png"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(res["rows"][0]))
        w.writeheader()
        w.writerows(res["rows"])
    _plot(res, png_path, a)
    print(f"\nwrote {csv_path} and {png_path}")
    return res


def _run(a: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, a.dtype)
    p = RidgeProblem(a.d, a.n, a.lam, dtype)
    print(f"ridge inner problem d={a.d}, n={a.n}, λ={a.lam}, K={a.steps} GD steps of {a.lr}, {a.cg_steps} CG iterations, "
          f"{a.dtype}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}", flush=True)
    built = {m: build(p, m, a.steps, a.lr, a.cg_steps) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    grads: dict[str, Tensor] = {}
    for r in range(a.warmup + a.rounds):
        for m, (fn, _) in built.items():
            gc.disable()
            try:
                t0 = time.perf_counter()
                g = fn()
                dt = time.perf_counter() - t0
            finally:
                gc.enable()
            if r == 0:
                grads[m] = g.detach()
            if r >= a.warmup:
                times[m].append(dt)
    ref = grads["hand-written"].double()
    err, err_plain, err_compiled, err_full = (float(tree_relative_error(grads[m].double(), ref))
                                              for m in ("bilevel", "plain-autograd", "bilevel-compiled", "bilevel-fullgraph"))
    info = built["bilevel"][1]()
    if info:
        print(info)
    print(f"meta-gradient bilevel vs hand-written: relative difference {err:.2e}; compiled: {err_compiled:.2e}; "
          f"fullgraph: {err_full:.2e}; plain-autograd: {err_plain:.2e}")
    med = {m: statistics.median(times[m]) for m in METHODS}
    rows = []
    for m in METHODS:
        t = times[m]
        rows.append({"method": m, "median_ms": 1e3 * med[m], "max_over_min": max(t) / min(t), "noisy": max(t) / min(t) > NOISY,
                     "min_ms": 1e3 * min(t), "samples": len(t), "x_hand_written": med[m] / med["hand-written"],
                     "x_plain_autograd": med[m] / med["plain-autograd"],
                     "grad_rel_err": {"bilevel": err, "bilevel-compiled": err_compiled, "bilevel-fullgraph": err_full,
                                      "plain-autograd": err_plain,
                                      "hand-written": 0.0}.get(m), "d": a.d, "n": a.n, "steps": a.steps, "cg_steps": a.cg_steps, "dtype": a.dtype,
                     "threads": torch.get_num_threads(), "torch": torch.__version__})
    print("| method | ms / meta-gradient (median) | min ms | max/min | × hand-written | × plain-autograd |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_over_min']:.2f}{' !' if r['noisy'] else ''} | "
              f"{r['x_hand_written']:.1f} | {r['x_plain_autograd']:.2f} |")
    noisy = [r["method"] for r in rows if r["noisy"]]
    if noisy:
        print(f"! max/min > {NOISY} (noisy timings; the medians are what to compare): {', '.join(noisy)}")
    fwd = med["bilevel-forward"]
    print(f"bilevel: forward (K={a.steps} GD steps) {1e3 * fwd:.2f} ms ≈ {1e6 * fwd / a.steps:.0f} µs per step; "
          f"backward and meta-loss {1e3 * (med['bilevel'] - fwd):.2f} ms; hand-written: "
          f"{1e6 * med['hand-written'] / (a.steps + a.cg_steps):.0f} µs per GD step or CG iteration")
    return {"rows": rows, "rel_err": err, "times": times, "info": info}


def _plot(res: dict[str, Any], path: Path, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    try:
        rows = res["rows"]
        names = [r["method"] for r in rows]
        ax1.bar(names, [r["median_ms"] for r in rows], color=[f"C{i}" for i in range(len(names))])
        ax1.set_ylabel("ms / meta-gradient (median)")
        ax1.set_title("median", fontsize=10)
        for i, m in enumerate(names):
            ax2.plot(range(1, len(res["times"][m]) + 1), [1e3 * t for t in res["times"][m]], ".", ms=3, color=f"C{i}", label=m)
        ax2.set_xlabel("round")
        ax2.set_ylabel("ms")
        ax2.set_yscale("log")
        ax2.set_title("every round (interleaved)", fontsize=10)
        ax2.legend(fontsize=8)
        fig.suptitle(f"ridge d={a.d}, n={a.n}: K={a.steps} GD + {a.cg_steps} CG, {a.dtype}, CPU {rows[0]['threads']} thread(s)",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
