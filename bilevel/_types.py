"""The vocabulary of the public API as types: modes as ``Literal``s, components as ``Protocol``s.

A layer accepts any object that satisfies :class:`InnerSolver` (forward) and
:class:`LinearSolverLike` (backward), not only the library's own classes: a scipy
wrapper, an external program, a hand-written loop.  The backward never looks inside
either; it reads only the returned solution and, if present, the status fields of
:class:`~bilevel.SolverResult` / :class:`~bilevel.LinearSolveResult`.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, Union, runtime_checkable

import torch

OnFailure = Literal["warn", "raise", "ignore"]
"""What a layer does when a forward or backward solve does not converge.

``"warn"`` (the default) issues a :class:`~bilevel.ConvergenceWarning`, ``"raise"``
raises a :class:`~bilevel.ConvergenceError`, ``"ignore"`` does neither; in every case the
statuses are in the layer's ``diagnostics``.  A NaN/Inf in the solution or in the
backward's linear solve raises :class:`~bilevel.NonFiniteError` whatever it says.

Examples:
    >>> import torch, bilevel
    >>> from bilevel.solvers import GradientDescent
    >>> two_steps = GradientDescent(lr=0.1, rtol=1e-6, maxiter=2)   # cannot converge
    >>> layer = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(), two_steps, on_failure="raise")
    >>> try:
    ...     layer(torch.zeros(2), torch.ones(2))
    ... except bilevel.ConvergenceError as e:
    ...     print(e)
    Argmin: the inner solve did not converge: MAX_ITERATIONS: ...
"""

HvpMode = Literal["forward", "reverse"]
"""How the backward computes products with a symmetric Jacobian (a Hessian).

``"reverse"`` (the default): reverse-over-reverse on a graph of the optimality map built
once per backward; ``"forward"``: forward-over-reverse (``torch.func.jvp``).  Both give
the same gradient up to rounding.

Examples:
    >>> import torch, bilevel
    >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> objective = lambda x, a: ((x - a) ** 2).sum() + (x ** 4).sum()
    >>> grads = []
    >>> for mode in ("reverse", "forward"):
    ...     x = bilevel.Argmin(objective, hvp=mode)(torch.zeros(2), a)
    ...     grads.append(torch.autograd.grad(x.sum(), a)[0])
    >>> torch.allclose(grads[0], grads[1])
    True
"""

BackwardDtype = Union[Literal["auto"], None, "torch.dtype"]  # noqa: UP007 (a string forward reference)
"""The precision of the backward: ``"auto"`` (float32 for half-precision inputs), ``None``
(the inputs' dtype) or a floating ``torch.dtype``."""

Batched = bool | Literal["auto", "vmap", "loop"]
"""How a layer runs a batch of tasks (its ``batched=`` argument).

``False``: one task.  ``True`` or ``"auto"``: every leaf of the initial point (and every
task argument) has a leading task dimension ``B``; the layer runs the tasks with
``torch.func.vmap`` or a loop, whichever it measured faster for that shape (see
:func:`~bilevel.time_alternatives`).  ``"vmap"`` or ``"loop"``: that strategy.  The
result has the same leading dimension; the strategies agree up to rounding.

Examples:
    >>> import torch, bilevel
    >>> from bilevel.solvers import GradientDescent
    >>> layer = bilevel.Proximal(lambda p, x: ((p - x) ** 2).sum(), lam=1.0,
    ...                          solver=GradientDescent(lr=0.25, steps=50))
    >>> theta, x = torch.zeros(2), torch.arange(6.0).reshape(3, 2)   # 3 tasks
    >>> phi = layer(theta, x, batched="vmap")
    >>> phi.shape                                    # argmin: (2 x + theta) / 3
    torch.Size([3, 2])
    >>> torch.allclose(phi, layer(theta, x, batched="loop")), torch.allclose(phi, 2 * x / 3)
    (True, True)
"""


@runtime_checkable
class InnerSolver(Protocol):
    """``solver(objective, x0, *args, batched=False) -> SolverResult | tree``.

    Called under ``torch.no_grad()`` with detached arguments; it may be
    non-differentiable or run outside PyTorch.  A solver that cannot solve a batch of
    tasks at once may say so with a class attribute ``supports_batched = False``: a layer
    called with ``batched=True`` (``"auto"``) then runs it task by task (the ``"loop"``
    strategy); ``batched="vmap"`` calls it with ``batched=True`` regardless.

    It may return a :class:`~bilevel.SolverResult` (whose status the layer reports) or
    just the solution tree.  The gradient does not depend on how the solution was found,
    only on the optimality condition at it.

    Examples:
        A hand-written solver (closed form for this objective) in a layer:

        >>> import torch, bilevel
        >>> def closed_form(objective, x0, a):           # argmin_x ||x - a||^2 is a
        ...     return a.clone()
        >>> isinstance(closed_form, bilevel.InnerSolver)
        True
        >>> a = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> x = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(), solver=closed_form)(torch.zeros(2), a)
        >>> x.sum().backward()
        >>> a.grad                                       # dx*/da = I
        tensor([1., 1.])
    """

    def __call__(self, objective: Any, x0: Any, *args: Any, batched: bool = ...) -> Any: ...


@runtime_checkable
class LinearSolverLike(Protocol):
    """``solver(matvec, b, x0=None, *, batched=False) -> LinearSolveResult`` on tensor trees.

    The backward of a layer calls it on its adjoint system ``Aᵀu = v``; it reads ``.x``
    and, if present, ``.status``.  Every solver of :mod:`bilevel.linsolve` satisfies it.

    Examples:
        >>> import torch, bilevel
        >>> from bilevel.linsolve import CG
        >>> solver = CG()
        >>> isinstance(solver, bilevel.LinearSolverLike)
        True
        >>> res = solver(lambda v: 4.0 * v, torch.ones(2))   # solves 4 x = 1
        >>> res.x
        tensor([0.2500, 0.2500])
    """

    def __call__(self, matvec: Any, b: Any, x0: Any = ..., *, batched: bool = ...) -> Any: ...


__all__ = ["BackwardDtype", "Batched", "HvpMode", "InnerSolver", "LinearSolverLike", "OnFailure"]
