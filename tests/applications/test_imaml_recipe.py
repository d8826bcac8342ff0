"""The official-code recipe (``--recipe imaml-dev``) and the inner-loop health statistics.

* its meta-gradient == the dense solution of its damped system ``((1 + c) I + H/(λ + δ)) g = v``
  at the point its procedure (plain SGD + one pull-back step) returns;
* its evaluation adapts with plain SGD (no proximal term);
* the health statistics separate a stable inner loop from an oscillating one.
"""

from __future__ import annotations

import pytest
import torch
from test_imaml_gradients import _flat, _mlp_problem, _unflat

from applications.imaml.algorithms import (
    LearnerConfig,
    MetaLearner,
    imaml_meta_gradient,
    inner_health,
)

DT = torch.float64


def _pullback_reference(learner: MetaLearner, theta: dict, xs: torch.Tensor, ys: torch.Tensor, lr: float, steps: int,
                        lam: float) -> dict:
    """K plain SGD steps then φ ← φ − lr·λ(φ − θ), written out independently."""
    phi = {k: v.detach().clone() for k, v in theta.items()}
    for _ in range(steps):
        p = {k: v.clone().requires_grad_() for k, v in phi.items()}
        g = torch.autograd.grad(learner.support_loss(p, xs, ys), list(p.values()))
        phi = {k: phi[k] - lr * gk for k, gk in zip(p, g)}
    return {k: phi[k] - lr * lam * (phi[k] - theta[k].detach()) for k in phi}


@pytest.mark.parametrize("c, delta", [(1.0, 10.0), (0.5, 0.2)])
def test_imaml_dev_meta_gradient_matches_dense_damped_system(c: float, delta: float) -> None:
    net, theta, batch = _mlp_problem()
    lam, lr, steps = 2.0, 0.05, 7
    cfg = LearnerConfig(algorithm="imaml", task="regression", recipe="imaml-dev", lam=lam, inner_lr=lr, inner_steps=steps,
                        cg_damping=c, lam_damping=delta, linsolve="minres", cg_steps=400, cg_tol=1e-14)
    learner = MetaLearner(net, cfg)
    res = imaml_meta_gradient(learner, theta, {}, batch)

    keys = list(theta)
    B = batch.num_tasks
    g_ref = 0
    for b in range(B):
        sx, sy, qx, qy = batch.support_x[b], batch.support_y[b], batch.query_x[b], batch.query_y[b]
        phi = _pullback_reference(learner, theta, sx, sy, lr, steps, lam)
        p = _flat(phi, keys)
        f_s = lambda v: learner.support_loss(_unflat(v, theta, keys), sx, sy)  # noqa: E731
        f_q = lambda v: learner.support_loss(_unflat(v, theta, keys), qx, qy)  # noqa: E731
        H = torch.autograd.functional.hessian(f_s, p)
        v = torch.autograd.functional.jacobian(f_q, p) / B
        A = (1 + c) * torch.eye(len(p), dtype=DT) + H / (lam + delta)
        g_ref = g_ref + torch.linalg.solve(A, v)
        # the forward returns exactly that point
        with torch.no_grad():
            got_phi = learner.layer(dict(theta), batch.support_x, batch.support_y, batched=True)
        torch.testing.assert_close(_flat({k: got_phi[k][b] for k in keys}, keys), p, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(_flat(res.grads, keys), g_ref, atol=1e-10, rtol=1e-8)


def test_imaml_dev_evaluates_with_plain_sgd() -> None:
    net, theta, batch = _mlp_problem()
    cfg = LearnerConfig(algorithm="imaml", task="regression", recipe="imaml-dev", lam=2.0, inner_lr=0.05, inner_steps=5)
    learner = MetaLearner(net, cfg)
    phi = learner.adapt(theta, {}, batch)
    for b in range(batch.num_tasks):
        ref = learner.sgd_adapt({k: v.detach() for k, v in theta.items()}, batch.support_x[b], batch.support_y[b])
        for k in theta:
            torch.testing.assert_close(phi[k][b], ref[k], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("bad", [dict(algorithm="maml"), dict(learn_lam=True, lam_min=0.1), dict(cg_damping=-1.0)])
def test_imaml_dev_bad_combinations_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        LearnerConfig(**{"algorithm": "imaml", "recipe": "imaml-dev", **bad})


@pytest.mark.parametrize("lr, stable", [(0.05, True), (0.8, False)])
def test_inner_health_separates_stable_from_oscillating(lr: float, stable: bool) -> None:
    """The MLP regression support loss: a small step converges, a huge one oscillates."""
    net, theta, batch = _mlp_problem()
    cfg = LearnerConfig(algorithm="imaml", task="regression", lam=1.0, inner_lr=lr, inner_steps=8, power_iters=20)
    learner = MetaLearner(net, cfg)
    res = imaml_meta_gradient(learner, theta, {}, batch)
    st = res.stats
    assert st == {**st, **inner_health(learner.layer.diagnostics.forward)}
    if stable:
        assert st["inner_grad_ratio"] < 0.5 and st["inner_monotone"] == 1.0 and st["inner_lr_curvature"] < 2
        assert st["inner_descent"] == 1.0
    else:
        assert st["inner_grad_ratio"] > 1 and st["inner_monotone"] < 0.5 and st["inner_lr_curvature"] > 2
        assert st["inner_descent"] < 0.5


@pytest.mark.parametrize("recipe", ["proximal", "imaml-dev"])
def test_batching_loop_equals_vmap(recipe: str) -> None:
    """--batching loop (one task at a time) gives the meta-gradient of --batching vmap."""
    from test_imaml_gradients import _conv_problem

    out = {}
    for batching in ("vmap", "loop"):
        net, theta, batch = _conv_problem()
        cfg = LearnerConfig(algorithm="imaml", recipe=recipe, lam=0.5, inner_steps=4, inner_lr=0.1, cg_steps=5,
                            linsolve="minres", batching=batching)
        out[batching] = imaml_meta_gradient(MetaLearner(net, cfg), theta, {}, batch)
    for k in out["vmap"].grads:
        torch.testing.assert_close(out["loop"].grads[k], out["vmap"].grads[k], atol=1e-10, rtol=1e-8)
    assert out["loop"].stats["inner_grad_ratio"] == pytest.approx(out["vmap"].stats["inner_grad_ratio"], rel=1e-8)
