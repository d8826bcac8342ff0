"""Issue 9, item 6: a zero gradient is not a minimum.  Newton-CG started at a maximum or a
saddle must not report SUCCESS; GD/Adam report it when asked (check_minimum=True)."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel.solvers import Adam, GradientDescent, NewtonCG

DT = torch.float64


def _quad(x, h):
    return 0.5 * x @ h @ x


MAXIMUM = torch.diag(torch.tensor([-1.0, -2.0, -3.0], dtype=DT))
SADDLE = torch.diag(torch.tensor([1.0, 2.0, -0.5], dtype=DT))
MINIMUM = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))


@pytest.mark.parametrize("h", [MAXIMUM, SADDLE], ids=["maximum", "saddle"])
def test_newton_cg_started_at_a_stationary_non_minimum_does_not_claim_success(h) -> None:
    res = NewtonCG()(_quad, torch.zeros(3, dtype=DT), h)
    assert res.status is Status.NOT_A_MINIMUM and not res.success


def test_newton_cg_at_a_minimum_still_succeeds() -> None:
    res = NewtonCG()(_quad, torch.zeros(3, dtype=DT), MINIMUM)
    assert res.status is Status.SUCCESS


def test_newton_cg_batched_marks_only_the_bad_tasks() -> None:
    hs = torch.stack([MINIMUM, SADDLE, MAXIMUM])
    res = NewtonCG()(torch.func.vmap(_quad), torch.zeros(3, 3, dtype=DT), hs, batched=True)
    assert res.task_status == (Status.SUCCESS, Status.NOT_A_MINIMUM, Status.NOT_A_MINIMUM)


@pytest.mark.parametrize("cls", [GradientDescent, Adam])
@pytest.mark.parametrize("monitor", [False, True])
def test_first_order_solvers_check_when_asked(cls, monitor: bool) -> None:
    kw = dict(lr=0.1, steps=5, monitor=monitor)
    x0 = torch.zeros(3, dtype=DT)
    assert cls(**kw)(_quad, x0, SADDLE).status is Status.COMPLETED  # not asked: not checked
    assert cls(**kw, check_minimum=True)(_quad, x0, SADDLE).status is Status.NOT_A_MINIMUM
    assert cls(**kw, check_minimum=True)(_quad, x0, MINIMUM).status is Status.COMPLETED
