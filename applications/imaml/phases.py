"""Where a meta-step's time goes: ``python -m applications.imaml.phases --data-root DIR``.

Builds the learners exactly as ``train`` does (the defaults of
:func:`~.config.resolve_config`, or the options given), then times every phase of one
meta-step, for each algorithm in turn on the same meta-batches (algorithms interleaved
step by step, so machine-load drift hits all of them; ``--warmup`` untimed rounds first):

* ``data`` -- sampling the meta-batch and moving it to the device;
* ``inner loop`` -- the inner solve (iMAML: the batched ``bilevel.Proximal`` forward;
  MAML: the unrolled SGD with its graph);
* ``  of which health`` -- what the inner-loop health statistics cost inside it (the
  monitored solve against the same solve unmonitored, timed separately on the same batch);
* ``query forward`` / ``query backward`` -- the query loss and its gradient to the adapted
  parameters;
* ``Krylov solve`` -- iMAML's backward linear solve ``(H + λI) u = v`` (the Hessian graph
  and its products);
* ``VJP`` -- the rest of iMAML's backward (the closed-form ``Λu``, gradient accumulation);
* ``backward through the inner loop`` -- MAML's reverse pass through its unrolled steps;
* ``health statistics`` -- the log's statistics read after the solves;
* ``optimiser`` -- Adam's step.

On a GPU every phase boundary synchronises (so the phases add up; training does not).
Prints a table (seconds and share of the meta-step, medians over ``--rounds``), writes
``phases.csv`` and ``phases.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..meta_gradients import no_clock
from .algorithms import ALGORITHMS
from .learner import set_meta_gradients
from .plot import _pyplot, _save
from .timing import setup

__all__ = ["PhaseClock", "main", "profile"]

#: Table order of the phases.
PHASES = ("data", "inner loop", "  of which health", "query forward", "query backward", "Krylov solve", "VJP",
          "backward through the inner loop", "health statistics", "optimiser")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """``with clock("phase"): ...`` adds the block's wall time to ``clock.seconds["phase"]``
    (synchronising the device at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.starts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        _sync(self.device)
        t0 = time.perf_counter()
        self.starts.setdefault(phase, t0)
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[phase] += time.perf_counter() - t0

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        """``fn`` with each call timed into ``phase``."""

        def timed(*args: Any, **kw: Any) -> Any:
            with self(phase):
                return fn(*args, **kw)

        return timed


class _TimedLinsolve:
    """A linear solver whose calls are timed (the layer's backward calls it inside autograd)."""

    def __init__(self, inner: Any, clock: PhaseClock) -> None:
        self.inner, self.clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        with self.clock("Krylov solve"):
            return self.inner(*args, **kw)


def profile(algorithms: Sequence[str], rounds: int, warmup: int, imaml: dict[str, Any] | None = None,
            **kw: Any) -> dict[str, dict[str, list[float]]]:
    """Per algorithm, per phase, the seconds of each timed meta-step (``"total"`` included).

    ``kw`` configures every learner (data, meta-batch, device); ``imaml`` only the iMAML ones
    (inner steps, optimiser, ...): the baselines keep their own defaults."""
    learners = {}
    src, first = None, None
    for alg in algorithms:
        extra = (imaml or {}) if ALGORITHMS[alg].implicit else {}
        cfg, src, learner, theta, rho, opt = setup(alg, src, **kw, **extra)  # the data loaded once
        first = first or cfg
        learners[alg] = (learner, theta, rho, opt)
    assert src is not None and first is not None
    cfg = first
    dev = torch.device(cfg.device)
    out: dict[str, dict[str, list[float]]] = {a: defaultdict(list) for a in algorithms}
    for r in range(warmup + rounds):
        t0 = time.perf_counter()
        batch = src.sample(cfg.meta_batch).to(dev, cfg.torch_dtype)
        _sync(dev)
        t_data = time.perf_counter() - t0
        for alg in algorithms:
            learner, theta, rho, opt = learners[alg]
            clock = PhaseClock(dev)
            clock.seconds["data"] = t_data
            split = _instrument(learner, clock)
            learner.clock = clock
            _sync(dev)
            t1 = time.perf_counter()
            try:
                res = learner.meta_gradient(theta, rho, batch)
                with clock("optimiser"):
                    set_meta_gradients(theta, rho, res)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            finally:
                split.restore()
            _sync(dev)
            total = time.perf_counter() - t1 + t_data
            split.finish(clock)
            if learner.layer is not None:
                clock.seconds["  of which health"] = _health_cost(learner, theta, rho, batch, dev)
            if r >= warmup:
                for k, v in clock.seconds.items():
                    out[alg][k].append(v)
                out[alg]["total"].append(total)
    return out


class _Split:
    """Splits the ``backward`` phase into the query backward and the rest (iMAML: the Krylov
    solve and the VJP; MAML: the pass through the unrolled inner loop): a gradient hook on
    the adapted parameters marks where the query backward ends."""

    def __init__(self, learner: Any, clock: PhaseClock) -> None:
        self.learner = learner
        self.layer = learner.layer
        self.t_hook: float | None = None
        self.saved: list[tuple[Any, str, Any]] = []

    def restore(self) -> None:
        for obj, name, val in reversed(self.saved):
            if name == "query":  # an instance attribute shadowing the method: remove it
                del obj.__dict__[name]
            else:
                setattr(obj, name, val)
        self.learner.clock = no_clock

    def finish(self, clock: PhaseClock) -> None:
        s = clock.seconds
        if "backward" not in s or self.t_hook is None:
            return
        back = s.pop("backward")
        krylov = s.get("Krylov solve", 0.0)
        s["query backward"] = self.t_hook - clock.starts["backward"]
        rest = max(0.0, back - s["query backward"] - krylov)
        if self.layer is not None:
            s["VJP"] = rest
        elif self.learner.config.algorithm == "maml":
            s["backward through the inner loop"] = rest
        else:
            s["query backward"] += rest


def _instrument(learner: Any, clock: PhaseClock) -> _Split:
    split = _Split(learner, clock)
    layer = learner.layer
    if layer is not None:
        split.saved.append((layer, "linsolve", layer.linsolve))
        layer.linsolve = _TimedLinsolve(layer.linsolve, clock)
    # Mark the start of the backward and the first gradient reaching φ (= query backward done).
    real_query = learner.query

    def query(phi: Any, batch: Any) -> Any:
        first = next(iter(phi.values()))

        def hook(g: torch.Tensor) -> None:
            if split.t_hook is None:
                _sync(clock.device)
                split.t_hook = time.perf_counter()

        if first.requires_grad:
            first.register_hook(hook)
        return real_query(phi, batch)

    learner.query = query
    split.saved.append((learner, "query", real_query))
    return split


def _health_cost(learner: Any, theta: dict, rho: dict, batch: Any, dev: torch.device) -> float:
    """Seconds the monitored inner solve costs over the same solve unmonitored (same batch)."""
    layer = learner.layer
    solver = layer.solver
    if not getattr(solver, "monitor", False):
        return 0.0
    lean = dataclasses.replace(solver, monitor=False)
    times = {}
    with torch.no_grad():
        th = {k: v.detach() for k, v in theta.items()}
        lam = learner.lam_value({k: r.detach() for k, r in rho.items()}) if rho else None
        for name, s in (("monitored", solver), ("lean", lean), ("monitored", solver)):
            layer.solver = s
            _sync(dev)
            t0 = time.perf_counter()
            layer(th, batch.support_x, batch.support_y, lam=lam, batched=learner.config.batching)
            _sync(dev)
            times[name] = time.perf_counter() - t0  # the second monitored run is the warm one
    layer.solver = solver
    return max(0.0, times["monitored"] - times["lean"])


def table(results: dict[str, dict[str, list[float]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines and CSV rows: median seconds per phase and share of the median total."""
    algs = list(results)
    med = {a: {k: statistics.median(v) for k, v in results[a].items()} for a in algs}
    lines = ["| phase | " + " | ".join(algs) + " |", "|---|" + "---|" * len(algs)]
    rows = []
    for ph in [*PHASES, "total"]:
        if not any(ph in med[a] for a in algs):
            continue
        cells = []
        for a in algs:
            if ph not in med[a]:
                cells.append("")
                continue
            share = 100 * med[a][ph] / med[a]["total"]
            cells.append(f"{med[a][ph]:.3f}" + ("" if ph == "total" else f" ({share:.0f} %)"))
            rows.append({"algorithm": a, "phase": ph.strip(), "median_s": med[a][ph], "share": share,
                         "max_over_min": max(results[a][ph]) / max(min(results[a][ph]), 1e-12)})
        lines.append(f"| {ph.strip() if ph != '  of which health' else '↳ of which health'} | " + " | ".join(cells) + " |")
    base = "maml" if "maml" in med else algs[-1]
    ratios = ", ".join(f"{a} {med[a]['total'] / med[base]['total']:.2f}×" for a in algs)
    lines.append(f"\nmeta-step time relative to {base}: {ratios}")
    return lines, rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = _pyplot()
    algs = list(dict.fromkeys(r["algorithm"] for r in rows))
    phases = [p.strip() for p in PHASES if p.strip() != "of which health"]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(algs)))
    try:
        for i, a in enumerate(algs):
            left = 0.0
            for j, ph in enumerate(phases):
                v = next((r["median_s"] for r in rows if r["algorithm"] == a and r["phase"] == ph), 0.0)
                if v > 0:
                    ax.barh(i, v, left=left, color=f"C{j % 10}", label=ph if i == 0 or ph not in ax.get_legend_handles_labels()[1] else None)
                    left += v
        ax.set_yticks(range(len(algs)), algs)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per meta-step (median of each phase)")
        ax.set_title(title, fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        # beside the bars, never over them
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _combine(p: argparse.ArgumentParser, specs: Sequence[str], out: Path) -> int:
    """Several profiles (before / after a change) on one figure and in one CSV."""
    rows: list[dict[str, Any]] = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            p.error(f"--combine takes LABEL=CSV, got {spec!r}")
        if not Path(path).is_file():
            p.error(f"--combine: no file {path}")
        with open(path, newline="") as f:
            rows += [dict(r, algorithm=f"{label}: {r['algorithm']}", median_s=float(r["median_s"])) for r in csv.DictReader(f)]
    _write_csv(rows, out / "phases.csv")
    plot(rows, out / "phases.png", "seconds per meta-step by phase: " + ", ".join(s.partition("=")[0] for s in specs))
    print(f"wrote {out / 'phases.csv'} and {out / 'phases.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m applications.imaml.phases", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="omniglot", choices=("sinusoid", "omniglot", "miniimagenet"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--filters", type=int, default=None)
    p.add_argument("--algorithms", default="imaml,maml,fomaml")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    p.add_argument("--out", default="runs/phases", help="folder for phases.csv / phases.png")
    # These shape the iMAML learners only; the baselines keep their defaults.
    for name in ("inner-steps", "cg-steps"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--inner-optimizer", default=None, choices=("gd", "momentum", "nesterov", "adam"))
    p.add_argument("--compile", default=None, choices=("off", "default", "reduce-overhead"))
    p.add_argument("--batching", default=None, choices=("auto", "vmap", "loop"))
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--query-batching", default=None, choices=("auto", "vmap", "loop"),
                   help="the query pass of every algorithm (default auto: measured)")
    p.add_argument("--combine", nargs="+", metavar="LABEL=CSV", default=None,
                   help="measure nothing: draw earlier phases.csv files on one figure (bars named 'LABEL: algorithm')")
    a = p.parse_args(argv)
    if a.combine:
        return _combine(p, a.combine, Path(a.out))
    if a.threads:
        torch.set_num_threads(a.threads)
    algs = [x for x in a.algorithms.split(",") if x]
    bad = [x for x in algs if x not in ALGORITHMS]
    if bad:
        p.error(f"unknown algorithm(s) {bad}; choose from {', '.join(ALGORITHMS)}")
    extra = {k: getattr(a, k) for k in ("inner_steps", "cg_steps", "inner_lr", "inner_optimizer", "compile", "batching", "lam")
             if getattr(a, k) is not None}
    shared = {"query_batching": a.query_batching} if a.query_batching else {}
    res = profile(algs, a.rounds, a.warmup, imaml=extra, dataset=a.dataset, data_root=a.data_root, ways=a.ways, shots=a.shots,
                  meta_batch=a.meta_batch, filters=a.filters, device=a.device, **shared)
    title = (f"{a.dataset} {a.ways}-way {a.shots}-shot, meta-batch {a.meta_batch}, {a.device}, "
             f"{torch.get_num_threads()} thread(s), torch {torch.__version__}" + (f", iMAML {extra}" if extra else "")
             + (f", query {a.query_batching}" if a.query_batching else ""))
    lines, rows = table(res)
    print(title)
    print("\n".join(lines))
    out = Path(a.out)
    _write_csv(rows, out / "phases.csv")
    plot(rows, out / "phases.png", title)
    print(f"wrote {out / 'phases.csv'} and {out / 'phases.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
