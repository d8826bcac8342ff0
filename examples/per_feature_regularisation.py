"""Learning one L2 strength per feature by implicit differentiation.

Ridge regression w*(ρ) = argmin_w MSE_train(w) + ½ Σ_j e^{ρ_j} w_j² with one strength
λ_j = e^{ρ_j} per feature: too many hyperparameters for a grid search, but the validation
loss is differentiable in ρ through the inner argmin (implicit function theorem:
Bengio 2000, *Gradient-based optimization of hyperparameters*; Pedregosa 2016, *HOAG*).
Half the features do not enter the target; gradient descent on the validation loss learns
to penalise them far more than the informative ones.
"""

import torch

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import NewtonCG

torch.manual_seed(0)
d, informative = 20, 10
w_true = torch.cat([torch.randn(informative), torch.zeros(d - informative)]).double()


def data(n):
    X = torch.randn(n, d, dtype=torch.float64)
    return X, X @ w_true + 0.5 * torch.randn(n, dtype=torch.float64)


(X_tr, y_tr), (X_val, y_val) = data(30), data(200)  # few training points: overfitting


def train_loss(w, rho, X, y):  # ρ is an argument, so it receives the implicit gradient
    return ((X @ w - y) ** 2).mean() + 0.5 * (rho.exp() * w**2).sum()


# Quadratic in w: a Newton step whose CG runs d steps is exact. The backward solves
# H u = v with the default CG, to a tolerance.
layer = bilevel.Argmin(train_loss, solver=NewtonCG(linsolve=CG(steps=d)))


def val_loss(rho):
    w = layer(torch.zeros(d, dtype=torch.float64), rho, X_tr, y_tr)  # w0: the start only
    return ((X_val @ w - y_val) ** 2).mean()


rho = torch.full((d,), -2.0, dtype=torch.float64, requires_grad=True)  # λ_j = 0.14 for all
before = val_loss(rho).item()
opt = torch.optim.Adam([rho], lr=0.2)
for _ in range(100):
    opt.zero_grad()
    val_loss(rho).backward()
    opt.step()
lam = rho.detach().exp()
print(f"validation MSE: {before:.3f} before, {val_loss(rho).item():.3f} after; median λ: "
      f"informative features {lam[:informative].median():.3g}, "
      f"irrelevant {lam[informative:].median():.3g}")
