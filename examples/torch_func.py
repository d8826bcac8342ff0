"""Implicit layers inside `torch.func` transforms.

A layer's autograd rules are the implicit function theorem's (Krantz & Parks, *The
Implicit Function Theorem*, 2002): reverse mode solves Aᵀu = v, forward mode A s = −B t.
Both are available to `torch.func`, so a loss containing a `Proximal` layer can be
differentiated with `torch.func.grad` (reverse) and pushed forward with `torch.func.jvp`
(forward mode, no backward pass at all). Each is compared with `loss.backward()`.
"""

import torch

import bilevel

torch.manual_seed(0)
X, y = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
Xq, yq = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, dtype=torch.float64)


def inner_loss(phi, X, y):  # smooth and convex in φ
    return torch.nn.functional.softplus(-y * (X @ phi)).mean()


layer = bilevel.Proximal(inner_loss, lam=0.5)  # NewtonCG forward, CG backward (tolerances)


def meta_loss(theta):  # query loss after adaptation: θ ↦ φ*(θ) ↦ loss
    return ((Xq @ layer(theta, X, y) - yq) ** 2).mean()


theta = torch.randn(8, dtype=torch.float64, requires_grad=True)
meta_loss(theta).backward()  # reference: plain autograd
reference = theta.grad

g = torch.func.grad(meta_loss)(theta.detach())  # reverse mode inside torch.func
t = torch.randn(8, dtype=torch.float64)  # a tangent direction
_, dloss = torch.func.jvp(meta_loss, (theta.detach(),), (t,))  # forward mode: ⟨∇loss, t⟩

print(f"torch.func.grad vs loss.backward(): max difference {(g - reference).abs().max().item():.1e}; "
      f"torch.func.jvp vs <grad, t>: {dloss.item():.10f} vs {(reference @ t).item():.10f}")
