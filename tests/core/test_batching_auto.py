"""``batched=True`` / ``"auto"``: a per-task loop on the CPU for tasks of 64 or more
examples, vmap below (the rule measured in benchmarks/metastep.py); same results."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent

DT = torch.float64


class Recording:
    """GradientDescent that records whether it was called batched (vmap) or per task (loop)."""

    supports_batched = True

    def __init__(self) -> None:
        self.inner = GradientDescent(lr=0.1, steps=30)
        self.calls: list[bool] = []

    def __call__(self, objective, x0, *args, batched: bool = False):  # type: ignore[no-untyped-def]
        self.calls.append(batched)
        return self.inner(objective, x0, *args, batched=batched)


def _loss(p, x, y):
    return ((x @ p - y) ** 2).mean()


@pytest.mark.parametrize("examples, expect_loop", [(5, False), (63, False), (64, True), (100, True)])
@pytest.mark.parametrize("batched", [True, "auto"])
def test_auto_picks_the_loop_for_large_tasks_on_the_cpu(examples: int, expect_loop: bool, batched) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, examples, 4, generator=g, dtype=DT), torch.randn(3, examples, generator=g, dtype=DT)
    solver = Recording()
    layer = bilevel.Proximal(_loss, 1.0, solver=solver, linsolve=CG(rtol=1e-12, maxiter=50))
    th = torch.zeros(4, dtype=DT, requires_grad=True)
    phi = layer(th, x, y, batched=batched)
    assert solver.calls == ([False] * 3 if expect_loop else [True])
    (ga,) = torch.autograd.grad((phi**2).sum(), th)
    ref_solver = Recording()
    ref = bilevel.Proximal(_loss, 1.0, solver=ref_solver, linsolve=CG(rtol=1e-12, maxiter=50))
    phi_v = ref(th, x, y, batched="vmap")
    (gv,) = torch.autograd.grad((phi_v**2).sum(), th)
    torch.testing.assert_close(phi, phi_v, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ga, gv, rtol=1e-10, atol=1e-12)
