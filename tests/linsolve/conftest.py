"""Shared fixtures of the linear-solver tests: seeded test systems and tree adapters.

The helpers are exposed through fixtures (not imported as a module) so that no test
module depends on ``sys.path`` or on the pytest import mode.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import Tensor

N = 16  # unknowns: a (16,) tensor, or {'w': (3, 4), 'b': (4,)}


class Systems:
    """Well-conditioned random systems from a seeded generator (built in float64)."""

    n = N
    # Accuracy of a solution against torch.linalg.solve (relative error), per dtype.  The
    # test systems have condition numbers <= 100 and the solvers run at their default
    # (dtype-derived) relative tolerance, eps**0.75, so the relative error is at most
    # cond * eps**0.75: ~2e-10 in float64 and ~6e-4 in float32.
    rtol = {torch.float64: 1e-8, torch.float32: 1e-3}

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def orthogonal(self, n: int) -> Tensor:
        q, _ = torch.linalg.qr(self.randn(n, n))
        return q

    def symmetric(self, eigenvalues: Tensor) -> Tensor:
        q = self.orthogonal(eigenvalues.numel())
        a = (q * eigenvalues) @ q.T
        return (a + a.T) / 2

    def spd(self, n: int = N, cond: float = 10.0) -> Tensor:
        """Symmetric positive definite, eigenvalues geometrically spread over [1, cond]."""
        return self.symmetric(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64))

    def indefinite(self, n: int = N, cond: float = 10.0) -> Tensor:
        """Symmetric indefinite: eigenvalues +-[1, cond] with both signs present."""
        mags = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
        signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
        return self.symmetric(mags * signs)

    def nonsymmetric(self, n: int = N, cond: float = 10.0, skew: float = 0.5) -> Tensor:
        """SPD part (eigenvalues in [1, cond]) plus a skew-symmetric part of 2-norm ``skew``:
        non-symmetric, non-singular (the symmetric part is positive definite)."""
        g = self.randn(n, n)
        k = g - g.T
        return self.spd(n, cond) + skew * k / torch.linalg.matrix_norm(k, ord=2)

    def neumann(self, n: int = N, radius: float = 0.4, symmetric: bool = False) -> Tensor:
        """``A = I - M`` with ``||M||_2 = radius < 1``: the series with alpha = 1 converges
        monotonically at rate ``radius``."""
        if symmetric:
            m = self.symmetric(radius * (2 * torch.rand(n, generator=self.gen, dtype=torch.float64) - 1))
            m = m * (radius / torch.linalg.matrix_norm(m, ord=2))
        else:
            g = self.randn(n, n)
            m = radius * g / torch.linalg.matrix_norm(g, ord=2)
        return torch.eye(n, dtype=torch.float64) - m

    def system(self, kind: str, n: int = N, cond: float = 10.0) -> Tensor:
        return {
            "spd": self.spd,
            "indefinite": self.indefinite,
            "nonsymmetric": self.nonsymmetric,
        }[kind](n, cond)


class Trees:
    """Views of a flat vector as a tensor or a dict tree, and dense matvecs on them.

    Written independently of ``bilevel._tree`` so that the tests do not rely on the
    helpers the solvers use.
    """

    kinds = ("tensor", "dict")

    @staticmethod
    def to_tree(flat: Tensor, kind: str, batched: bool = False) -> Any:
        if kind == "tensor":
            return flat.clone()
        lead = flat.shape[:1] if batched else ()
        w = flat[..., :12].reshape(*lead, 3, 4)
        b = flat[..., 12:16].reshape(*lead, 4)
        return {"w": w.clone(), "b": b.clone()}

    @staticmethod
    def from_tree(tree: Any, kind: str, batched: bool = False) -> Tensor:
        if kind == "tensor":
            return tree
        lead = tree["b"].shape[:1] if batched else ()
        return torch.cat([tree["w"].reshape(*lead, 12), tree["b"].reshape(*lead, 4)], dim=-1)

    @classmethod
    def matvec(cls, a: Tensor, kind: str, batched: bool = False) -> Callable[[Any], Any]:
        """``v -> A v`` on trees of ``kind`` (``a`` is (n, n), or (B, n, n) when batched)."""

        def mv(v: Any) -> Any:
            flat = cls.from_tree(v, kind, batched)
            return cls.to_tree((a @ flat.unsqueeze(-1)).squeeze(-1), kind, batched)

        return mv


@pytest.fixture
def systems() -> Systems:
    return Systems(seed=20240611)


@pytest.fixture
def trees() -> type[Trees]:
    return Trees
