"""The library's one Hessian-vector product and its one curvature estimate, against dense references.

``bilevel._autodiff.hessian_operator`` is the product the inner solvers' minimum check,
``bilevel.hessian_extremes`` and the backward's symmetric operator are built on; these tests
compare it with ``torch.func.hessian`` directly (a tree of unknowns, per task when batched,
inside and outside a ``torch.func`` transform), and the batched Lanczos estimate with
``torch.linalg.eigvalsh`` per task.
"""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel._autodiff import hessian_operator, hvp
from bilevel._tree import tree_ravel, tree_unravel

DT = torch.float64
B, N_W, N_B = 3, 4, 2  # tasks; unknowns {"w": (4,), "b": (2,)}: 6 per task


def _data(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {"w": torch.randn(B, N_W, generator=g, dtype=DT), "b": torch.randn(B, N_B, generator=g, dtype=DT)}
    a = torch.randn(B, N_W, N_W, generator=g, dtype=DT)
    c = torch.randn(B, N_B, generator=g, dtype=DT)
    return x, a, c


def objective(x: dict[str, torch.Tensor], a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One task's non-quadratic objective coupling the two leaves (its Hessian depends on x)."""
    w, b = x["w"], x["b"]
    return torch.log1p((a @ w) ** 2).sum() + (b * c).sum() ** 2 + (w[:N_B] * b).sin().sum() + 0.5 * (w @ w)


def dense_hessian(x: dict[str, torch.Tensor], a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One task's Hessian over the raveled unknowns, by torch.func.hessian."""
    return torch.func.hessian(lambda v: objective(tree_unravel(x, v), a, c))(tree_ravel(x))


def _one(x: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i] for k, v in x.items()}


def test_hessian_operator_is_the_dense_hessian_on_a_tree():
    x, a, c = _data()
    x1, a1, c1 = _one(x, 0), a[0], c[0]
    H = dense_hessian(x1, a1, c1)
    assert not torch.allclose(H, torch.diag(torch.diagonal(H)))  # the leaves are coupled
    op = hessian_operator(objective, x1, (a1, c1))
    for j in range(H.shape[0]):  # every column: H e_j
        e = torch.zeros(H.shape[0], dtype=DT)
        e[j] = 1.0
        torch.testing.assert_close(tree_ravel(op(tree_unravel(x1, e))), H[:, j], rtol=1e-12, atol=1e-12)
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tree_ravel(hvp(objective, x1, tree_unravel(x1, v), (a1, c1))), H @ v,
                               rtol=1e-12, atol=1e-12)


def test_batched_hessian_operator_is_block_diagonal():
    x, a, c = _data(1)
    v = {k: torch.randn_like(t) for k, t in x.items()}
    out = hessian_operator(lambda z, a_, c_: torch.vmap(objective)(z, a_, c_), x, (a, c), batched=True)(v)
    for i in range(B):
        H = dense_hessian(_one(x, i), a[i], c[i])
        torch.testing.assert_close(tree_ravel(_one(out, i)), H @ tree_ravel(_one(v, i)), rtol=1e-12, atol=1e-12)


def test_hessian_operator_inside_a_transform_is_the_dense_hessian():
    # Under torch.func (here vmap over tasks of a per-task operator, as in a vmapped layer)
    # the product is forward-over-reverse; the same numbers.
    x, a, c = _data(2)
    v = {k: torch.randn_like(t) for k, t in x.items()}

    def product(x1, a1, c1, v1):
        return hessian_operator(objective, x1, (a1, c1))(v1)

    out = torch.vmap(product)(x, a, c, v)
    for i in range(B):
        H = dense_hessian(_one(x, i), a[i], c[i])
        torch.testing.assert_close(tree_ravel(_one(out, i)), H @ tree_ravel(_one(v, i)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [N_W + N_B, 40])
def test_batched_hessian_extremes_match_eigvalsh_per_task(steps):
    x, a, c = _data(3)
    lo, hi = bilevel.hessian_extremes(lambda z, a_, c_: torch.vmap(objective)(z, a_, c_), x, a, c,
                                      batched=True, steps=steps)
    assert lo.shape == hi.shape == (B,) and lo.dtype == hi.dtype == DT
    for i in range(B):
        eig = torch.linalg.eigvalsh(dense_hessian(_one(x, i), a[i], c[i]))
        torch.testing.assert_close(lo[i], eig[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(hi[i], eig[-1], rtol=1e-9, atol=1e-9)


def test_batched_hessian_extremes_with_few_steps_stay_inside_each_spectrum():
    x, a, c = _data(4)
    lo, hi = bilevel.hessian_extremes(lambda z, a_, c_: torch.vmap(objective)(z, a_, c_), x, a, c,
                                      batched=True, steps=3)
    for i in range(B):
        eig = torch.linalg.eigvalsh(dense_hessian(_one(x, i), a[i], c[i]))
        assert eig[0] - 1e-9 <= lo[i] <= hi[i] <= eig[-1] + 1e-9
