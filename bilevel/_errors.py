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
    """Base class of the exceptions raised by :mod:`bilevel`."""


class BilevelValueError(BilevelError, ValueError):
    """An argument has the right type but an invalid value (shape, range, structure)."""


class BilevelTypeError(BilevelError, TypeError):
    """An argument has the wrong type (e.g. a non-tensor leaf, a non-callable solver)."""


class UnsupportedError(BilevelError, NotImplementedError):
    """A valid request the chosen component does not support (e.g. a batched solve)."""


class ConvergenceError(BilevelError, RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when a layer is set to ``on_failure="raise"``."""


class NotDifferentiableError(BilevelError, RuntimeError):
    """A gradient-based solver met an objective that torch cannot differentiate with respect
    to the unknowns (its value leaves torch, e.g. through NumPy): use a derivative-free one."""


class NonFiniteError(BilevelError, FloatingPointError):
    """A NaN or Inf appeared in an objective value, a gradient or a solution."""


class BilevelWarning(UserWarning):
    """Base class of the warnings issued by :mod:`bilevel`."""


class ConvergenceWarning(BilevelWarning):
    """A forward (inner) or backward (linear) solve did not converge."""


class ClosedOverTensorWarning(BilevelWarning):
    """A tensor that requires grad is used by the optimality condition without being an argument.

    Such a tensor receives no gradient from the implicit layer (the silent-zero-gradient
    trap): pass it as an argument of the layer instead of closing over it.
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
