"""The problem families of :mod:`bilevel.testing`: deterministic builders of
:class:`~bilevel.testing.BilevelProblem` (quadratic, ridge, logistic, softmax, MLP).

Each builder draws every number from a ``torch.Generator`` seeded by its ``seed``, in
float64, and casts to ``dtype``; the strategies of :mod:`bilevel.testing._strategies` only
draw the builders' arguments.  The invariant each family keeps (positive definite Hessians
within the problem's bounds ``mu``/``L``) is that of :mod:`bilevel.testing._problem`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import solvers as _solvers
from .._errors import BilevelValueError
from ._problem import _D, BilevelProblem, _finish, _layout, _log_uniform


# --------------------------------------------------------------------------------------
# builders (deterministic given their arguments; the strategies only draw the arguments)
# --------------------------------------------------------------------------------------
def make_quadratic(dim: int, condition: float, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """``L(z) = 1/2 z^T A z - b^T z`` with ``A`` SPD of condition number ``condition``.

    The eigenvalues of ``A`` are geometrically spaced in ``[condition^-1/2, condition^1/2]``
    (so ``mu * L = 1``), its eigenvectors a random orthogonal basis; ``lam`` is
    log-uniform in ``[0.1, 10]``; the outer loss is ``1/2 ||z - c||^2 + 1/2 sum sin(z)``.

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_quadratic
        >>> problem = make_quadratic(4, 10.0, torch.float64, "tensor", seed=0)
        >>> round(problem.L / problem.mu, 6), round(problem.mu * problem.L, 6)
        (10.0, 1.0)
        >>> A, b = problem.quadratic                   # inner(z) = z^T A z / 2 - b^T z
        >>> A.shape
        torch.Size([4, 4])
    """
    if dim < 1 or (param_kind != "tensor" and dim < 2):
        raise BilevelValueError(f"dim must be >= 1 (>= 2 for trees), got {dim}")
    if not condition >= 1:
        raise BilevelValueError(f"condition must be >= 1, got {condition}")
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=_D))
    eig = condition ** torch.linspace(-0.5, 0.5, dim, dtype=_D) if dim > 1 else torch.ones(1, dtype=_D)
    A = (Q * eig) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(dim, generator=g, dtype=_D)
    theta = torch.randn(dim, generator=g, dtype=_D)
    c = torch.randn(dim, generator=g, dtype=_D)
    x0 = 0.1 * torch.randn(dim, generator=g, dtype=_D)
    lam = _log_uniform(g, 0.1, 10.0)
    Ad, bd, cd = A.to(dtype), b.to(dtype), c.to(dtype)

    def flat_inner(z: Tensor, A_: Tensor, b_: Tensor) -> Tensor:
        return 0.5 * z @ (A_ @ z) - b_ @ z

    def flat_outer(z: Tensor) -> Tensor:
        return 0.5 * ((z - cd) ** 2).sum() + 0.5 * torch.sin(z).sum()

    return _finish(
        "quadratic",
        _layout(param_kind, dim),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (Ad, bd),
        lam,
        float(eig.min()),
        float(eig.max()),
        dtype,
        seed,
        info=f"condition={condition:.3g}",
        quadratic=(A, b),
    )


def _regression_data(g: torch.Generator, m: int, dim: int) -> tuple[Tensor, Tensor]:
    """Features with a trailing column of ones (the bias, the 0-d leaf of a tree) and a
    planted linear signal."""
    X = torch.cat([torch.randn(2 * m, dim - 1, generator=g, dtype=_D), torch.ones(2 * m, 1, dtype=_D)], 1)
    w = torch.randn(dim, generator=g, dtype=_D)
    return X, X @ w + 0.3 * torch.randn(2 * m, generator=g, dtype=_D)


def _regression_draws(dim: int, seed: int) -> tuple[int, Tensor, Tensor, float, float, Tensor, Tensor]:
    """The random draws shared by :func:`make_ridge` and :func:`make_logistic`.

    Returns:
        ``(m, X, s, alpha, lam, theta, x0)``: the training-set size ``m = 2 dim + 4``,
        ``2 m`` samples of :func:`_regression_data` (training then validation), ``alpha``
        log-uniform in ``[0.01, 1]``, ``lam`` in ``[0.1, 10]``, and the starting points.
    """
    if dim < 2:
        raise BilevelValueError(f"dim must be >= 2, got {dim}")
    g = torch.Generator().manual_seed(seed)
    m = 2 * dim + 4
    Xa, sa = _regression_data(g, m, dim)
    alpha = _log_uniform(g, 0.01, 1.0)
    lam = _log_uniform(g, 0.1, 10.0)
    theta = torch.randn(dim, generator=g, dtype=_D)
    x0 = 0.1 * torch.randn(dim, generator=g, dtype=_D)
    return m, Xa, sa, alpha, lam, theta, x0


def make_ridge(dim: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """Ridge regression ``1/2 mean (X z - y)^2 + alpha/2 ||z||^2`` (last feature = bias).

    ``2 dim + 4`` training and as many validation samples (the outer loss is the
    validation squared error); ``alpha`` log-uniform in ``[0.01, 1]``, ``lam`` in
    ``[0.1, 10]``.  Closed form available (:meth:`BilevelProblem.exact_proximal`).

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_ridge
        >>> problem = make_ridge(3, torch.float64, "tuple", seed=0)
        >>> problem.name, problem.dim, [tuple(t.shape) for t in problem.theta]   # weights, bias
        ('ridge', 3, [(2,), ()])
        >>> problem.quadratic is not None                 # a closed form exists
        True
    """
    m, Xa, ya, alpha, lam, theta, x0 = _regression_draws(dim, seed)
    X, y, Xv, yv = Xa[:m], ya[:m], Xa[m:], ya[m:]
    A = X.T @ X / m + alpha * torch.eye(dim, dtype=_D)
    b = X.T @ y / m
    eig = torch.linalg.eigvalsh(A)
    Xvd, yvd = Xv.to(dtype), yv.to(dtype)

    def flat_inner(z: Tensor, X_: Tensor, y_: Tensor) -> Tensor:
        return 0.5 * ((X_ @ z - y_) ** 2).mean() + 0.5 * alpha * (z * z).sum()

    def flat_outer(z: Tensor) -> Tensor:
        return 0.5 * ((Xvd @ z - yvd) ** 2).mean()

    return _finish(
        "ridge",
        _layout(param_kind, dim),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (X, y),
        lam,
        float(eig.min()),
        float(eig.max()),
        dtype,
        seed,
        info=f"alpha={alpha:.3g}",
        quadratic=(A, b),
    )


def make_logistic(dim: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """L2-regularised logistic regression ``mean softplus(-y X z) + alpha/2 ||z||^2``, y = +-1.

    Hessian bounds: ``alpha <= H <= alpha + ||X||_2^2 / (4 m)``.  The outer loss is the
    validation logistic loss.

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_logistic
        >>> problem = make_logistic(3, torch.float64, "tensor", seed=0)
        >>> problem.name, problem.dim, problem.quadratic is None
        ('logistic', 3, True)
        >>> 0 < problem.mu <= problem.L                     # strongly convex
        True
    """
    m, Xa, sa, alpha, lam, theta, x0 = _regression_draws(dim, seed)
    ya = torch.where(sa >= 0, 1.0, -1.0).to(_D)
    X, y, Xv, yv = Xa[:m], ya[:m], Xa[m:], ya[m:]
    L = alpha + float(torch.linalg.matrix_norm(X, 2)) ** 2 / (4 * m)
    Xvd, yvd = Xv.to(dtype), yv.to(dtype)

    def flat_inner(z: Tensor, X_: Tensor, y_: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-y_ * (X_ @ z)).mean() + 0.5 * alpha * (z * z).sum()

    def flat_outer(z: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-yvd * (Xvd @ z)).mean()

    return _finish(
        "logistic",
        _layout(param_kind, dim),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (X, y),
        lam,
        alpha,
        L,
        dtype,
        seed,
        info=f"alpha={alpha:.3g}",
    )


def make_softmax(features: int, classes: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """L2-regularised softmax regression: weight ``(features, classes)`` and bias ``(classes,)``.

    The data are ``(X, Y)`` with ``Y`` one-hot (floating, so that it follows the dtype).

    ``mean CE(X W + b, y) + alpha/2 ||(W, b)||^2``; the Hessian of the cross-entropy in the
    logits is ``diag(p) - p p^T <= I/2``, so ``alpha <= H <= alpha + ||[X, 1]||_2^2 / (2 m)``.
    The outer loss is the validation cross-entropy.

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_softmax
        >>> problem = make_softmax(2, 3, torch.float64, "dict", seed=0)
        >>> problem.dim, {k: tuple(v.shape) for k, v in problem.theta.items()}
        (9, {'weight': (2, 3), 'bias': (3,)})
    """
    if features < 1 or classes < 2:
        raise BilevelValueError(f"need features >= 1 and classes >= 2, got {features}, {classes}")
    g = torch.Generator().manual_seed(seed)
    m = 3 * classes * (features + 1)
    X = torch.randn(2 * m, features, generator=g, dtype=_D)
    Wt = 2.0 * torch.randn(features, classes, generator=g, dtype=_D)
    logits = X @ Wt + 0.5 * torch.randn(2 * m, classes, generator=g, dtype=_D)
    yall = logits.argmax(1)
    Xtr, ytr, Xv, yv = X[:m], yall[:m], X[m:], yall[m:]
    alpha = _log_uniform(g, 0.01, 1.0)
    lam = _log_uniform(g, 0.1, 10.0)
    n = features * classes + classes
    theta = torch.randn(n, generator=g, dtype=_D)
    x0 = 0.1 * torch.randn(n, generator=g, dtype=_D)
    X1 = torch.cat([Xtr, torch.ones(m, 1, dtype=_D)], 1)
    L = alpha + float(torch.linalg.matrix_norm(X1, 2)) ** 2 / (2 * m)
    specs = (("weight", (features, classes)), ("bias", (classes,)))
    Xvd = Xv.to(dtype)

    def logits_of(z: Tensor, X_: Tensor) -> Tensor:
        W = z[: features * classes].reshape(features, classes)
        return X_ @ W + z[features * classes :]

    def cross_entropy(logits: Tensor, Y: Tensor) -> Tensor:
        # Written out (rather than F.cross_entropy, whose backward is ~10x slower on tiny
        # CPU problems under torch.func): log-sum-exp shifted by the detached row max,
        # added back so that the value is exact.
        m = logits.detach().amax(1, keepdim=True)
        lse = torch.log(torch.exp(logits - m).sum(1)) + m[:, 0]
        return (lse - (logits * Y).sum(1)).mean()

    def flat_inner(z: Tensor, X_: Tensor, Y_: Tensor) -> Tensor:
        return cross_entropy(logits_of(z, X_), Y_) + 0.5 * alpha * (z * z).sum()

    Yv = torch.nn.functional.one_hot(yv, classes).to(dtype)

    def flat_outer(z: Tensor) -> Tensor:
        return cross_entropy(logits_of(z, Xvd), Yv)

    return _finish(
        "softmax",
        _layout(param_kind, n, specs),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (Xtr, torch.nn.functional.one_hot(ytr, classes).to(_D)),
        lam,
        alpha,
        L,
        dtype,
        seed,
        info=f"features={features}, classes={classes}, alpha={alpha:.3g}",
    )


def make_mlp(inputs: int, hidden: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """A one-hidden-layer tanh MLP regressing ``y = sin(X v)``; parameters ``w1 (hidden,
    inputs), b1 (hidden,), w2 (hidden,), b2 ()``.

    The squared loss is non-convex in the parameters.  Its Hessian is estimated on a cloud
    of points (theta, x0, and random points around them) with a 1.5x margin, giving
    ``mu`` (possibly negative) and ``L``; then ``lam = max(1, 4 max(0, -mu))`` so that the
    argmin objective (weight decay >= lam/2) and the proximal one (+lam) are strongly
    convex.  The choice is verified at both solutions (tight Newton-CG in float64) and
    ``lam`` doubled until the smallest Hessian eigenvalue there is >= lam/8.

    Examples:
        The inner loss may be non-convex (``mu < 0``), the proximal objective is not:

        >>> import torch
        >>> from bilevel.testing import make_mlp
        >>> problem = make_mlp(1, 2, torch.float64, "dict", seed=0)
        >>> list(problem.theta), problem.dim
        (['w1', 'b1', 'w2', 'b2'], 7)
        >>> problem.proximal_curvature[0] > 0
        True
    """
    if inputs < 1 or hidden < 1:
        raise BilevelValueError(f"need inputs >= 1 and hidden >= 1, got {inputs}, {hidden}")
    g = torch.Generator().manual_seed(seed)
    m = 8
    X = torch.randn(2 * m, inputs, generator=g, dtype=_D)
    v = torch.randn(inputs, generator=g, dtype=_D)
    y = torch.sin(X @ v)
    Xtr, ytr, Xv, yv = X[:m], y[:m], X[m:], y[m:]
    specs = (("w1", (hidden, inputs)), ("b1", (hidden,)), ("w2", (hidden,)), ("b2", ()))
    n = hidden * inputs + 2 * hidden + 1
    theta = 0.7 * torch.randn(n, generator=g, dtype=_D)
    x0 = theta + 0.1 * torch.randn(n, generator=g, dtype=_D)

    def net(z: Tensor, X_: Tensor) -> Tensor:
        i = hidden * inputs
        w1 = z[:i].reshape(hidden, inputs)
        b1 = z[i : i + hidden]
        w2 = z[i + hidden : i + 2 * hidden]
        return torch.tanh(X_ @ w1.T + b1) @ w2 + z[-1]

    def flat_inner(z: Tensor, X_: Tensor, y_: Tensor) -> Tensor:
        return 0.5 * ((net(z, X_) - y_) ** 2).mean()

    Xvd, yvd = Xv.to(dtype), yv.to(dtype)

    def flat_outer(z: Tensor) -> Tensor:
        return 0.5 * ((net(z, Xvd) - yvd) ** 2).mean()

    def hess_eigs(z: Tensor) -> Tensor:
        return torch.linalg.eigvalsh(torch.func.hessian(lambda q: flat_inner(q, Xtr, ytr))(z))

    r = 1.0 + float(theta.abs().max())
    cloud = [theta, x0] + [theta + r * torch.randn(n, generator=g, dtype=_D) / math.sqrt(n) for _ in range(6)]
    eigs = torch.stack([hess_eigs(z) for z in cloud])
    mu = 1.5 * min(float(eigs.min()), 0.0)
    L = 1.5 * max(float(eigs.max()), 1e-3)
    lam = max(1.0, 4.0 * max(0.0, -mu))
    lay = _layout(param_kind, n, specs)
    # Verify at the solutions (float64, flat coordinates) and strengthen lam if needed.
    solver = _solvers.NewtonCG(rtol=1e-10, maxiter=100)
    for _ in range(8):
        w_lo = 0.5 * lam

        def prox(z: Tensor, th: Tensor) -> Tensor:
            return flat_inner(z, Xtr, ytr) + 0.5 * lam * ((z - th) ** 2).sum()  # noqa: B023 (used in this iteration)

        def amin(z: Tensor, th: Tensor) -> Tensor:
            return flat_inner(z, Xtr, ytr) + 0.5 * (lam * (0.5 + torch.sigmoid(th)) * z * z).sum()  # noqa: B023

        worst = math.inf
        for obj, start in ((prox, theta), (amin, x0)):
            sol = solver(obj, start.clone(), theta).x
            e = torch.linalg.eigvalsh(torch.func.hessian(lambda q: obj(q, theta))(sol))  # noqa: B023
            worst = min(worst, float(e.min()))
            h = hess_eigs(sol)
            mu = min(mu, 1.5 * float(h.min()))
            L = max(L, 1.5 * float(h.max()))
        if worst >= w_lo / 4 and lam >= 4.0 * max(0.0, -mu):
            break
        lam *= 2.0
    return _finish(
        "mlp",
        lay,
        flat_inner,
        flat_outer,
        theta,
        x0,
        (Xtr, ytr),
        lam,
        mu,
        L,
        dtype,
        seed,
        info=f"inputs={inputs}, hidden={hidden}",
    )
