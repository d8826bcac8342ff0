"""Learning λ, the strength of iMAML's proximal term, by its implicit gradient.

In `bilevel.Proximal` (implicit MAML, Rajeswaran et al. 2019) λ says how far adaptation
may move from θ. The backward's linear solve gives ∂loss/∂λ along with ∂loss/∂θ, so λ can
be meta-learned: λ = softplus(ρ), passed per call as `layer(theta, ..., lam=lam)`. On
linear regression tasks w ~ N(θ, s²I) with k points each (noise σ) the answer is known:
the posterior mean is the proximal solution for λ* = 2σ²/(k s²). Similar tasks (small s)
should learn a large λ (trust θ), diverse tasks a small one (trust the data).
"""

import torch
import torch.nn.functional as F

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import NewtonCG

torch.manual_seed(0)
d, k, sigma = 5, 5, 0.3
theta = torch.randn(d)  # the tasks' mean, given here: only λ is learned (θ: imaml_sinusoid.py)


def tasks(n, s):  # n tasks, each with k support and 20 query points
    w = theta + s * torch.randn(n, d)
    X = torch.randn(n, k + 20, d)
    y = (X @ w[:, :, None]).squeeze(-1) + sigma * torch.randn(n, k + 20)
    return X[:, :k], y[:, :k], X[:, k:], y[:, k:]


def mse(w, X, y):  # one task
    return ((X @ w - y) ** 2).mean()


# Quadratic in w: one Newton step with d CG steps is exact; so is the backward's CG(steps=d).
layer = bilevel.Proximal(mse, solver=NewtonCG(linsolve=CG(steps=d)), linsolve=CG(steps=d))


def meta_train(s):
    rho = torch.tensor(0.5413, requires_grad=True)  # softplus(0.5413) = 1.0
    opt = torch.optim.Adam([rho], lr=0.1)
    for _ in range(150):
        xs, ys, xq, yq = tasks(32, s)
        w = layer(theta, xs, ys, lam=F.softplus(rho), batched=True)  # λ > 0 by construction
        loss = torch.vmap(mse)(w, xq, yq).mean()  # query loss after adaptation
        opt.zero_grad()
        loss.backward()
        opt.step()
    return F.softplus(rho).item()


for s in (0.1, 1.0):
    print(f"task spread s = {s}: λ 1.00 -> {meta_train(s):.3g} after meta-training "
          f"(Bayes-optimal 2σ²/(k s²) = {2 * sigma**2 / (k * s**2):.3g})")
