"""The extreme eigenvalues of an objective's Hessian at a point (Lanczos, batched).

One estimate serves the whole project: the minimum check of the inner solvers (is a
stationary point a minimum? -- a gradient test cannot tell a minimum from a saddle), the
health columns of the few-shot application (is the step size below ``2/λ_max``? is
``H + λI`` positive definite?) and the meta-gradient quality experiment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._autodiff import Objective, hessian_operator
from ._errors import BilevelValueError
from ._tree import tree_flatten, tree_ravel, tree_size, tree_unflatten, tree_unravel


def hessian_extremes(
    objective: Objective, x: Any, *args: Any, batched: bool = False, steps: int = 20, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Estimates of the smallest and largest eigenvalue of ``∇²ₓ objective(x, *args)``.

    ``min(steps, n)`` Lanczos steps (a fixed budget) (``n`` unknowns per task) from a seeded random vector,
    with full re-orthogonalisation (twice), then the Rayleigh-Ritz values of the projected
    matrix.  Ritz values lie inside the spectrum and the extreme ones converge first: the
    returned ``λ_min`` is an upper bound of the true smallest eigenvalue and ``λ_max`` a
    lower bound of the largest, both exact once ``steps >= n``.  When a task's Krylov
    space becomes invariant (its Ritz values are then exact eigenvalues), it continues from
    a fresh random direction orthogonal to the basis, so no spurious zero appears.  No host
    synchronisation: it can run inside a fixed-budget step.  Cost: ``steps`` Hessian-vector
    products (one gradient graph, reused) and ``steps`` stored vectors.

    Args:
        objective: ``objective(x, *args) -> scalar`` (``(B,)`` per-task values when batched).
        x: the point, a tensor tree (leading task dimension when batched).
        *args: further arguments of the objective (held fixed).
        batched: one estimate per task.
        steps: Lanczos steps (≥ 1).
        seed: seed of the random start vectors.

    Returns:
        ``(λ_min, λ_max)``: 0-d tensors, or ``(B,)`` when batched, in ``x``'s dtype.

    Examples:
        >>> import torch, bilevel
        >>> A = torch.diag(torch.tensor([-1.0, 2.0, 5.0]))
        >>> lo, hi = bilevel.hessian_extremes(lambda x: 0.5 * x @ A @ x, torch.zeros(3))
        >>> round(float(lo), 4), round(float(hi), 4)
        (-1.0, 5.0)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise BilevelValueError(f"hessian_extremes: steps must be an int >= 1, got {steps!r}")
    leaves, treedef = tree_flatten(x)
    x = tree_unflatten(treedef, [t.detach() for t in leaves])
    k = min(steps, tree_size(x, batched))
    hess = hessian_operator(objective, x, args, batched)
    # Lanczos on flat vectors, one row per task: (B, n), B = 1 when not batched.
    flat = tree_ravel(x, batched).reshape(-1 if batched else 1, tree_size(x, batched))

    def matvec(q: Tensor) -> Tensor:
        return tree_ravel(hess(tree_unravel(x, q if batched else q[0], batched)), batched).reshape(q.shape)

    def orthogonalise(w: Tensor, basis: list[Tensor]) -> Tensor:
        Q = torch.stack(basis, 1)  # (B, j, n)
        for _ in range(2):  # "twice is enough" (Kahan / Parlett)
            w = w - torch.einsum("bj,bjn->bn", torch.einsum("bjn,bn->bj", Q, w), Q)
        return w

    # All the random directions (the start and one fresh candidate per step) drawn at once
    # on the CPU (the same numbers on every device) and copied before the loop: a copy
    # inside it would wait for the device at every step.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.randn((k, *flat.shape), generator=gen, dtype=flat.dtype).to(flat.device)
    tiny, eps = torch.finfo(flat.dtype).tiny, torch.finfo(flat.dtype).eps
    basis = [draws[0] / draws[0].norm(dim=-1, keepdim=True)]
    products: list[Tensor] = []
    scale = torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for j in range(k):
        w = matvec(basis[-1])
        products.append(w)
        if j == k - 1:
            break
        scale = torch.maximum(scale, w.norm(dim=-1))
        w = orthogonalise(w, basis)
        beta = w.norm(dim=-1, keepdim=True)
        invariant = beta <= eps**0.5 * scale.clamp_min(tiny)[:, None]
        # Both candidates are computed and selected on the device (no host read).
        fresh = orthogonalise(draws[j + 1], basis)
        fresh = fresh / fresh.norm(dim=-1, keepdim=True).clamp_min(tiny)
        basis.append(torch.where(invariant, fresh, w / torch.where(invariant, torch.ones_like(beta), beta)))
    # Rayleigh-Ritz on the projected matrix Qᵀ H Q (symmetrised; float64 for eigvalsh).
    T = torch.einsum("bin,bjn->bij", torch.stack(basis, 1), torch.stack(products, 1)).to(torch.float64)
    ritz = torch.linalg.eigvalsh(0.5 * (T + T.transpose(-1, -2)))
    lo, hi = ritz[:, 0].to(flat.dtype), ritz[:, -1].to(flat.dtype)
    return (lo, hi) if batched else (lo[0], hi[0])


def has_negative_curvature(objective: Objective, x: Any, args: tuple, batched: bool, steps: int = 10) -> Tensor:
    """Per task: whether the Hessian at ``x`` has a clearly negative eigenvalue -- below
    ``-sqrt(eps) * max|λ|`` (a positive semi-definite Hessian gives Ritz values ≥ 0 up to
    rounding).  :func:`hessian_extremes` with ``steps`` Lanczos steps."""
    lo, hi = hessian_extremes(objective, x, *args, batched=batched, steps=steps)
    eps = torch.finfo(lo.dtype).eps
    return lo < -(eps**0.5) * torch.maximum(lo.abs(), hi.abs())
