"""The argmin layer: ``x*(args) = argmin_x objective(x, *args)``, and the objective wrappers it builds."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._batching import (
    InDims,
    arg_dims,
    measure_strategies,
    shape_key,
    strategy_of,
    task_count,
)
from ._errors import BilevelTypeError, BilevelValueError
from ._guards import solution_of
from ._layer_base import _Layer, check_solver_role
from ._precision import (
    check_dtype_policy,
    explain_dtype_errors,
    in_master_precision,
    solve_precision,
)
from ._problem import ClosedBt, RootProblem, task_slice
from ._result import SolverResult, stack_results
from ._traced import compile_boundary, tracing, untraceable_linsolve, untraceable_solver
from ._transforms import any_dual, any_wrapped
from ._tree import batch_size, is_tree, tree_flatten, tree_map
from ._types import BackwardDtype, Batched, HvpMode, OnFailure


def _scalar_objective(objective: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
    @functools.wraps(objective)
    def f(x: Any, *args: Any) -> Tensor:
        v = objective(x, *args)
        if not isinstance(v, Tensor):
            raise BilevelTypeError(f"{name}: the objective must return a tensor, got {type(v).__name__}")
        if v.dim() != 0:
            raise BilevelValueError(
                f"{name}: the objective must return a scalar (0-d tensor) per task, got shape {tuple(v.shape)}"
            )
        return v

    return f


def _sum_grad(objective: Callable[..., Tensor]) -> Callable[..., Any]:
    """Optimality map ``x -> grad_x sum(objective(x, ...))`` (block-diagonal over tasks)."""

    def F(x: Any, *args: Any) -> Any:
        return torch.func.grad(lambda y: objective(y, *args).sum())(x)

    return F


def _damped(optimality: Callable[..., Any], damping: float) -> Callable[..., Any]:
    """``F(x, *args) + δ (x − stop_gradient(x))``: the same value and the same ``∂F/∂args``,
    but ``∂F/∂x + δI``.  The backward therefore solves ``(A + δI) u = v`` while the VJP
    with respect to the arguments, ``−Bᵀu``, is unchanged (Tikhonov damping of the
    adjoint system only; the inner solver never sees the term)."""

    def F(x: Any, *args: Any) -> Any:
        return tree_map(lambda g, xi: g + damping * (xi - xi.detach()), optimality(x, *args), x)

    return F


class Argmin(_Layer):
    """x*(args) = argmin_x objective(x, *args), differentiable w.r.t. ``args``.

    The optimality condition is ``grad_x objective = 0``; its Jacobian is the Hessian,
    symmetric, so the backward solves ``H u = v`` with CG by default (positive definite
    when the objective is strongly convex at x*; use ``MINRES`` otherwise).

    Args:
        objective: ``objective(x, *args) -> scalar tensor`` for one task.
        solver: an inner solver from :mod:`bilevel.solvers` (default ``NewtonCG()``),
            or any callable ``solver(objective, x0, *args, batched=...)`` returning a
            result with ``.x``.
        linsolve: backward linear solver (default ``CG()``).
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` on non-convergence (see
            :class:`ImplicitLayer`).
        hvp: ``"reverse"`` or ``"forward"`` Hessian-vector products in the backward (see
            :class:`ImplicitLayer`).
        backward_dtype: the precision of the backward (see :class:`ImplicitLayer`).
        solve_dtype: the precision of the inner solve: ``"auto"`` (default) lifts the
            float16/bfloat16 unknowns and arguments to float32 (a float64 one stays float64)
            -- iterate, solver state, tolerance and the objective's inputs; the solution is returned in the unknowns' dtype (a master copy, as in
            mixed-precision training); ``None`` solves in the inputs' precision; a dtype
            forces one.  A half-precision tensor the objective closes over is not lifted:
            pass it as an argument.  Under ``torch.autocast`` the objective's
            operations still run in the autocast precision.

    Call ``layer(x0, *args, batched=False, in_dims=0)``.  In batched mode the objective is
    still written for one task; it is vmapped over the leading task dimension of ``x0``
    and of the arguments whose ``in_dims`` entry is 0 (``None`` marks a shared argument).

    Examples:
        Ridge regression with a learned weight decay ``w``: ``x*(w) = (XᵀX + w I)^{-1} Xᵀy``,
        so ``dx*/dw = -(XᵀX + w I)^{-1} x*``, which the backward computes without
        differentiating through the solver:

        >>> import torch, bilevel
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> ridge = bilevel.Argmin(lambda x, w: 0.5 * ((X @ x - y) ** 2).sum() + 0.5 * w * (x @ x))
        >>> x = ridge(torch.zeros(2, dtype=torch.float64), w)
        >>> (dx_dw,) = torch.autograd.grad(x.sum(), w)
        >>> A = X.T @ X + w.detach() * torch.eye(2, dtype=torch.float64)
        >>> exact = -torch.linalg.solve(A, torch.linalg.solve(A, X.T @ y)).sum()
        >>> torch.allclose(dx_dw, exact)
        True
    """

    symmetric = True
    positive_definite = True

    def __init__(
        self,
        objective: Callable[..., Tensor],
        solver: Any = None,
        linsolve: Any = None,
        *,
        on_failure: OnFailure = "warn",
        hvp: HvpMode = "reverse",
        backward_dtype: BackwardDtype = "auto",
        solve_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(linsolve, on_failure=on_failure, hvp=hvp, backward_dtype=backward_dtype)
        self.solve_dtype = check_dtype_policy("solve_dtype", solve_dtype)
        if not callable(objective):
            raise BilevelTypeError("objective must be callable")
        if solver is None:
            from .solvers import NewtonCG

            solver = NewtonCG()
        check_solver_role("solver", solver, example="NewtonCG")
        self.objective = objective
        self.solver = solver

    def _untraceable(self, batched: Any = False) -> str | None:
        if batched == "loop":
            return "the per-task loop strategy (batched='loop') keeps one graph of F per task"
        return untraceable_solver(self.solver) or untraceable_linsolve(self.linsolve)

    def _objectives(self, objective: Callable[..., Tensor], strategy: str | None, dims: tuple) -> tuple[Any, Any]:
        """``(one, obj)``: the checked objective of one task and the one the solver gets
        (vmapped over tasks for ``strategy="vmap"``).

        Built once per objective, strategy and task dims, and reused by later calls: a
        solver that caches work per objective function (``GradientDescent(compile=True)``'s
        compiled step) must see the same function object on every call.
        """
        cache: dict[tuple, tuple[Any, Any]] = self.__dict__.setdefault("_objective_cache", {})
        key = (objective, strategy, dims)
        if key not in cache:
            one = _scalar_objective(objective, self._name)
            cache[key] = (one, torch.func.vmap(one, in_dims=(0, *dims)) if strategy == "vmap" else one)
        return cache[key]

    def _resolve(self, strategy: str | None, objective: Callable[..., Tensor], x0: Any, args: tuple, dims: tuple) -> str | None:
        """The strategy of this call: ``"auto"`` becomes ``"vmap"`` or ``"loop"``, measured on
        the first call of each shape (:func:`_measure_strategies`) and remembered; the
        diagnostics say which ran and, when measured, the times behind the choice.

        Why measured: which is faster depends on the net, the task size and the device
        (``benchmarks/metastep.py``; docs/performance.md): a fixed rule on the examples per
        task, measured on one conv net, picked the slower strategy on another.
        Not measured (``"vmap"``): inside a ``torch.func`` transform, with forward-mode
        (dual) tensors -- the loop has no forward-mode rule, so a measured choice of the loop
        must not apply to them --, on meta tensors, or for a single task; a solver declaring
        ``supports_batched = False`` gets ``"loop"``.
        """
        diag = self.diagnostics
        if strategy != "auto":
            diag.strategy, diag.strategy_seconds = strategy, None
            return strategy
        if getattr(self.solver, "supports_batched", True) is False:
            diag.strategy, diag.strategy_seconds = "loop", None
            return "loop"
        if tracing():  # a timing cannot be traced, and the traced path runs the vmapped solve
            diag.strategy, diag.strategy_seconds = "vmap", None
            return "vmap"
        leaves = [*tree_flatten(x0)[0], *(t for a in args if is_tree(a) for t in tree_flatten(a)[0])]
        if batch_size(x0) < 2 or any_wrapped(leaves) or any_dual(leaves) or any(t.device.type == "meta" for t in leaves):
            diag.strategy, diag.strategy_seconds = "vmap", None
            return "vmap"
        cache: dict[tuple, dict[str, float]] = self.__dict__.setdefault("_strategy_cache", {})
        key = shape_key(x0, args, dims)
        if key not in cache:
            cache[key] = measure_strategies(_scalar_objective(objective, self._name), x0, args, dims)
        seconds = cache[key]
        diag.strategy, diag.strategy_seconds = min(seconds, key=seconds.__getitem__), dict(seconds)
        return diag.strategy

    def strategy_state(self) -> dict[tuple, dict[str, float]]:
        """What ``batched=True`` (``"auto"``) has measured so far: per shape key, the seconds
        of each strategy (the choice is the faster).  Part of a training's state: a run that
        resumes from a checkpoint restores it with :meth:`load_strategy_state` and makes the
        same choices (vmap and the loop agree to rounding only, and a new timing can come out
        the other way).  Plain tuples, strings, floats and dtypes: it saves with
        ``torch.save`` and loads with ``weights_only=True``.

        Examples:
            >>> import torch, bilevel
            >>> from bilevel.solvers import GradientDescent
            >>> layer = bilevel.Proximal(lambda p, x: ((p - x) ** 2).sum(), 1.0, solver=GradientDescent(0.1, steps=3))
            >>> phi = layer(torch.zeros(2), torch.ones(4, 2), batched=True)
            >>> state = layer.strategy_state()
            >>> again = bilevel.Proximal(layer.objective, 1.0, solver=GradientDescent(0.1, steps=3))
            >>> again.load_strategy_state(state)
            >>> phi = again(torch.zeros(2), torch.ones(4, 2), batched=True)
            >>> again.diagnostics.strategy == layer.diagnostics.strategy
            True
        """
        return {k: dict(v) for k, v in self.__dict__.get("_strategy_cache", {}).items()}

    def load_strategy_state(self, state: dict[tuple, dict[str, float]]) -> None:
        """Restore measurements saved by :meth:`strategy_state` (added to this layer's own)."""
        if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
            raise BilevelTypeError(f"{self._name}: load_strategy_state takes what strategy_state() returned")
        self.__dict__.setdefault("_strategy_cache", {}).update({k: dict(v) for k, v in state.items()})

    def _problem(
        self, objective: Callable[..., Tensor], x0: Any, args: tuple, dims: tuple, strategy: str | None,
        damping: float = 0.0, closed_bt: ClosedBt | None = None, arg_labels: tuple[str, ...] | None = None,
        x0_copied: bool = False,
    ) -> RootProblem:
        """The ``(solve, optimality)`` pair of one call.  ``strategy``: None (one task),
        ``"vmap"`` or ``"loop"`` (a batch of tasks)."""
        one, obj = self._objectives(objective, strategy, dims)
        master, lift, lower = solve_precision(self, x0, args)
        if strategy == "loop":
            optimality_one = _sum_grad(one)
            if damping:
                optimality_one = _damped(optimality_one, damping)

            def solve_loop(x0_: Any, *a: Any) -> Any:
                results = []
                x0_, a = lift(x0_), lift(a)  # once, not per task
                for b in range(batch_size(x0_)):
                    x0_b = tree_map(lambda t, b=b: t[b], x0_)
                    with explain_dtype_errors(self._name, "inner solve", "solve_dtype", master):
                        results.append(self.solver(one, x0_b, *task_slice(a, dims, b)))
                xs = [lower(solution_of(r, self._name)) for r in results]
                x = tree_map(lambda *ls: torch.stack(ls), *xs)
                if all(isinstance(r, SolverResult) for r in results):
                    return stack_results(results, x)
                return x

            # The backward uses task_optimality task by task (the batched optimality is unused then).
            return RootProblem(solve_loop, optimality_one, x0, args, True, True, task_optimality=optimality_one,
                               task_dims=dims, closed_bt=closed_bt, arg_labels=arg_labels, x0_copied=x0_copied)

        def call(x0_: Any, *a: Any) -> Any:
            return self.solver(obj, x0_, *a, batched=True) if strategy else self.solver(obj, x0_, *a)

        solve = in_master_precision(self._name, master, lift, lower, call)

        optimality = _sum_grad(obj)
        if damping:
            optimality = _damped(optimality, damping)
        return RootProblem(solve, optimality, x0, args, True, strategy is not None, closed_bt=closed_bt,
                           arg_labels=arg_labels, x0_copied=x0_copied)

    @compile_boundary
    def __call__(self, x0: Any, *args: Any, batched: Batched = False, in_dims: InDims = 0) -> Any:
        """Minimise the objective from ``x0`` and return x*, differentiable in ``args``.

        Args:
            x0: the starting point (a tensor or a tree); it gets no gradient.
            *args: the objective's further arguments, after x.
            batched: ``False`` (one task), ``True``/``"auto"`` (measured), ``"vmap"`` or ``"loop"``;
                when batched, ``x0`` carries the task dimension.
            in_dims: per argument of ``args``, 0 (carries the task dimension) or ``None`` (shared).

        Returns:
            x*, shaped like ``x0``.
        """
        strategy = strategy_of(batched, x0, self._name)
        dims = arg_dims(args, in_dims) if strategy else ()
        if strategy:
            n = batch_size(x0)
            if any(d is not None for d in dims) and task_count(args, dims) != n:
                raise BilevelValueError(f"x0 has {n} tasks but the task data has {task_count(args, dims)}")
        strategy = self._resolve(strategy, self.objective, x0, args, dims)
        return self._apply(self._problem(self.objective, x0, args, dims, strategy))
