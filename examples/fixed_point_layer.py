"""A fixed-point layer: the equilibrium of x = tanh(W x + U a + b).

A deep equilibrium layer (Bai, Kolter & Koltun 2019, *Deep Equilibrium Models*) outputs
the fixed point x* of a contraction instead of the output of a fixed number of layers.
`bilevel.FixedPoint` finds it by iteration without keeping a graph, and its backward
solves (I − J)ᵀ w = v, J = ∂f/∂x at x* (GMRES), so memory does not grow with the number
of iterations. The check: the gradient equals that of autograd through 200 unrolled
iterations, which converge to the same point.
"""

import torch

import bilevel
from bilevel.solvers import FixedPointIteration

torch.manual_seed(0)
n, m = 30, 5
W = torch.randn(n, n, dtype=torch.float64)
W = (0.6 * W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_()  # ‖W‖₂ = 0.6: a contraction
U = torch.randn(n, m, dtype=torch.float64, requires_grad=True)
b = torch.zeros(n, dtype=torch.float64, requires_grad=True)
a = torch.randn(m, dtype=torch.float64)  # the layer's input
target = torch.randn(n, dtype=torch.float64)


def f(x, W, U, b, a):  # the parameters are arguments, so they receive gradients
    return torch.tanh(W @ x + U @ a + b)


layer = bilevel.FixedPoint(f, solver=FixedPointIteration(rtol=1e-12))
x_star = layer(torch.zeros(n, dtype=torch.float64), W, U, b, a)
implicit = torch.autograd.grad(((x_star - target) ** 2).sum(), (W, U, b))

x = torch.zeros(n, dtype=torch.float64)
for _ in range(200):  # the reference: backpropagate through every iteration
    x = f(x, W, U, b, a)
unrolled = torch.autograd.grad(((x - target) ** 2).sum(), (W, U, b))

err = max(((g - r).norm() / r.norm()).item() for g, r in zip(implicit, unrolled))
print(f"fixed-point residual {(f(x_star, W, U, b, a) - x_star).norm().item():.1e} after "
      f"{layer.diagnostics.forward.iterations} iterations; implicit vs unrolled gradient: "
      f"max relative difference {err:.1e}")
