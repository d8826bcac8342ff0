"""Root layers: :class:`FixedPoint` (``x = fn(x, *args)``) and the :func:`custom_root` decorator."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ._argmin import Argmin
from ._batching import InDims, arg_dims, task_count
from ._errors import BilevelTypeError, BilevelValueError
from ._layer_base import ImplicitLayer, _Layer, check_solver_role
from ._precision import check_dtype_policy, in_master_precision, solve_precision
from ._problem import RootProblem
from ._traced import compile_boundary
from ._tree import batch_size, tree_map
from ._types import BackwardDtype, HvpMode, OnFailure


class FixedPoint(_Layer):
    """x* = fn(x*, *args), differentiable w.r.t. ``args``.

    The optimality condition is ``F(x) = x − fn(x)``; its Jacobian ``I − J`` is not
    symmetric in general, so the backward solves ``(I − J)^T u = v`` with GMRES by
    default.  Valid where ``I − J`` is invertible at x* (e.g. ``fn`` a contraction, when
    ``Neumann(alpha=1)`` also converges: its series is then ``Σ (J^T)^k v``).

    Args:
        fn: ``fn(x, *args) -> tree shaped like x`` for one task.
        solver: default ``FixedPointIteration()``; any callable ``solver(fn, x0, *args,
            batched=...)`` returning a result with ``.x``.
        linsolve: default ``GMRES()``.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` on non-convergence (see
            :class:`ImplicitLayer`).
        backward_dtype: the precision of the backward (see :class:`ImplicitLayer`).
        solve_dtype: the precision of the forward solve, as for :class:`Argmin`:
            ``"auto"`` (default) lifts the float16/bfloat16 unknowns and arguments to
            float32 -- iterate, solver state, tolerance and ``fn``'s inputs -- and returns
            x* in the unknowns' dtype;
            ``None`` iterates in the inputs' precision; a dtype forces one.

    Call ``layer(x0, *args, batched=False, in_dims=0)``.

    Examples:
        ``x = x/2 + a`` has the fixed point ``x* = 2a``, so ``dx*/da = (I - J)^{-1} = 2 I``:

        >>> import torch, bilevel
        >>> layer = bilevel.FixedPoint(lambda x, a: 0.5 * x + a)
        >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> x = layer(torch.zeros(2), a)
        >>> [round(v, 4) for v in x.tolist()]
        [2.0, 4.0]
        >>> x.sum().backward()
        >>> a.grad
        tensor([2., 2.])
    """

    symmetric = False

    def __init__(
        self, fn: Callable[..., Any], solver: Any = None, linsolve: Any = None, *, on_failure: OnFailure = "warn",
        backward_dtype: BackwardDtype = "auto", solve_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(linsolve, on_failure=on_failure, backward_dtype=backward_dtype)
        self.solve_dtype = check_dtype_policy("solve_dtype", solve_dtype)
        self.diagnostics.forward_norm = "residual norm"  # the solvers' grad_norm is ||fn(x) - x||
        if not callable(fn):
            raise BilevelTypeError("fn must be callable")
        if solver is None:
            from .solvers import FixedPointIteration

            solver = FixedPointIteration()
        check_solver_role("solver", solver, example="Anderson")
        self.fn = fn
        self.solver = solver

    @compile_boundary
    def __call__(self, x0: Any, *args: Any, batched: bool = False, in_dims: InDims = 0) -> Any:
        """Solve ``x = fn(x, *args)`` from ``x0`` and return x*, differentiable in ``args``.

        Args:
            x0: the starting point (a tensor or a tree); it gets no gradient.
            *args: ``fn``'s further arguments, after x.
            batched: with ``True`` every leaf of ``x0`` and every argument whose ``in_dims``
                entry is 0 carries a leading task dimension; ``fn`` is written for one task.
            in_dims: per argument of ``args``, 0 (carries the task dimension) or ``None`` (shared).

        Returns:
            x*, shaped like ``x0``.
        """
        fn = self.fn
        batched = self._batched_flag(batched)
        if batched:
            dims = arg_dims(args, in_dims)
            n = batch_size(x0)
            if any(d is not None for d in dims) and task_count(args, dims) != n:
                raise BilevelValueError(f"{self._name}: x0 has {n} tasks but the task data has {task_count(args, dims)}")
            fn = torch.func.vmap(self.fn, in_dims=(0, *dims))

        def call(x0_: Any, *a: Any) -> Any:
            return self.solver(fn, x0_, *a, batched=True) if batched else self.solver(fn, x0_, *a)

        solve = in_master_precision(self._name, *solve_precision(self, x0, args), call)

        def optimality(x: Any, *a: Any) -> Any:
            # x − fn(x), not fn(x) − x: same root and gradient, but I − J has its spectrum
            # near +1 for a contraction, which Neumann and positive-definite-leaning solvers need.
            return tree_map(torch.sub, x, fn(x, *a))

        return self._apply(RootProblem(solve, optimality, x0, args, False, batched))


class _CustomRoot(_Layer):
    """The layer :func:`custom_root` returns: ``solve_fn`` made differentiable through ``optimality_fn``."""

    def __init__(
        self,
        solve_fn: Callable[..., Any],
        optimality_fn: Callable[..., Any],
        symmetric: bool,
        linsolve: Any,
        on_failure: OnFailure,
        hvp: HvpMode,
        backward_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(linsolve, on_failure=on_failure, hvp=hvp, backward_dtype=backward_dtype, symmetric=symmetric)
        self.symmetric = symmetric  # type: ignore[misc]  # per instance: declared by the decorator's caller
        self._solve_fn = solve_fn
        self._optimality_fn = optimality_fn

    @property
    def _name(self) -> str:
        return getattr(self._solve_fn, "__name__", "custom_root")

    @compile_boundary
    def __call__(self, x0: Any, *args: Any, batched: bool = False) -> Any:
        return self._apply(RootProblem(self._solve_fn, self._optimality_fn, x0, args, self.symmetric, batched))


def custom_root(
    optimality_fn: Callable[..., Any],
    linsolve: Any = None,
    *,
    symmetric: bool = False,
    on_failure: OnFailure = "warn",
    hvp: HvpMode = "reverse",
    backward_dtype: BackwardDtype = "auto",
) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: make ``solve(x0, *args)`` differentiable through ``optimality_fn``.

    ``optimality_fn(x, *args)`` returns a tree shaped like x, zero at the solution.  The
    decorated function becomes differentiable w.r.t. every tensor tree in ``args`` (x0
    gets no gradient); its ``.diagnostics`` holds the last solves' statistics.

    Args:
        optimality_fn: the root condition F(x, *args).
        linsolve: backward linear solver (default ``MINRES()`` if ``symmetric`` else ``GMRES()``;
            ``CG()`` is faster where ``dF/dx`` is also positive definite).
        symmetric: declare ``dF/dx`` symmetric (e.g. F is a gradient), enabling CG/MINRES.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` on non-convergence.
        hvp: ``"forward"`` or ``"reverse"`` (symmetric case; see :class:`ImplicitLayer`).
        backward_dtype: the precision of the backward (see :class:`ImplicitLayer`).

    Returns:
        A decorator turning ``solve(x0, *args)`` into a layer called the same way.

    Examples:
        A square root computed outside torch (by ``math.sqrt``), differentiable through
        its optimality condition ``x² - a = 0``: ``dx*/da = 1 / (2 x*)``.

        >>> import math, torch, bilevel
        >>> @bilevel.custom_root(lambda x, a: x ** 2 - a, symmetric=True)
        ... def sqrt(x0, a):
        ...     return torch.tensor([math.sqrt(v) for v in a.tolist()])
        >>> a = torch.tensor([4.0, 9.0], requires_grad=True)
        >>> x = sqrt(torch.ones(2), a)
        >>> x.sum().backward()
        >>> x.detach(), a.grad
        (tensor([2., 3.]), tensor([0.2500, 0.1667]))
    """

    def deco(solve_fn: Callable[..., Any]) -> Any:
        layer = _CustomRoot(solve_fn, optimality_fn, symmetric, linsolve, on_failure, hvp, backward_dtype)
        functools.update_wrapper(layer, solve_fn)  # type: ignore[arg-type]
        return layer

    return deco


# The built-in layers are builders, not subclasses that implement solve/optimality; they
# are implicit layers all the same (isinstance(layer, ImplicitLayer) holds).
for _cls in (Argmin, FixedPoint, _CustomRoot):
    ImplicitLayer.register(_cls)
