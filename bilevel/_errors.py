"""Every exception and warning the library raises, under one base class each.

``except bilevel.BilevelError`` catches whatever the library raises on purpose (a bad
argument, a solve that must not be trusted, a non-finite value); the concrete classes
also derive from the built-in a Python user would expect (``ValueError``, ``TypeError``,
``RuntimeError``, ``FloatingPointError``, ``NotImplementedError``), so code written
against those keeps working.  ``warnings.simplefilter("error", bilevel.BilevelWarning)``
turns every library warning into an error.
"""

from __future__ import annotations


class BilevelError(Exception):
    """Base class of the exceptions raised by :mod:`bilevel`.

    Every exception the library raises on purpose derives from it and from the built-in a
    Python user would expect, so ``except bilevel.BilevelError`` catches them all and
    ``except ValueError`` still catches a bad value.

    Examples:
        >>> import bilevel
        >>> from bilevel.solvers import GradientDescent
        >>> try:
        ...     GradientDescent(lr=-1.0)
        ... except bilevel.BilevelError as e:
        ...     print(type(e).__name__, isinstance(e, ValueError))
        BilevelValueError True
    """


class BilevelValueError(BilevelError, ValueError):
    """An argument has the right type but an invalid value (shape, range, structure).

    Configurations are validated at construction, so a bad value fails where it is written.

    Examples:
        >>> import bilevel
        >>> from bilevel.solvers import GradientDescent
        >>> try:
        ...     GradientDescent(lr=-1.0)
        ... except ValueError as e:
        ...     print(e)
        GradientDescent: lr must be a real number in (0.0, inf), got -1.0
    """


class BilevelTypeError(BilevelError, TypeError):
    """An argument has the wrong type (e.g. a non-tensor leaf, a non-callable solver).

    Examples:
        >>> import bilevel
        >>> try:
        ...     bilevel.tree.tree_flatten({"w": 1.0})          # a float is not a tensor leaf
        ... except bilevel.BilevelTypeError as e:
        ...     print(e)
        expected a tensor tree (Tensor, tuple/list or dict of Tensors), found float at ['w']
    """


class UnsupportedError(BilevelError, NotImplementedError):
    """A valid request the chosen component does not support (e.g. a batched solve).

    Examples:
        >>> import torch, bilevel
        >>> from bilevel.solvers import LBFGS
        >>> try:
        ...     LBFGS()(lambda x: (x ** 2).sum(-1), torch.ones(4, 2), batched=True)
        ... except bilevel.UnsupportedError as e:
        ...     print(e)
        LBFGS does not support batched (multi-task) solves
    """


class ConvergenceError(BilevelError, RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when a layer is set to ``on_failure="raise"``.

    Examples:
        >>> import torch, bilevel
        >>> from bilevel.solvers import GradientDescent
        >>> layer = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(),
        ...                        GradientDescent(lr=0.1, rtol=1e-6, maxiter=2), on_failure="raise")
        >>> try:
        ...     layer(torch.zeros(2), torch.ones(2))
        ... except bilevel.ConvergenceError as e:
        ...     print(e)
        Argmin: the inner solve did not converge: MAX_ITERATIONS: reached the maximum number of iterations before the tolerance
    """


class NotDifferentiableError(BilevelError, RuntimeError):
    """A gradient-based solver met an objective that torch cannot differentiate with respect
    to the unknowns (its value leaves torch, e.g. through NumPy): use a derivative-free one.

    Examples:
        >>> import torch, bilevel
        >>> from bilevel.solvers import GradientDescent, ScipyMinimize
        >>> objective = lambda x: torch.tensor(((x - 1.0) ** 2).sum().item())   # leaves torch
        >>> try:
        ...     GradientDescent(lr=0.1, steps=5)(objective, torch.zeros(2))
        ... except bilevel.NotDifferentiableError as e:
        ...     print(type(e).__name__)
        NotDifferentiableError
        >>> ScipyMinimize("Nelder-Mead")(objective, torch.zeros(2)).status.name
        'SUCCESS'
    """


class NonFiniteError(BilevelError, FloatingPointError):
    """A NaN or Inf appeared in an objective value, a gradient or a solution.

    A NaN/Inf in a layer's solution or in its backward's linear solve raises it whatever
    ``on_failure`` says: a non-finite value is never a solution.  (``FixedPointIteration``
    reports a diverging iteration in its status instead, returning its last finite iterate.)

    Examples:
        >>> import torch, bilevel
        >>> from bilevel.solvers import GradientDescent
        >>> try:
        ...     GradientDescent(lr=0.1, steps=3)(lambda x: x.log().sum(), -torch.ones(2))
        ... except bilevel.NonFiniteError as e:
        ...     print(e)
        GradientDescent: the objective value became non-finite at iteration 0
    """


class BilevelWarning(UserWarning):
    """Base class of the warnings issued by :mod:`bilevel`.

    Examples:
        Turn every library warning into an error (e.g. in a test suite):

        >>> import warnings, bilevel
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", bilevel.BilevelWarning)
        ...     try:
        ...         warnings.warn("not converged", bilevel.ConvergenceWarning)
        ...     except bilevel.BilevelWarning as w:
        ...         print(type(w).__name__)
        ConvergenceWarning
    """


class ConvergenceWarning(BilevelWarning):
    """A forward (inner) or backward (linear) solve did not converge.

    Issued by a layer with ``on_failure="warn"`` (the default); the statuses are also in
    the layer's ``diagnostics``.  Non-convergence is reported, never silent.

    Examples:
        >>> import warnings, torch, bilevel
        >>> from bilevel.solvers import GradientDescent
        >>> layer = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(),
        ...                        GradientDescent(lr=0.1, rtol=1e-6, maxiter=2))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     x = layer(torch.zeros(2), torch.ones(2))
        >>> [w.category.__name__ for w in caught]
        ['ConvergenceWarning']
        >>> layer.diagnostics.forward.status.name
        'MAX_ITERATIONS'
    """


class ClosedOverTensorWarning(BilevelWarning):
    """A tensor that requires grad is used by the optimality condition without being an argument.

    Such a tensor receives no gradient from the implicit layer (the silent-zero-gradient
    trap): pass it as an argument of the layer instead of closing over it.

    Examples:
        >>> import warnings, torch, bilevel
        >>> w = torch.tensor(2.0, requires_grad=True)
        >>> closed_over = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum() + w * (x ** 2).sum())
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     x = closed_over(torch.zeros(2), torch.ones(2))
        >>> [c.category.__name__ for c in caught]
        ['ClosedOverTensorWarning']
        >>> passed = bilevel.Argmin(lambda x, a, w: ((x - a) ** 2).sum() + w * (x ** 2).sum())
        >>> x = passed(torch.zeros(2), torch.ones(2), w)                 # the fix
        >>> x.sum().backward()
        >>> w.grad is not None
        True
    """


__all__ = [
    "BilevelError",
    "BilevelTypeError",
    "BilevelValueError",
    "BilevelWarning",
    "ClosedOverTensorWarning",
    "ConvergenceError",
    "ConvergenceWarning",
    "NonFiniteError",
    "NotDifferentiableError",
    "UnsupportedError",
]
