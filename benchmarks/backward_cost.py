"""Cost of the implicit backward pass of a :class:`bilevel.Proximal` layer.

Two measurements on a small MLP proximal problem (implicit MAML's inner problem)::

    phi*(theta) = argmin_phi  MSE(MLP_phi(X), y) + lam/2 * ||phi - theta||^2

1. **Backward time in Hessian-vector products.**  The implicit backward runs ``n_CG``
   conjugate-gradient iterations, each one Hessian-vector product (HVP) of the inner
   objective (forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``, as the
   library computes it), plus one VJP of the optimality map.  We time one HVP, one
   gradient, and ``loss.backward()`` through the layer for several CG iteration caps
   (tolerance tiny, so CG runs every iteration; the count is read back from
   ``layer.diagnostics.backward.iterations``) and print ``backward / HVP``, expected to
   be about ``n_CG`` plus a small constant.

2. **Bytes kept for backward** after the forward pass, for several numbers of inner
   steps: (a) the implicit layer, (b) unrolled gradient descent (the same steps taken
   differentiably, ``create_graph=True``).  Measured with
   ``torch.autograd.graph.saved_tensors_hooks``; each distinct storage is counted once.
   The implicit column must not depend on the number of steps.

Run from the repository root::

    python -m benchmarks.backward_cost            # or: python benchmarks/backward_cost.py
    python -m benchmarks.backward_cost --device cuda --out results.json
    python -m benchmarks.backward_cost --quick    # tiny sizes (the smoke test)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import Tensor, nn

import bilevel
from benchmarks.metastep import int_list
from bilevel.linsolve import CG

Params = dict[str, Tensor]


# --------------------------------------------------------------------------------------
# inner solver: bilevel.solvers.GradientDescent when it exists, else a minimal local one
# --------------------------------------------------------------------------------------
class _LocalGradientDescent:
    """Fixed-step gradient descent following the solver protocol (fallback only)."""

    def __init__(self, lr: float, steps: int) -> None:
        self.lr = lr
        self.steps = steps

    def __call__(self, objective: Callable[..., Tensor], x0: Any, *args: Any, batched: bool = False) -> Any:
        if batched:
            raise NotImplementedError("the benchmark's local GradientDescent is unbatched")
        grad = torch.func.grad(objective)
        x = {k: v.detach() for k, v in x0.items()}
        for _ in range(self.steps):
            g = grad(x, *args)
            x = {k: x[k] - self.lr * g[k].detach() for k in x}
        return bilevel.SolverResult(x=x, status=bilevel.Status.COMPLETED, iterations=self.steps)


def make_solver(lr: float, steps: int) -> tuple[Any, str]:
    try:
        from bilevel.solvers import GradientDescent  # type: ignore[attr-defined]
    except ImportError:
        return _LocalGradientDescent(lr, steps), "local GD (bilevel.solvers.GradientDescent not available)"
    return GradientDescent(lr=lr, steps=steps), "bilevel.solvers.GradientDescent"


# --------------------------------------------------------------------------------------
# the problem
# --------------------------------------------------------------------------------------
class MLPRegression:
    """MLP regression on a synthetic data set, parameters as a dict (functional_call)."""

    def __init__(self, n: int, d_in: int, hidden: int, lam: float, device: torch.device, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(0)
            self.model = nn.Sequential(
                nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
            ).to(device=device, dtype=dtype)
        self.model.requires_grad_(False)  # the parameters live in theta, not in the module
        w = torch.randn(d_in, generator=g, dtype=dtype) / math.sqrt(d_in)

        def data() -> tuple[Tensor, Tensor]:
            X = torch.randn(n, d_in, generator=g, dtype=dtype)
            y = torch.sin(2.0 * X @ w) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
            return X.to(device), y.unsqueeze(1).to(device)

        self.X, self.y = data()  # support (inner) set
        self.Xq, self.yq = data()  # query (outer) set
        self.lam = lam
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def theta(self) -> Params:
        return {k: v.detach().clone().requires_grad_(True) for k, v in self.model.named_parameters()}

    def loss(self, phi: Params, X: Tensor, y: Tensor) -> Tensor:
        return ((torch.func.functional_call(self.model, phi, (X,)) - y) ** 2).mean()

    def objective(self, phi: Params, theta: Params, X: Tensor, y: Tensor) -> Tensor:
        """Inner objective: loss + lam/2 ||phi - theta||^2 (what the layer minimises)."""
        prox = sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
        return self.loss(phi, X, y) + 0.5 * self.lam * prox

    def layer(self, solver: Any, cg_maxiter: int | None = None, hvp: str = "forward") -> bilevel.Proximal:
        linsolve = CG(rtol=1e-30, maxiter=cg_maxiter) if cg_maxiter is not None else CG()
        # CG is cut at maxiter on purpose (MAX_ITERATIONS): do not warn about it.
        return bilevel.Proximal(self.loss, lam=self.lam, solver=solver, linsolve=linsolve, on_failure="ignore", hvp=hvp)


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(
    tasks: dict[str, tuple[Callable[[Any], Any], Callable[[], Any]]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, tuple[float, float]]:
    """(median, min) wall time of each ``fn(setup())`` (setup not timed).

    The tasks take turns within every repeat, so that a ratio of two of them compares
    runs made under the same machine load; the garbage collector is off while timing
    (as in :mod:`timeit`).
    """
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for i in range(warmup + repeats):
        for name, (fn, setup) in tasks.items():
            state = setup()
            gc_on = gc.isenabled()
            gc.disable()
            try:
                _sync(device)
                t0 = time.perf_counter()
                fn(state)
                _sync(device)
                dt = time.perf_counter() - t0
            finally:
                if gc_on:
                    gc.enable()
            del state
            if i >= warmup:
                times[name].append(dt)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def _no_setup() -> None:
    return None


def time_backward(prob: MLPRegression, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    solver, _ = make_solver(args.lr, args.inner_steps)
    theta = prob.theta()
    layer0 = prob.layer(solver)
    phi_star = {k: v.detach() for k, v in layer0(theta, prob.X, prob.y).items()}
    th = {k: v.detach() for k, v in theta.items()}
    g = torch.Generator().manual_seed(1)  # the HVP direction (the caller's RNG is left alone)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for k, p in phi_star.items()}
    grad_fn = torch.func.grad(prob.objective)

    def hvp(_: Any) -> Any:  # as the layer's backward operator with hvp='forward': forward-over-reverse
        return torch.func.jvp(lambda p: grad_fn(p, th, prob.X, prob.y), (phi_star,), (v,))[1]

    def grad(_: Any) -> Any:
        return grad_fn(phi_star, th, prob.X, prob.y)

    phi_r = [p.clone().requires_grad_(True) for p in phi_star.values()]
    v_list = list(v.values())

    def hvp_rr(_: Any) -> Any:  # reference only: reverse-over-reverse, not what the library uses
        with torch.enable_grad():
            f = prob.objective(dict(zip(phi_star, phi_r)), th, prob.X, prob.y)
            g = torch.autograd.grad(f, phi_r, create_graph=True)
            return torch.autograd.grad(g, phi_r, grad_outputs=v_list)

    # The library's hvp="reverse" product: the gradient graph is built once, each product
    # is one backward pass through it (retain_graph).
    with torch.enable_grad():
        f_keep = prob.objective(dict(zip(phi_star, phi_r)), th, prob.X, prob.y)
        g_keep = torch.autograd.grad(f_keep, phi_r, create_graph=True)

    def hvp_reuse(_: Any) -> Any:
        with torch.enable_grad():
            return torch.autograd.grad(g_keep, phi_r, grad_outputs=v_list, retain_graph=True)

    unit = hvp if getattr(args, "hvp", "forward") == "forward" else hvp_reuse
    base = _time_interleaved(
        {"hvp": (unit, _no_setup), "grad": (grad, _no_setup), "hvp_rr": (hvp_rr, _no_setup)},
        args.repeats,
        args.warmup,
        device,
    )
    t_hvp, t_hvp_min = base["hvp"]
    t_grad, t_grad_min = base["grad"]
    t_rr, t_rr_min = base["hvp_rr"]

    rows = []
    for n_cg in args.cg_iters:
        layer = prob.layer(solver, cg_maxiter=n_cg, hvp=getattr(args, "hvp", "forward"))

        def setup() -> Tensor:
            for p in theta.values():
                p.grad = None
            phi = layer(theta, prob.X, prob.y)  # noqa: B023 (timed in this iteration)
            return prob.loss(phi, prob.Xq, prob.yq)

        def backward(loss: Tensor) -> None:
            loss.backward()

        # One HVP timed next to every backward: the ratio compares like with like.
        tasks = {"hvp": (unit, _no_setup), "backward": (backward, setup)}
        res = _time_interleaved(tasks, args.repeats, args.warmup, device)
        (h, h_min), (b, b_min) = res["hvp"], res["backward"]
        bwd = layer.diagnostics.backward
        rows.append(
            {
                "cg_maxiter": n_cg,
                "cg_iterations": None if bwd is None else int(bwd.iterations),
                "cg_status": None if bwd is None else bwd.status.name,
                "hvp_s": h,
                "backward_s": b,
                "backward_min_s": b_min,
                "backward_over_hvp": b / h,
                "backward_over_hvp_min": b_min / h_min,
            }
        )

    fit = None
    if len(rows) >= 2:  # least squares: backward/HVP = intercept + slope * n_CG
        xs = [float(r["cg_iterations"]) for r in rows]
        ys = [r["backward_over_hvp"] for r in rows]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
            fit = {"slope": slope, "intercept": my - slope * mx}
    return {
        "hvp_s": t_hvp,
        "hvp_min_s": t_hvp_min,
        "grad_s": t_grad,
        "grad_min_s": t_grad_min,
        "grad_over_hvp": t_grad / t_hvp,
        "hvp_rev_rev_s": t_rr,
        "hvp_rev_rev_min_s": t_rr_min,
        "rows": rows,
        "fit": fit,
    }


# --------------------------------------------------------------------------------------
# bytes kept for backward
# --------------------------------------------------------------------------------------
class _Saved:
    """What the pack hook hands to autograd: a handle we can watch with a weak reference."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: Tensor) -> None:
        self.t = t


class SavedTensorMeter:
    """Bytes of the tensors autograd keeps for backward, counted with saved-tensors hooks.

    Every saved tensor goes through the pack hook, which wraps it in a handle; a handle
    still alive after the forward pass belongs to the graph kept for backward (the
    temporary graphs of intermediate gradients are freed, and their handles with them).
    Each distinct storage is counted once, at its allocated size (``nbytes`` of the
    storage: an expanded stride-0 tensor costs one element, not ``numel``).

    ``suspended()`` pops the hooks for a stretch of code that keeps nothing (the implicit
    layer's inner solve, run under ``no_grad``): ``torch.func.grad`` refuses to run while
    saved-tensors hooks are installed.  It only acts if the hooks are still on top of the
    stack — the layer itself may already have set them aside around its solve.
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> _Saved:
        h = _Saved(t)
        self._refs.append(weakref.ref(h))
        return h

    @staticmethod
    def _unpack(h: _Saved) -> Tensor:
        return h.t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _on_top(self) -> bool:
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        if top is None:  # cannot look: assume the layer set the hooks aside itself
            return False
        hooks = top(False)
        return hooks is not None and hooks[0] == self._pack

    def suspended(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run with this meter's hooks popped (if they are on top of the hook stack)."""

        def wrapped(*a: Any, **kw: Any) -> Any:
            if not self._on_top():  # e.g. the layer has already set them aside
                return fn(*a, **kw)
            self._hooks.__exit__(None, None, None)
            try:
                return fn(*a, **kw)
            finally:
                self._hooks.__enter__()

        return wrapped

    def live(self) -> dict[str, int]:
        storages: dict[tuple[str, int], tuple[int, int]] = {}
        n = 0
        for r in self._refs:
            h = r()
            if h is None:
                continue
            n += 1
            t = h.t
            s = t.untyped_storage()
            key = (str(t.device), s.data_ptr())
            nb, ne = storages.get(key, (0, 0))
            storages[key] = (max(nb, s.nbytes()), max(ne, t.numel() * t.element_size()))
        return {
            "bytes": sum(v[0] for v in storages.values()),
            "numel_bytes": sum(v[1] for v in storages.values()),
            "tensors": n,
            "storages": len(storages),
        }


def saved_implicit(prob: MLPRegression, steps: int, lr: float) -> dict[str, int]:
    solver, _ = make_solver(lr, steps)
    theta = prob.theta()
    with SavedTensorMeter() as meter:
        layer = prob.layer(meter.suspended(solver))
        phi = layer(theta, prob.X, prob.y)
    out = meter.live()
    del phi
    return out


def saved_unrolled(prob: MLPRegression, steps: int, lr: float) -> dict[str, int]:
    theta = prob.theta()
    with SavedTensorMeter() as meter:
        phi = dict(theta)
        for _ in range(steps):
            f = prob.objective(phi, theta, prob.X, prob.y)
            g = torch.autograd.grad(f, list(phi.values()), create_graph=True)
            phi = {k: p - lr * gk for (k, p), gk in zip(phi.items(), g)}
    out = meter.live()
    del phi
    return out


def measure_memory(prob: MLPRegression, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for steps in args.steps:
        imp = saved_implicit(prob, steps, args.lr)
        unr = saved_unrolled(prob, steps, args.lr) if steps <= args.max_unrolled_steps else None
        rows.append(
            {
                "steps": steps,
                "implicit_bytes": imp["bytes"],
                "implicit_tensors": imp["tensors"],
                "unrolled_bytes": None if unr is None else unr["bytes"],
                "unrolled_tensors": None if unr is None else unr["tensors"],
                "unrolled_numel_bytes": None if unr is None else unr["numel_bytes"],
                "implicit_numel_bytes": imp["numel_bytes"],
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "skipped"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b} B"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_report(res: dict[str, Any]) -> str:
    cfg, t, mem = res["config"], res["timing"], res["memory"]
    out = [
        "bilevel backward cost: Proximal layer on an MLP "
        f"{cfg['d_in']}->{cfg['hidden']}->{cfg['hidden']}->1 (tanh), {cfg['n']} points, "
        f"{cfg['n_params']} parameters, lam={cfg['lam']}",
        f"device {cfg['device']}, dtype {cfg['dtype']}, torch {cfg['torch']}, torch threads {cfg['threads']}, "
        f"nproc {cfg['nproc']}; inner solver: {cfg['solver']} (lr={cfg['lr']})",
        "",
        f"1. Backward time (median of {cfg['repeats']}, {cfg['warmup']} warm-up; "
        f"{cfg['inner_steps']} inner steps in the forward)",
        "                                          median        min",
        f"   one HVP, as the layer (hvp={cfg.get('hvp', 'forward')!r:9s}): {t['hvp_s'] * 1e3:9.3f} {t['hvp_min_s'] * 1e3:9.3f} ms",
        f"   one gradient                          : {t['grad_s'] * 1e3:9.3f} {t['grad_min_s'] * 1e3:9.3f} ms"
        f"   (= {t['grad_over_hvp']:.2f} HVP)",
        f"   one HVP, reverse-over-reverse (ref.)  : {t['hvp_rev_rev_s'] * 1e3:9.3f} "
        f"{t['hvp_rev_rev_min_s'] * 1e3:9.3f} ms   (= {t['hvp_rev_rev_s'] / t['hvp_s']:.2f} HVP)",
        "",
    ]
    rows = [
        [
            str(r["cg_maxiter"]),
            str(r["cg_iterations"]),
            f"{r['hvp_s'] * 1e3:.3f}",
            f"{r['backward_s'] * 1e3:.3f}",
            f"{r['backward_over_hvp']:.2f}",
            f"{r['backward_over_hvp'] - r['cg_iterations']:+.2f}",
        ]
        for r in t["rows"]
    ]
    out.append(
        _table(["CG maxiter", "CG iters", "HVP ms", "backward ms", "backward/HVP", "minus n_CG"], rows)
    )
    out.append(
        "(HVP ms: one HVP timed in turn with every backward, under the same load; backward/HVP: ratio of "
        "the medians,\n expected about n_CG + a small constant)"
    )
    if t["fit"] is not None:
        out.append(
            f"least-squares fit of the medians: backward ~ {t['fit']['intercept']:.2f} "
            f"+ {t['fit']['slope']:.2f} * n_CG HVPs"
        )
    out += ["", "2. Bytes kept for backward after the forward pass (saved tensors, each storage once)", ""]
    rows = []
    for r in mem:
        ratio = "" if r["unrolled_bytes"] is None else f"{r['unrolled_bytes'] / r['implicit_bytes']:.1f}x"
        rows.append(
            [
                str(r["steps"]),
                _fmt_bytes(r["implicit_bytes"]),
                str(r["implicit_bytes"]),
                _fmt_bytes(r["unrolled_bytes"]),
                "skipped" if r["unrolled_bytes"] is None else str(r["unrolled_bytes"]),
                ratio or "-",
            ]
        )
    out.append(_table(["inner steps", "implicit", "implicit B", "unrolled", "unrolled B", "unrolled/implicit"], rows))
    skipped = [r["steps"] for r in mem if r["unrolled_bytes"] is None]
    if skipped:
        out.append(f"(unrolled skipped for steps > --max-unrolled-steps={cfg['max_unrolled_steps']})")
    constant = len({r["implicit_bytes"] for r in mem}) == 1
    out.append(f"implicit bytes constant across step counts: {'yes' if constant else 'NO'}")
    el = cfg.get("elapsed_s")
    if el:
        out.append(f"\n(run time: {el['timing']:.1f} s timing, {el['memory']:.1f} s memory)")
    return "\n".join(out)


def write_out(res: dict[str, Any], path: str) -> None:
    if path.endswith(".csv"):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["section", "key", "metric", "value"])
            for k, v in res["config"].items():
                w.writerow(["config", "", k, v])
            t = res["timing"]
            for k, v in t.items():
                if k == "fit" and v is not None:
                    w.writerow(["timing", "fit", "slope", v["slope"]])
                    w.writerow(["timing", "fit", "intercept", v["intercept"]])
                elif k not in ("rows", "fit"):
                    w.writerow(["timing", "", k, v])
            for r in t["rows"]:
                for k, v in r.items():
                    if k != "cg_maxiter":
                        w.writerow(["timing", f"cg_maxiter={r['cg_maxiter']}", k, v])
            for r in res["memory"]:
                for k, v in r.items():
                    if k != "steps":
                        w.writerow(["memory", f"steps={r['steps']}", k, "skipped" if v is None else v])
    else:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=2)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


QUICK = dict(
    n=16, d_in=4, hidden=8, inner_steps=3, repeats=2, warmup=1, cg_iters=[2, 4], steps=[2, 4, 8], max_unrolled_steps=4
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--hvp", default="forward", choices=["forward", "reverse"],
                   help="the layer's hvp mode; the HVP unit of the table is then the same kind of product")
    p.add_argument("--n", type=int, default=256, help="data points (support and query set each)")
    p.add_argument("--d-in", type=int, default=20)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.1, help="inner gradient-descent step size")
    p.add_argument("--inner-steps", type=int, default=20, help="inner steps in the forward of the timing part")
    p.add_argument("--cg-iters", type=int_list(), default=[5, 10, 20], help="CG iteration caps (comma-separated)")
    p.add_argument("--steps", type=int_list(), default=[10, 100, 1000], help="inner step counts for the memory table")
    p.add_argument("--max-unrolled-steps", type=int, default=1000, help="skip unrolled GD above this many steps")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (torch.set_num_threads; default 1: these ops are too small to gain from intra-op "
        "threads, and on a busy machine extra threads make the timings erratic); 0 keeps torch's default",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for a smoke test (overrides the size options): "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument("--out", default=None, help="write the results to this file (.csv, else JSON)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    threads_before = torch.get_num_threads()
    if args.threads > 0 and device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called inside a larger process (tests)


def _run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    prob = MLPRegression(args.n, args.d_in, args.hidden, args.lam, device, dtype)
    _, solver_name = make_solver(args.lr, 1)
    config = {
        "n": args.n,
        "d_in": args.d_in,
        "hidden": args.hidden,
        "n_params": prob.n_params,
        "lam": args.lam,
        "lr": args.lr,
        "hvp": args.hvp,
        "inner_steps": args.inner_steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_unrolled_steps": args.max_unrolled_steps,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "solver": solver_name,
        "date": datetime.date.today().isoformat(),
        "quick": bool(args.quick),
    }
    t0 = time.perf_counter()
    timing = time_backward(prob, args, device)
    t1 = time.perf_counter()
    memory = measure_memory(prob, args)
    t2 = time.perf_counter()
    config["elapsed_s"] = {"timing": t1 - t0, "memory": t2 - t1}
    return {"config": config, "timing": timing, "memory": memory}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run both measurements, print the report; returns the results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    for name in ("n", "d_in", "hidden", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("inner_steps", "warmup", "max_unrolled_steps", "threads"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if not (args.lam > 0 and args.lr > 0):
        parser.error("--lam and --lr must be > 0")
    res = run(args)
    print(format_report(res))
    if args.out:
        write_out(res, args.out)
        print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
