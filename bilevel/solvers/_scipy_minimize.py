"""Any ``scipy.optimize.minimize`` method as an inner solver."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import scipy.optimize
import torch

from .._autodiff import Objective, hvp, value, value_and_grad
from .._autodiff import total as _total
from .._errors import BilevelValueError
from .._result import SolverResult, Status
from .._tree import tree_detach, tree_dtype, tree_ravel, tree_unravel
from .._validate import check_real
from ._base import Solver

# Method names as scipy spells them; matched case-insensitively, as scipy does.
SCIPY_METHODS: tuple[str, ...] = (
    "Nelder-Mead",
    "Powell",
    "CG",
    "BFGS",
    "Newton-CG",
    "L-BFGS-B",
    "TNC",
    "COBYLA",
    "COBYQA",
    "SLSQP",
    "trust-constr",
    "dogleg",
    "trust-ncg",
    "trust-exact",
    "trust-krylov",
)
"""The ``method`` names :class:`ScipyMinimize` accepts (``scipy.optimize.minimize``'s
unconstrained methods; matched case-insensitively).

Examples:
    >>> from bilevel.solvers import SCIPY_METHODS, ScipyMinimize
    >>> "L-BFGS-B" in SCIPY_METHODS, len(SCIPY_METHODS)
    (True, 15)
    >>> ScipyMinimize("nelder-mead").method in ("nelder-mead", "Nelder-Mead")
    True
"""
# Which methods use which derivatives (scipy warns — an error under our test settings —
# when given a derivative the method ignores, so each is passed only where it is used).
_DERIVATIVE_FREE = frozenset({"nelder-mead", "powell", "cobyla", "cobyqa"})
_USES_HESSP = frozenset({"newton-cg", "trust-ncg", "trust-krylov", "trust-constr"})
_NEEDS_HESS = frozenset({"dogleg", "trust-exact"})  # these take a full Hessian, not hessp


@dataclasses.dataclass(frozen=True)
class ScipyMinimize(Solver):
    """Minimise with ``scipy.optimize.minimize(method=...)`` on the flattened tree.

    The tree ``x0`` is flattened to one float64 NumPy vector (:func:`tree_ravel`); each
    evaluation unflattens it back to the tree's own dtypes and devices
    (:func:`tree_unravel`), runs the torch objective and returns float64 values to scipy.
    Derivatives come from autodiff and are supplied only to methods that use them:
    ``jac`` (value and gradient from one pass) to gradient-based methods, ``hessp``
    (forward-over-reverse HVP) to Newton-CG, trust-ncg, trust-krylov and trust-constr,
    and a full Hessian (``n`` HVPs at once) to dogleg and trust-exact.  Derivative-free
    methods (Nelder-Mead, Powell, COBYLA, COBYQA) only evaluate the objective, which then
    need not be differentiable.

    Result mapping: ``SUCCESS`` if ``res.success``; ``NONFINITE`` if the returned point or
    value is NaN/Inf; otherwise ``EXTERNAL_FAILURE`` with scipy's message.  ``iterations``
    is ``res.nit`` (0 where scipy gives none); ``n_fun``/``n_grad``/``n_hvp`` count the
    torch evaluations this wrapper actually made (they equal scipy's ``nfev``/``njev``/
    ``nhev`` where scipy counts them); ``grad_norm`` is ``||res.jac||`` where scipy returns
    a gradient, else ``None``.  The raw ``OptimizeResult`` is kept in ``raw``.
    Unbatched only.  Bounds and constraints are not supported.

    Args:
        method: a name from :data:`SCIPY_METHODS` (case-insensitive).
        tol: scipy's ``tol`` (its meaning depends on the method), or ``None``.
        options: scipy's ``options`` dict for the method (stored read-only).

    Examples:
        >>> import torch
        >>> from bilevel.solvers import ScipyMinimize
        >>> f = lambda x: ((x - 2.0) ** 2).sum() + x.prod()       # minimum at (4/3, 4/3)
        >>> res = ScipyMinimize("BFGS")(f, torch.zeros(2))
        >>> res.status.name, [round(v, 3) for v in res.x.tolist()], type(res.raw).__name__
        ('SUCCESS', [1.333, 1.333], 'OptimizeResult')

        A derivative-free method takes no gradient (the objective may leave torch):

        >>> res = ScipyMinimize("Nelder-Mead", tol=1e-8)(f, torch.zeros(2, dtype=torch.float64))
        >>> res.n_grad, [round(v, 3) for v in res.x.tolist()]
        (0, [1.333, 1.333])
    """

    method: str = "L-BFGS-B"
    tol: float | None = None
    options: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)

    supports_batched: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.method, str) or self.method.lower() not in {m.lower() for m in SCIPY_METHODS}:
            raise BilevelValueError(f"{name}: unknown method {self.method!r}; expected one of {', '.join(SCIPY_METHODS)}")
        if self.tol is not None:
            check_real(name, "tol", self.tol, 0.0)
        if self.options is not None:
            if not isinstance(self.options, Mapping):
                raise BilevelValueError(f"{name}: options must be a dict, got {type(self.options).__name__}")
            object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))

    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        self._check_batched(batched)
        tree_dtype(x0)  # validates the tree
        like = tree_detach(x0)
        meth = self.method.lower()
        counts = {"fun": 0, "grad": 0, "hvp": 0}

        def to_tree(v: np.ndarray) -> Any:
            return tree_unravel(like, torch.as_tensor(np.asarray(v, dtype=np.float64)))

        def to_numpy(t: Any) -> np.ndarray:
            return tree_ravel(t).detach().to(device="cpu", dtype=torch.float64).numpy().copy()

        def fun(v: np.ndarray) -> float:
            counts["fun"] += 1
            return float(value(objective, to_tree(v), args))

        def fun_and_jac(v: np.ndarray) -> tuple[float, np.ndarray]:
            counts["fun"] += 1
            counts["grad"] += 1
            f, g = value_and_grad(objective, to_tree(v), args)
            return float(f), to_numpy(g)

        def hessp(v: np.ndarray, p: np.ndarray) -> np.ndarray:
            counts["hvp"] += 1
            return to_numpy(hvp(objective, to_tree(v), to_tree(p), args))

        def hess(v: np.ndarray) -> np.ndarray:
            # Full Hessian of the flattened objective: n forward-over-reverse HVPs at once.
            n = v.size
            counts["hvp"] += n
            flat0 = tree_ravel(like)

            def f_flat(u: torch.Tensor) -> torch.Tensor:
                return _total(objective, False)(tree_unravel(like, u), *args)[0]

            u = torch.as_tensor(np.asarray(v, dtype=np.float64)).to(dtype=flat0.dtype, device=flat0.device)
            h = torch.func.jacfwd(torch.func.grad(f_flat))(u)
            return h.detach().to(device="cpu", dtype=torch.float64).numpy().copy()

        kwargs: dict[str, Any] = {"method": self.method, "tol": self.tol}
        if self.options is not None:
            kwargs["options"] = dict(self.options)
        if meth in _DERIVATIVE_FREE:
            kwargs["fun"] = fun
        else:
            kwargs["fun"] = fun_and_jac
            kwargs["jac"] = True
        if meth in _USES_HESSP:
            kwargs["hessp"] = hessp
        if meth in _NEEDS_HESS:
            kwargs["hess"] = hess
        v0 = to_numpy(like)
        fun_ = kwargs.pop("fun")
        res = scipy.optimize.minimize(fun_, v0, **kwargs)

        x = to_tree(res.x)
        dtype = tree_dtype(like)
        fval = torch.tensor(float(res.fun), dtype=dtype) if np.ndim(res.fun) == 0 else None
        jac = getattr(res, "jac", None)
        gnorm = None
        if jac is not None and np.ndim(jac) == 1 and np.size(jac) == v0.size:
            gnorm = torch.tensor(float(np.linalg.norm(jac)), dtype=dtype)
        finite = bool(np.all(np.isfinite(res.x))) and (fval is None or math.isfinite(float(fval)))
        if not finite:
            status = Status.NONFINITE
        elif res.success:
            status = Status.SUCCESS
        else:
            status = Status.EXTERNAL_FAILURE
        nit = getattr(res, "nit", None)
        return SolverResult(
            x=x,
            status=status,
            iterations=int(nit) if nit is not None else 0,
            grad_norm=gnorm,
            value=fval,
            n_fun=counts["fun"],
            n_grad=counts["grad"],
            n_hvp=counts["hvp"],
            raw=res,
            message=f"scipy.optimize.minimize({self.method}): {getattr(res, 'message', '')}",
        )
