"""iMAML on sinusoid regression, from scratch.

Implicit MAML (Rajeswaran, Finn, Kakade & Levine, *Meta-Learning with Implicit Gradients*,
NeurIPS 2019) meta-learns an initialisation θ of a small MLP so that adapting it to 10
points of a new sine wave fits that wave. Adaptation is the proximal problem
φ* = argmin_φ MSE_support(φ) + λ/2 ‖φ − θ‖², solved by plain gradient steps; the
meta-gradient comes from the implicit function theorem (a few Krylov steps on
(H + λI) u = v), not from backpropagating through the steps. A meta-batch is one computation.
"""

import math

import torch

import bilevel
from bilevel.linsolve import MINRES
from bilevel.solvers import GradientDescent

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                          torch.nn.ReLU(), torch.nn.Linear(40, 1))
theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}


def tasks(n, k=10):
    """n sine waves (amplitude 0.1-5, phase 0-π): k support and k query points each."""
    amp, phase = torch.rand(n, 1, 1) * 4.9 + 0.1, torch.rand(n, 1, 1) * math.pi
    x = torch.rand(n, 2 * k, 1) * 10 - 5
    y = amp * torch.sin(x + phase)
    return x[:, :k], y[:, :k], x[:, k:], y[:, k:]


def mse(params, x, y):  # written for one task; the layer vmaps it over the meta-batch
    return ((torch.func.functional_call(net, params, (x,)) - y) ** 2).mean()


# Fixed budgets, as in the paper (16 inner steps, 5 Krylov steps): status COMPLETED, no
# warning. MINRES, not CG: a ReLU net's support loss can have curvature below −λ.
layer = bilevel.Proximal(mse, lam=1.0, solver=GradientDescent(lr=0.02, steps=16),
                         linsolve=MINRES(steps=5))


def query_mse(xs, ys, xq, yq):
    phi = layer(theta, xs, ys, batched=True)  # every leaf of φ* gets a leading task dimension
    return torch.func.vmap(mse)(phi, xq, yq).mean()


test = tasks(200)  # held-out tasks: the score is the query MSE after adapting to the support
before = query_mse(*test).item()
opt = torch.optim.Adam(theta.values(), lr=3e-3)
for _ in range(150):
    opt.zero_grad()
    query_mse(*tasks(8)).backward()  # the implicit meta-gradient of a meta-batch of 8 tasks
    opt.step()
print(f"query MSE after adaptation: {before:.3f} before meta-training, "
      f"{query_mse(*test).item():.3f} after")
