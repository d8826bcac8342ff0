"""The lean path of the fixed-step first-order solvers (``rtol=None, monitor=False``).

It must take exactly the iterates of the monitored path (the same arithmetic, fused), cost
``steps`` gradients and nothing at the returned point, and still refuse NaN/Inf, naming the
iteration and the tasks, once at the end.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bilevel import NonFiniteError, Status
from bilevel.solvers import GradientDescent
from tests import registry

DT = torch.float64


def _quad(x, h, b):
    return 0.5 * x @ h @ x - b @ x


def _tree_quad(x, h, b):
    return _quad(torch.cat([x["a"], x["b"].reshape(-1)]), h, b)


def _problem(d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]
    h = q @ torch.diag(torch.linspace(0.1, 1.0, d, dtype=DT)) @ q.T
    return h, torch.randn(d, generator=g, dtype=DT)


# Every configuration of the lean loop (the test problems' curvature is at most 1).
SOLVERS = registry.solvers("inner", tags={"lean"})
CLASSES = registry.classes("inner", tags={"lean"})


@pytest.mark.parametrize("solver", SOLVERS)
def test_lean_takes_the_monitored_iterates(solver) -> None:
    steps = solver.steps
    h, b = _problem()
    x0 = {"a": torch.randn(2, dtype=DT), "b": torch.randn(2, 2, dtype=DT)}
    keep = {k: v.clone() for k, v in x0.items()}
    lean = solver(_tree_quad, x0, h, b)
    full = dataclasses.replace(solver, monitor=True)(_tree_quad, x0, h, b)
    for k in x0:
        torch.testing.assert_close(lean.x[k], full.x[k], rtol=1e-14, atol=1e-14)
        assert torch.equal(x0[k], keep[k])  # the initial point is never written
    assert lean.status is Status.COMPLETED and lean.iterations == steps
    # Lean: steps gradients, nothing at the returned point; monitored: one more.
    assert lean.n_grad == steps and full.n_grad == steps + 1
    assert lean.grad_norm is None and lean.value is None and lean.value_monotone is None
    assert full.grad_norm is not None and full.value_monotone is not None


@pytest.mark.parametrize("solver", SOLVERS)
def test_lean_batched_equals_single_tasks(solver) -> None:
    probs = [_problem(seed=s) for s in range(3)]
    hs, bs = torch.stack([p[0] for p in probs]), torch.stack([p[1] for p in probs])
    x0 = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(9))
    batched = torch.func.vmap(_quad)
    res = solver(batched, x0, hs, bs, batched=True)
    assert res.task_status == (Status.COMPLETED,) * 3 and res.task_iterations.tolist() == [solver.steps] * 3
    for i in range(3):
        one = solver(_quad, x0[i], hs[i], bs[i])
        torch.testing.assert_close(res.x[i], one.x, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("cls", CLASSES)
def test_lean_nonfinite_gradient_named_once_at_the_end(cls) -> None:
    # sqrt is finite at 0 but its gradient is not: the first gradient (iteration 0) is bad.
    with pytest.raises(NonFiniteError, match=r"gradient became non-finite at iteration 0"):
        cls(lr=0.1, steps=3)(lambda x: torch.sqrt(x).sum(), torch.zeros(2, dtype=DT))


def test_lean_nonfinite_value_names_iteration_and_tasks() -> None:
    # Task 1 diverges (curvature 30 with lr 0.1 multiplies x by -2 per step) until
    # exp(|x|) overflows; task 0 converges.  The error names task 1 only.
    def obj(x, c):
        return (0.5 * c * x * x).sum() + torch.exp(x.abs()).sum()

    x0 = torch.ones(2, 1, dtype=DT)
    c = torch.tensor([1.0, 30.0], dtype=DT)
    with pytest.raises(NonFiniteError, match=r"non-finite at iteration \d+ for task\(s\) \[1\]"):
        GradientDescent(lr=0.1, steps=400)(torch.func.vmap(obj), x0, c, batched=True)


def test_monitor_must_be_bool() -> None:
    with pytest.raises(ValueError, match="monitor"):
        GradientDescent(lr=0.1, steps=1, monitor=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", CLASSES)
def test_lean_has_no_host_sync_per_step(cls) -> None:
    # Each tensor-to-Python read is a device sync on an accelerator: the lean loop makes a
    # constant number of them (at the end), whatever the number of steps.
    names = ("__bool__", "item", "tolist", "__int__", "__float__")
    saved = {k: getattr(torch.Tensor, k) for k in names}
    counts = {"n": 0}

    def wrap(fn):
        def inner(self, *a, **kw):
            counts["n"] += 1
            return fn(self, *a, **kw)

        return inner

    h, b = _problem()
    reads = {}
    try:
        for k in names:
            setattr(torch.Tensor, k, wrap(saved[k]))
        for steps in (2, 12):
            counts["n"] = 0
            cls(lr=0.1, steps=steps)(torch.func.vmap(_quad), torch.zeros(2, 6, dtype=DT),
                                     h.expand(2, 6, 6), b.expand(2, 6), batched=True)
            reads[steps] = counts["n"]
    finally:
        for k, fn in saved.items():
            setattr(torch.Tensor, k, fn)
    assert reads[2] == reads[12], reads
