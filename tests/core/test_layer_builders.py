"""The built-in layers are thin builders of one frozen Problem per call (issue 8)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bilevel
from bilevel._problem import RootProblem


def _layers():
    quad = lambda x, a: 0.5 * (x**2).sum() - (a * x).sum()  # noqa: E731
    return [
        bilevel.Argmin(quad),
        bilevel.Proximal(lambda p, a: (p * a).sum() ** 2, lam=1.0),
        bilevel.FixedPoint(lambda x, a: 0.5 * x + a),
        bilevel.custom_root(lambda x, a: x - a)(lambda x0, a: a.clone()),
    ]


@pytest.mark.parametrize("layer", _layers(), ids=lambda layer: type(layer).__name__)
def test_builtin_layers_are_implicit_layers_without_bypassed_methods(layer) -> None:
    assert isinstance(layer, bilevel.ImplicitLayer)
    # No solve/optimality methods that the layer's own __call__ would bypass.
    assert not hasattr(layer, "solve") and not hasattr(layer, "optimality")


@pytest.mark.parametrize("layer", _layers(), ids=lambda layer: type(layer).__name__)
def test_each_call_hands_one_frozen_problem_to_the_core(monkeypatch: pytest.MonkeyPatch, layer) -> None:
    import bilevel._layer_base as layers_mod

    seen: list[RootProblem] = []
    real = layers_mod.implicit_apply

    def spy(problem, **config):
        seen.append(problem)
        return real(problem, **config)

    monkeypatch.setattr(layers_mod, "implicit_apply", spy)
    a = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    x0 = torch.zeros(2, dtype=torch.float64)
    out = layer(x0 if not isinstance(layer, bilevel.Proximal) else a, a)
    out.sum().backward()
    assert len(seen) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].batched = True  # type: ignore[misc]
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_a_user_subclass_must_implement_solve_and_optimality() -> None:
    class Half(bilevel.ImplicitLayer):
        def solve(self, x0, a):
            return a.detach() / 2

    with pytest.raises(TypeError, match="optimality"):
        Half()  # type: ignore[abstract]


def test_configuration_is_validated_once_at_construction() -> None:
    with pytest.raises(ValueError, match="on_failure"):
        bilevel.Argmin(lambda x: (x**2).sum(), on_failure="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hvp"):
        bilevel.custom_root(lambda x: x, hvp="sideways")(lambda x0: x0)  # type: ignore[arg-type]
