"""Checking your own implicit layer with `bilevel.testing.check_implicit_grad`.

An implicit layer's forward and backward are separate code: the solver finds x*, the
backward differentiates the optimality condition you wrote. If the two disagree (a wrong
sign, a missing term), the forward is still right and only the gradient is wrong, silently.
`check_implicit_grad` compares the gradient with central finite differences that re-solve
the inner problem (in the spirit of `torch.autograd.gradcheck`). Here a correct layer
passes and the same layer with a planted sign error in `optimality` fails.
"""

import torch

import bilevel
from bilevel.testing import check_implicit_grad


class Ridge(bilevel.ImplicitLayer):
    """x*(θ, λ) = argmin_x ½‖A x − b‖² + λ/2 ‖x − θ‖², solved exactly."""

    symmetric = True  # optimality is a gradient: its Jacobian is symmetric
    positive_definite = True  # of a strictly convex objective: CG (the default would be MINRES)

    def solve(self, x0, theta, lam, A, b):  # black box: a dense solve (x0 is not needed)
        H = A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype)
        return torch.linalg.solve(H, A.T @ b + lam * theta)

    def optimality(self, x, theta, lam, A, b):  # zero exactly at the solution
        return A.T @ (A @ x - b) + lam * (x - theta)


class BuggyRidge(Ridge):
    def optimality(self, x, theta, lam, A, b):  # sign error: x* is no longer its root
        return A.T @ (A @ x - b) - lam * (x - theta)


torch.manual_seed(0)
A, b = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
target = torch.randn(6, dtype=torch.float64)

for layer in (Ridge(), BuggyRidge()):
    def outer(theta, lam, layer=layer):  # any scalar function of the layer's output
        return ((layer(torch.zeros(6, dtype=torch.float64), theta, lam, A, b) - target) ** 2).sum()

    # float64 and an exact solve: solver_tol=1e-10 gives tight tolerances.
    report = check_implicit_grad(outer, (theta, lam), solver_tol=1e-10, raise_exception=False)
    print(f"{type(layer).__name__}: {'passes' if report.ok else 'FAILS'} "
          f"({len(report.failures)} of {len(report.entries)} comparisons off, "
          f"max relative error {report.max_rel_error:.1e})")
