"""What every layer shares (the backward's configuration, validated once) and the abstract :class:`ImplicitLayer`."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

from ._diagnostics import Diagnostics
from ._errors import BilevelTypeError, BilevelValueError
from ._function import HVP_MODES, ON_FAILURE, implicit_apply
from ._precision import check_dtype_policy
from ._problem import RootProblem
from ._traced import compile_boundary, tracing
from ._types import BackwardDtype, HvpMode, OnFailure

#: role -> (its module, what it is, what it is for) -- for the messages of check_solver_role.
_ROLES = {
    "solver": ("bilevel.solvers", "an inner solver", "for the forward problem, solver=..."),
    "linsolve": ("bilevel.linsolve", "a linear solver", "for the backward's linear system, linsolve=..."),
}


def check_solver_role(role: str, obj: Any, example: str = "GMRES") -> None:
    """``obj`` as the layer's ``solver`` (inner) or ``linsolve`` (backward): an instance from
    its own module or any callable -- not a class, a string, or a solver of the other role,
    whose call signature also fits (``(fn, x0)`` vs ``(matvec, b)``) and which would
    silently solve something else (a linear solver as the inner one solved ``fn(x) = x0``)."""
    from . import linsolve as _ls
    from . import solvers as _solvers

    if isinstance(obj, type):
        raise BilevelTypeError(f"{role} must be a solver instance, e.g. {obj.__name__}(), got the class {obj.__name__}")
    if isinstance(obj, str):
        raise BilevelTypeError(f"{role} must be a solver instance (e.g. {_ROLES[role][0]}.{example}()), got the string {obj!r}")
    classes = {"solver": (_solvers, _solvers.Solver), "linsolve": (_ls, _ls.LinearSolver)}
    other = "linsolve" if role == "solver" else "solver"
    name = type(obj).__name__
    if isinstance(obj, classes[other][1]):
        module, kind, _ = _ROLES[role]
        alt = f"{module}.{name}()" if hasattr(classes[role][0], name) else f"one of {module}"
        raise BilevelTypeError(f"{role}: {name} from {_ROLES[other][0]} is {_ROLES[other][1]} ({_ROLES[other][2]}); "
                               f"as {kind} use {alt}")
    if not callable(obj):
        raise BilevelTypeError(f"{role} must be a {_ROLES[role][0]} solver or a callable, got {name}")


class _Layer:
    """What every layer shares: the backward's configuration, diagnostics, and :meth:`_apply`.

    Configuration is validated here, once, at construction.
    """

    symmetric: ClassVar[bool] = False
    #: The Jacobian is a Hessian at a minimum (Argmin, Proximal): CG is the default.
    positive_definite: ClassVar[bool] = False

    def __init__(
        self, linsolve: Any = None, *, on_failure: OnFailure = "warn", hvp: HvpMode = "reverse",
        backward_dtype: BackwardDtype = "auto", symmetric: bool | None = None,
    ) -> None:
        from . import linsolve as _ls

        sym = self.symmetric if symmetric is None else symmetric
        if linsolve is None:
            # CG where the Jacobian is a Hessian at a minimum (positive semi-definite); MINRES
            # for any other symmetric one (a root condition may be negative definite or
            # indefinite, where CG stops at its first step); GMRES otherwise.
            linsolve = (_ls.CG() if self.positive_definite else _ls.MINRES()) if sym else _ls.GMRES()
        check_solver_role("linsolve", linsolve)
        if getattr(linsolve, "requires_symmetric", False) and not sym:
            raise BilevelValueError(
                f"{type(linsolve).__name__} needs a symmetric operator but {type(self).__name__}'s Jacobian is not "
                "symmetric; use GMRES, BiCGSTAB, Neumann or Dense"
            )
        self.linsolve = linsolve
        if on_failure not in ON_FAILURE:
            raise BilevelValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        self.on_failure: OnFailure = on_failure
        if hvp not in HVP_MODES:
            raise BilevelValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        self.hvp: HvpMode = hvp
        self.backward_dtype = check_dtype_policy("backward_dtype", backward_dtype)
        self.diagnostics = Diagnostics()

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _apply(self, problem: RootProblem) -> Any:
        """Solve ``problem`` and return x*, differentiable w.r.t. the tensor trees in its args."""
        if not isinstance(problem.batched, bool):  # 1, numpy.bool_: a plain bool from here on
            problem = dataclasses.replace(problem, batched=self._batched_flag(problem.batched))
        return implicit_apply(
            problem,
            linsolve=self.linsolve,
            diagnostics=self.diagnostics,
            on_failure=self.on_failure,
            hvp=self.hvp,
            backward_dtype=self.backward_dtype,
            name=self._name,
            # Asked only while dynamo traces: an eager call (the hot path) skips the question.
            traceable=tracing() and self._untraceable(problem.batched) is None,
        )

    def _batched_flag(self, batched: Any) -> bool:
        """``batched`` of a root layer (one vmapped solve or none) as a bool, or a clear error."""
        if isinstance(batched, str) or batched not in (True, False):
            raise BilevelTypeError(
                f"{self._name}: batched must be True or False, got {batched!r} (the strategies 'auto', "
                "'vmap' and 'loop' are Argmin's and Proximal's)"
            )
        return bool(batched)

    def _untraceable(self, batched: Any = False) -> str | None:
        """Why ``torch.compile`` cannot trace a call with this ``batched`` (``None``: it can;
        see :mod:`bilevel._traced`).  A user-written solve may read values on the host: it
        keeps the eager path."""
        return "its solve is user code (ImplicitLayer, FixedPoint, custom_root), which may read values on the host"


class ImplicitLayer(_Layer, abc.ABC):
    """Abstract base: a black-box ``solve`` made differentiable through ``optimality``.

    Subclass and implement:

    * ``solve(x0, *args)`` — any algorithm (it runs under ``torch.no_grad()`` and may be
      non-differentiable or external); returns the solution tree or a result with ``.x``.
    * ``optimality(x, *args)`` — differentiable torch code returning a tree shaped like
      ``x`` that is zero at the solution.

    Calling ``layer(x0, *args)`` returns x*, differentiable with respect to every tensor
    (or tensor tree) in ``args`` by the implicit function theorem; the initial point gets
    no gradient (x* does not depend on it).  If the outer parameters enter only through
    ``x0`` and not through ``optimality``, their implicit gradient is zero: that is why
    :class:`Proximal` puts θ into the optimality condition through its proximal term.

    The built-in layers (:class:`Argmin`, :class:`Proximal`, :class:`FixedPoint`,
    :func:`custom_root`) are registered as implicit layers too (``isinstance`` holds);
    they build their ``(solve, optimality)`` pair per call instead of defining methods.

    Args:
        linsolve: linear solver for the backward system (default: ``MINRES`` when the
            Jacobian is symmetric -- it may be indefinite --, else ``GMRES``;
            :class:`Argmin` and :class:`Proximal`, whose Jacobian is a Hessian at a minimum,
            default to ``CG``).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when the forward or
            the backward solve does not converge.
        hvp: how symmetric Jacobian-vector products are computed in the backward:
            ``"reverse"`` (default: reverse-over-reverse on a graph of the optimality map
            built once per backward and reused by every product; faster than forward mode
            in eager PyTorch, ``benchmarks/backward_cost.py`` measures both)
            or ``"forward"`` (forward-over-reverse, ``torch.func.jvp`` of the optimality
            map, vmap-friendly, falling back to reverse mode for operations without a
            forward-mode rule).
        backward_dtype: the precision of the backward (the Jacobian products, the linear
            solve and its reductions, the argument VJP).  ``"auto"`` (default): the
            float16/bfloat16 tensors lifted to float32 when the solution or an argument is
            in half precision (a float64 one stays float64; the inner solver may run
            in half precision; the adjoint system, a sum of many products, should not),
            else the inputs' own dtype.  ``None``: always the inputs' dtype; a dtype: that
            one.  Gradients are returned in each input's dtype.

    Attributes:
        symmetric: class attribute; ``True`` when ``dF/dx`` is symmetric (an argmin).
        positive_definite: class attribute; ``True`` when ``dF/dx`` is also positive
            definite (the gradient of a strictly convex objective): the default linear
            solver is then ``CG`` instead of ``MINRES``.
        diagnostics: :class:`~bilevel.Diagnostics` of the last forward and backward.

    Examples:
        Babylonian square root (any algorithm) with the optimality condition ``x² - a``:

        >>> import torch, bilevel
        >>> class Sqrt(bilevel.ImplicitLayer):
        ...     symmetric = True                      # dF/dx = diag(2x)
        ...     def solve(self, x0, a):
        ...         x = x0
        ...         for _ in range(30):
        ...             x = 0.5 * (x + a / x)
        ...         return x
        ...     def optimality(self, x, a):
        ...         return x ** 2 - a
        >>> a = torch.tensor([4.0, 9.0], requires_grad=True)
        >>> x = Sqrt()(torch.ones(2), a)
        >>> x.sum().backward()
        >>> x.detach(), a.grad                        # dx*/da = 1 / (2 x*)
        (tensor([2., 3.]), tensor([0.2500, 0.1667]))
    """

    def __init__(
        self, linsolve: Any = None, *, on_failure: OnFailure = "warn", hvp: HvpMode = "reverse",
        backward_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(linsolve, on_failure=on_failure, hvp=hvp, backward_dtype=backward_dtype)

    @abc.abstractmethod
    def solve(self, x0: Any, *args: Any) -> Any:
        """Black-box inner solve (no gradients flow through it)."""

    @abc.abstractmethod
    def optimality(self, x: Any, *args: Any) -> Any:
        """Differentiable residual, zero at the solution, shaped like ``x``."""

    @compile_boundary
    def __call__(self, x0: Any, *args: Any, batched: bool = False) -> Any:
        """Solve and return x*, differentiable w.r.t. the tensors in ``args``.

        With ``batched=True`` every leaf of ``x0`` has a leading task dimension, and
        ``optimality`` must be block-diagonal over tasks (task ``b`` depends only on slice
        ``b`` of ``x``); the linear solver then runs batched with per-task convergence.
        """
        return self._apply(RootProblem(self.solve, self.optimality, x0, args, self.symmetric, batched))
