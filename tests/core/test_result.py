"""Building and stacking results (``bilevel._result``): per-task fields, histories."""

from __future__ import annotations

import torch

from bilevel import SolverResult, Status
from bilevel._result import code, result_from_codes, stack_results


def test_stacked_histories_are_padded_with_each_task_s_last_value() -> None:
    a = SolverResult(x=None, status=Status.SUCCESS, iterations=2, grad_norm=torch.tensor(0.1),
                     residual_history=torch.tensor([4.0, 1.0, 0.1]))
    b = SolverResult(x=None, status=Status.MAX_ITERATIONS, iterations=4, grad_norm=torch.tensor(0.5),
                     residual_history=torch.tensor([3.0, 2.0, 1.0, 0.7, 0.5]))
    s = stack_results([a, b], x=None)
    assert s.task_status == (Status.SUCCESS, Status.MAX_ITERATIONS) and s.iterations == 4
    torch.testing.assert_close(s.grad_norm, torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(s.residual_history, torch.tensor([[4.0, 3.0], [1.0, 2.0], [0.1, 1.0], [0.1, 0.7], [0.1, 0.5]]))


def test_a_history_keeps_its_shape_and_drops_a_last_step_where_nothing_moved() -> None:
    # One task, 0 iterations: a history of one entry stays a vector (it is not a scalar field).
    one = result_from_codes(SolverResult, None, torch.tensor([code(Status.SUCCESS)]), torch.tensor([0]), False,
                            grad_norm=torch.tensor([0.5]), residual_history=torch.tensor([0.5]))
    assert one.grad_norm.shape == () and one.residual_history.shape == (1,)
    # Three steps run, two iterations counted (the last step turned the task non-finite).
    three = result_from_codes(SolverResult, None, torch.tensor([code(Status.NONFINITE)]), torch.tensor([2]), False,
                              residual_history=torch.tensor([3.0, 2.0, 1.0, 1.0]))
    torch.testing.assert_close(three.residual_history, torch.tensor([3.0, 2.0, 1.0]))
    batched = result_from_codes(SolverResult, None, torch.tensor([code(Status.SUCCESS)] * 2), torch.tensor([1, 2]), True,
                                residual_history=torch.tensor([[2.0, 3.0], [0.5, 2.0], [0.5, 1.0], [0.5, 1.0]]))
    assert batched.residual_history.shape == (3, 2)
