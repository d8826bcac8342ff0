"""Meta-gradients of the iMAML application against independent references (float64).

* batched (one Proximal / one vmap over the meta-batch) == mean of one-task-at-a-time,
  with the conv net and batch norm, for every algorithm;
* iMAML == dense ``(I + H/λ)^{-1} ∇L_query(φ*)`` built with ``torch.autograd.functional.hessian``;
* learned λ: ``dℓ/dρ_j`` == dense ``−Σ (φ*_j − θ_j) u_j · dλ_j/dρ_j``;
* MAML == reverse mode through an explicit unrolled loop (``torch.autograd.grad``,
  ``create_graph=True``); first-order MAML == query gradient at the adapted φ;
  Reptile == θ − mean φ.
"""

from __future__ import annotations

import math

import pytest
import torch

import bilevel
from applications.imaml.algorithms import LearnerConfig, MetaLearner, imaml_meta_gradient
from applications.imaml.models import MLP, ConvNet
from applications.imaml.tasks import TaskBatch
from bilevel.linsolve import CG
from bilevel.solvers import NewtonCG
from bilevel.tree import tree_ravel, tree_unravel

DT = torch.float64


def _conv_problem(B: int = 3, ways: int = 3, shots: int = 2, queries: int = 2) -> tuple[ConvNet, dict, TaskBatch]:
    torch.manual_seed(0)
    net = ConvNet(1, ways, filters=4, strided=True, image_size=12).to(DT)
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    y_s = torch.arange(ways).repeat_interleave(shots).expand(B, -1).clone()
    y_q = torch.arange(ways).repeat_interleave(queries).expand(B, -1).clone()
    batch = TaskBatch(
        torch.randn(B, ways * shots, 1, 12, 12, dtype=DT), y_s, torch.randn(B, ways * queries, 1, 12, 12, dtype=DT), y_q
    )
    return net, theta, batch


def _task(batch: TaskBatch, b: int) -> TaskBatch:
    return TaskBatch(batch.support_x[b : b + 1], batch.support_y[b : b + 1], batch.query_x[b : b + 1], batch.query_y[b : b + 1])


@pytest.mark.parametrize("algorithm", ["imaml", "imaml-hf", "maml", "fomaml", "reptile"])
def test_batched_meta_gradient_equals_per_task_loop(algorithm: str) -> None:
    net, theta, batch = _conv_problem()
    learn_lam = algorithm == "imaml"
    cfg = LearnerConfig(algorithm=algorithm, inner_steps=4 if algorithm != "imaml-hf" else 2, inner_lr=0.1, lam=2.0,
                        learn_lam=learn_lam, cg_steps=5, hf_cg_steps=3)
    learner = MetaLearner(net, cfg)
    rho = {k: v.requires_grad_() for k, v in learner.init_rho(theta).items()}
    full = learner.meta_gradient(theta, rho, batch)
    B = batch.num_tasks
    per = [learner.meta_gradient(theta, rho, _task(batch, b)) for b in range(B)]
    for k in theta:
        ref = sum(p.grads[k] for p in per) / B
        torch.testing.assert_close(full.grads[k], ref, atol=1e-10, rtol=1e-8)
    for k in rho:
        ref = sum(p.rho_grads[k] for p in per) / B
        torch.testing.assert_close(full.rho_grads[k], ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(full.loss, sum(p.loss for p in per) / B, atol=1e-12, rtol=1e-10)
    assert any(float(g.abs().max()) > 0 for g in full.grads.values())


# ---------------------------------------------------------------------------------------
# tiny MLP regression problem (dense references)
# ---------------------------------------------------------------------------------------
def _mlp_problem(B: int = 2, K: int = 6, Q: int = 5) -> tuple[MLP, dict, TaskBatch]:
    torch.manual_seed(3)
    net = MLP(1, (6, 5), 1).to(DT)
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    xs, xq = torch.rand(B, K, 1, dtype=DT) * 4 - 2, torch.rand(B, Q, 1, dtype=DT) * 4 - 2
    amp = torch.tensor([0.5, 1.0], dtype=DT)[:B].view(B, 1, 1)
    batch = TaskBatch(xs, amp * torch.sin(xs), xq, amp * torch.sin(xq))
    return net, theta, batch


def _flat(d: dict, keys: list[str]) -> torch.Tensor:
    """The leaves of ``d`` in the order ``keys``, as one vector."""
    return tree_ravel({k: d[k] for k in keys})


def _unflat(v: torch.Tensor, like: dict, keys: list[str]) -> dict:
    """Inverse of :func:`_flat`, shapes from ``like``."""
    return tree_unravel({k: like[k] for k in keys}, v)



def _tight_layer(learner: MetaLearner, lam: float) -> bilevel.Proximal:
    return bilevel.Proximal(
        learner.support_loss, lam=lam, solver=NewtonCG(rtol=1e-13, maxiter=200), linsolve=CG(rtol=1e-13, maxiter=1000),
        on_failure="raise",
    )


@pytest.mark.parametrize("learn_lam", [False, True])
def test_imaml_meta_gradient_matches_dense_reference(learn_lam: bool) -> None:
    net, theta, batch = _mlp_problem()
    lam = 4.0
    learner = MetaLearner(net, LearnerConfig(algorithm="imaml", task="regression", lam=lam, learn_lam=learn_lam, lam_min=0.5))
    learner.layer = _tight_layer(learner, lam)
    rho = {k: v.requires_grad_() for k, v in learner.init_rho(theta).items()}
    if learn_lam:  # distinct λ per layer
        with torch.no_grad():
            for i, r in enumerate(rho.values()):
                r.add_(0.3 * i - 0.6)
    res = imaml_meta_gradient(learner, theta, rho, batch)

    keys = list(theta)
    th = _flat({k: v.detach() for k, v in theta.items()}, keys)
    lam_tree = learner.lam_value({k: r.detach() for k, r in rho.items()})
    lam_vec = torch.cat([torch.full((theta[k].numel(),), float(lam_tree[k] if learn_lam else lam_tree), dtype=DT) for k in keys])
    B = batch.num_tasks
    g_ref = torch.zeros_like(th)
    dlam_ref = torch.zeros_like(th)
    with torch.no_grad():
        phi = learner.layer(dict(theta), batch.support_x, batch.support_y, lam=lam_tree, batched=True)
    for b in range(B):
        p = _flat({k: phi[k][b] for k in keys}, keys)
        sx, sy, qx, qy = batch.support_x[b], batch.support_y[b], batch.query_x[b], batch.query_y[b]
        f_s = lambda v: learner.support_loss(_unflat(v, theta, keys), sx, sy)  # noqa: E731
        f_q = lambda v: learner.support_loss(_unflat(v, theta, keys), qx, qy)  # noqa: E731
        # φ* really is the proximal minimiser
        g_in = torch.autograd.functional.jacobian(f_s, p) + lam_vec * (p - th)
        assert float(g_in.abs().max()) < 1e-9
        H = torch.autograd.functional.hessian(f_s, p)
        assert float(torch.linalg.eigvalsh(H + torch.diag(lam_vec))[0]) > 0  # well-posed system
        v = torch.autograd.functional.jacobian(f_q, p) / B
        if not learn_lam:  # the paper's form, Eq. (6)
            g_ref += torch.linalg.solve(torch.eye(len(p), dtype=DT) + H / lam, v)
        u = torch.linalg.solve(H + torch.diag(lam_vec), v)
        if learn_lam:
            g_ref += lam_vec * u
        dlam_ref += -(p - th) * u
    got = _flat(res.grads, keys)
    torch.testing.assert_close(got, g_ref, atol=1e-9, rtol=1e-7)
    if learn_lam:
        per_layer = _unflat(dlam_ref, theta, keys)
        for k in keys:
            dl_drho = torch.sigmoid(rho[k].detach())  # λ = lam_min + softplus(ρ)
            torch.testing.assert_close(res.rho_grads[k], per_layer[k].sum() * dl_drho, atol=1e-9, rtol=1e-7)


def _explicit_adapt(learner: MetaLearner, theta: dict, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> dict:
    phi = dict(theta)
    for _ in range(learner.config.inner_steps):
        loss = learner.support_loss(phi, x, y)
        gs = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
        phi = {k: phi[k] - learner.config.inner_lr * g for k, g in zip(phi, gs)}
    return phi


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_baseline_meta_gradients_match_explicit_loops(algorithm: str) -> None:
    net, theta, batch = _mlp_problem()
    learner = MetaLearner(net, LearnerConfig(algorithm=algorithm, task="regression", inner_steps=3, inner_lr=0.05))
    res = learner.meta_gradient(theta, {}, batch)
    B = batch.num_tasks
    ref = {k: torch.zeros_like(v) for k, v in theta.items()}
    for b in range(B):
        sx, sy, qx, qy = batch.support_x[b], batch.support_y[b], batch.query_x[b], batch.query_y[b]
        if algorithm == "maml":
            phi = _explicit_adapt(learner, theta, sx, sy, create_graph=True)
            gs = torch.autograd.grad(learner.support_loss(phi, qx, qy) / B, list(theta.values()))
        else:
            th = {k: v.detach().requires_grad_() for k, v in theta.items()}
            phi = {k: v.detach() for k, v in _explicit_adapt(learner, th, sx, sy, create_graph=False).items()}
            if algorithm == "fomaml":
                phi = {k: v.requires_grad_() for k, v in phi.items()}
                gs = torch.autograd.grad(learner.support_loss(phi, qx, qy) / B, list(phi.values()))
            else:
                gs = tuple((theta[k].detach() - phi[k]) / B for k in theta)
        for k, g in zip(theta, gs):
            ref[k] += g
    for k in theta:
        torch.testing.assert_close(res.grads[k], ref[k], atol=1e-12, rtol=1e-9)
    if algorithm == "maml":  # second order really differs from first order here
        fo = MetaLearner(net, LearnerConfig(algorithm="fomaml", task="regression", inner_steps=3, inner_lr=0.05))
        diff = max(float((fo.meta_gradient(theta, {}, batch).grads[k] - res.grads[k]).abs().max()) for k in theta)
        assert diff > 1e-6


def test_learned_lam_initial_value_and_floor() -> None:
    net, theta, _ = _mlp_problem()
    learner = MetaLearner(net, LearnerConfig(algorithm="imaml", task="regression", lam=2.0, learn_lam=True, lam_min=0.25))
    rho = learner.init_rho(theta)
    assert set(rho) == set(theta) and all(r.dim() == 0 for r in rho.values())
    for v in learner.lam_value(rho).values():
        assert math.isclose(float(v), 2.0, rel_tol=1e-12)
    low = learner.lam_value({k: torch.tensor(-50.0, dtype=DT) for k in rho})
    assert all(0.25 <= float(v) < 0.25 + 1e-12 for v in low.values())
    with pytest.raises(ValueError, match="lam_min"):
        LearnerConfig(algorithm="imaml", lam=1.0, learn_lam=True, lam_min=1.0)
    with pytest.raises(ValueError, match="unknown algorithm"):
        LearnerConfig(algorithm="protonet")


def test_classification_stats_and_accuracy() -> None:
    net, theta, batch = _conv_problem()
    learner = MetaLearner(net, LearnerConfig(algorithm="imaml", inner_steps=3, inner_lr=0.1, lam=2.0))
    res = learner.meta_gradient(theta, {}, batch)
    assert 0.0 <= float(res.metric) <= 1.0
    assert {"inner_grad_norm", "cg_residual", "cg_iterations", "cg_failures", "lam_mean"} <= set(res.stats)
    assert res.stats["cg_iterations"] <= 5
    losses, acc = learner.evaluate(theta, {}, batch)
    assert losses.shape == (batch.num_tasks,) and acc.shape == (batch.num_tasks,)
