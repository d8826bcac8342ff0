"""A deep-equilibrium classifier: the data, the equilibrium block, and its two forward passes.

The network (Bai, Kolter & Koltun, *Deep Equilibrium Models*, NeurIPS 2019, in its simplest
fully connected form) maps an image ``x`` to the fixed point

    z* = f(z*, x) = tanh(W z* + U x + b)

and classifies ``z*`` with a linear head. The recurrent weight is kept at spectral norm
``ρ < 1`` (``--rho``), so that, ``tanh`` being 1-Lipschitz, ``f`` is a contraction with factor
at most ρ for every input and the fixed point exists and is unique whatever the training
does. Three parametrisations (``--weight``), which decide how hard the fixed point is:

* ``symmetric`` (the default): ``W = ρ S / ‖S‖₂`` with ``S = V + Vᵀ``. The Jacobian
  ``diag(tanh') W`` is similar to a symmetric matrix, so its eigenvalues are real and spread
  over ``[−ρ, ρ]``: plain iteration contracts at rate up to ρ, while Anderson and Broyden
  (Krylov-like on such spectra) converge much faster -- the regime DEQs live in;
* ``spectral``: ``W = ρ V / ‖V‖₂``, only the largest singular value at ρ; the eigenvalues of a
  random V fill a disk of about half that radius, and plain iteration needs few steps;
* ``orthogonal``: ``W = ρ exp(V − Vᵀ)``, ρ times an orthogonal matrix, eigenvalues on a
  circle of radius ρ: the known worst case of Krylov-type acceleration, where Anderson
  gains nothing over plain iteration.

The input injection ``U x`` starts small (``input_gain`` times a Glorot initialisation,
default 0.3), so that ``tanh`` starts in its near-linear range and the recurrence, not
the saturation, decides the convergence.

Two ways to get ``z*`` and its gradient, on the same parameters:

* :func:`implicit_forward`: ``bilevel.FixedPoint`` with any inner solver (no graph of the
  iterations is kept) and the implicit function theorem in the backward: an exact adjoint
  (GMRES, BiCGSTAB, Broyden on ``(I − J)ᵀ w = v``) or k damped adjoint steps
  (``Neumann(alpha=τ, steps=k)``, the phantom gradient of Geng et al. 2021);
* :func:`unrolled_forward`: the weight-tied network unrolled for K iterations from z = 0,
  differentiated by backpropagation through all of them (memory grows with K).

Data: scikit-learn's bundled digits (1797 8×8 images, 10 classes; no download),
standardised with the training statistics, split 1297 train / 500 test with a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

import bilevel

__all__ = [
    "PARAM_NAMES",
    "WEIGHTS",
    "block",
    "classify",
    "equilibrium_map",
    "implicit_forward",
    "init_params",
    "injection",
    "load_digits",
    "recurrent_weight",
    "unrolled_forward",
]

#: The trainable parameters, in the order the checkpoint and the optimiser keep them.
PARAM_NAMES = ("V", "U", "b", "head_w", "head_b")


def load_digits(seed: int = 0, n_test: int = 500) -> dict[str, Tensor]:
    """Standardised float32 train/test tensors of scikit-learn's digits (fixed split by ``seed``)."""
    from sklearn import datasets

    x, y = datasets.load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(y))
    te, tr = idx[:n_test], idx[n_test:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd = np.where(sd > 0, sd, 1.0)  # constant border pixels stay at 0
    z = ((x - mu) / sd).astype(np.float32)
    return {
        "x_train": torch.from_numpy(z[tr]), "y_train": torch.from_numpy(y[tr]).long(),
        "x_test": torch.from_numpy(z[te]), "y_test": torch.from_numpy(y[te]).long(),
    }


def init_params(
    width: int, n_in: int = 64, n_classes: int = 10, seed: int = 0, input_gain: float = 0.3
) -> dict[str, Tensor]:
    """Glorot-uniform weights (``U`` scaled by ``input_gain``) and zero biases (a generator of its own)."""
    g = torch.Generator().manual_seed(seed)

    def glorot(rows: int, cols: int) -> Tensor:
        a = math.sqrt(6.0 / (rows + cols))
        return (torch.rand(rows, cols, generator=g) * 2 - 1) * a

    return {
        "V": glorot(width, width), "U": input_gain * glorot(width, n_in), "b": torch.zeros(width),
        "head_w": glorot(n_classes, width), "head_b": torch.zeros(n_classes),
    }


WEIGHTS = ("symmetric", "spectral", "orthogonal")


def recurrent_weight(V: Tensor, rho: float, weight: str = "symmetric") -> Tensor:
    """The recurrent weight, spectral norm exactly ρ.

    ``"symmetric"``: ``ρ S / ‖S‖₂`` with ``S = V + Vᵀ``. ``"spectral"``: ``ρ V / ‖V‖₂``
    (differentiable through the largest singular value). ``"orthogonal"``: ``ρ exp(V − Vᵀ)``
    (the exponential of a skew-symmetric matrix is orthogonal; smooth in V).
    """
    if weight == "symmetric":
        S = V + V.T
        return rho * S / torch.linalg.matrix_norm(S, ord=2)
    if weight == "orthogonal":
        return rho * torch.linalg.matrix_exp(V - V.T)
    if weight == "spectral":
        return rho * V / torch.linalg.matrix_norm(V, ord=2)
    raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")


def injection(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``U x + b`` for a batch of images ``x`` (N, 64): computed once per forward, outside the solve."""
    return x @ params["U"].T + params["b"]


def block(z: Tensor, W: Tensor, inj: Tensor) -> Tensor:
    """One application of the equilibrium map to a batch: ``tanh(z Wᵀ + U x + b)``."""
    return torch.tanh(z @ W.T + inj)


def equilibrium_map(params: dict[str, Tensor], x: Tensor, rho: float, weight: str = "symmetric") -> Callable[[Tensor], Tensor]:
    """``z ↦ f(z, x)`` with the parameters closed over (for peers' solvers and the residual plots)."""
    W, inj = recurrent_weight(params["V"], rho, weight), injection(params, x)
    return lambda z: block(z, W, inj)


def classify(params: dict[str, Tensor], z: Tensor) -> Tensor:
    """Logits of the linear head."""
    return z @ params["head_w"].T + params["head_b"]


def implicit_forward(
    layer: bilevel.FixedPoint, params: dict[str, Tensor], x: Tensor, rho: float, weight: str = "symmetric"
) -> Tensor:
    """``z*`` through an implicit layer: the mini-batch is one fixed-point problem of N·width unknowns.

    ``W`` and the injection are passed as the layer's arguments (not closed over), so the
    implicit gradient reaches ``V``, ``U`` and ``b`` through them.
    """
    W, inj = recurrent_weight(params["V"], rho, weight), injection(params, x)
    return layer(torch.zeros_like(inj), W, inj)


def unrolled_forward(
    params: dict[str, Tensor], x: Tensor, rho: float, iterations: int, weight: str = "symmetric"
) -> Tensor:
    """The weight-tied network: ``iterations`` applications of the block from z = 0, all kept for backward."""
    W, inj = recurrent_weight(params["V"], rho, weight), injection(params, x)
    z = torch.zeros_like(inj)
    for _ in range(iterations):
        z = block(z, W, inj)
    return z


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def residual_recorder(fn: Callable[..., Tensor]) -> tuple[Callable[..., Tensor], list[float]]:
    """Wrap a fixed-point map so that every evaluation records ``‖f(z) − z‖ / ‖f(z)‖``.

    Every solver here evaluates the map at its current iterate, so the list is the
    solver's residual history against function evaluations -- for any solver, ours or a
    peer's, without asking the solver for it.
    """
    history: list[float] = []

    def wrapped(z: Any, *args: Any) -> Tensor:
        fz = fn(z, *args)
        history.append(float((fz - z).norm() / fz.norm().clamp_min(1e-30)))
        return fz

    return wrapped, history
