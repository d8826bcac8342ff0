"""Wrapping a non-differentiable external solver as an implicit layer.

L2-regularised logistic regression is fitted by SciPy on NumPy arrays, which autograd
cannot see through. Subclassing `bilevel.ImplicitLayer` makes it differentiable anyway:
`solve` is the black box, `optimality` states in torch what the solution satisfies (the
training loss's gradient is zero) and the backward differentiates that condition
(implicit function theorem; Blondel et al. 2022, *Efficient and Modular Implicit
Differentiation*). The gradient of a validation loss with respect to the regularisation
strength is checked against finite differences that re-run SciPy. (For a torch objective,
`bilevel.Argmin(loss, solver=bilevel.solvers.ScipyMinimize())` does this in one line.)
"""

import numpy as np
import scipy.optimize
import torch
from scipy.special import expit

import bilevel
from bilevel.testing import check_implicit_grad


def loss(w, log_lam, X, y):  # torch: mean logistic loss + λ/2 ‖w‖²
    return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * log_lam.exp() * w @ w


class ScipyLogistic(bilevel.ImplicitLayer):
    symmetric = positive_definite = True  # the optimality map is a convex loss's gradient: CG applies

    def solve(self, w0, log_lam, X, y):  # the black box, on NumPy arrays
        Xn, yn, lam = X.numpy(), y.numpy(), float(np.exp(log_lam.item()))

        def f(w):
            z = -yn * (Xn @ w)
            g = -(Xn.T @ (yn * expit(z))) / len(yn) + lam * w
            return np.logaddexp(0, z).mean() + 0.5 * lam * w @ w, g

        res = scipy.optimize.minimize(f, w0.numpy(), jac=True, method="L-BFGS-B",
                                      options={"gtol": 1e-12, "ftol": 0, "maxiter": 1000})
        return torch.from_numpy(res.x)

    def optimality(self, w, log_lam, X, y):  # differentiable: ∇_w loss = 0 at the solution
        return torch.func.grad(loss)(w, log_lam, X, y)


torch.manual_seed(0)
X = torch.randn(100, 5, dtype=torch.float64)
y = torch.sign(X @ torch.randn(5, dtype=torch.float64) + 0.5 * torch.randn(100, dtype=torch.float64))
(X_tr, X_val), (y_tr, y_val), layer = X.split(60), y.split(60), ScipyLogistic()


def val_loss(log_lam):
    w = layer(torch.zeros(5, dtype=torch.float64), log_lam, X_tr, y_tr)
    return torch.nn.functional.softplus(-y_val * (X_val @ w)).mean()


log_lam = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
report = check_implicit_grad(val_loss, (log_lam,), solver_tol=1e-10, raise_exception=False)
print(f"d val_loss / d log λ = {torch.autograd.grad(val_loss(log_lam), log_lam)[0].item():.6f}; "
      f"vs finite differences through SciPy: {'OK' if report.ok else 'FAILED'} "
      f"(max relative error {report.max_rel_error:.1e})")
