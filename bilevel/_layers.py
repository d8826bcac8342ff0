"""User-facing implicit layers: ImplicitLayer, Argmin, Proximal, FixedPoint, custom_root."""

from __future__ import annotations

import abc
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from ._diagnostics import Diagnostics
from ._errors import BilevelTypeError, BilevelValueError
from ._implicit import (
    _HVP_MODES,
    _ON_FAILURE,
    ClosedVJP,
    Problem,
    implicit_apply,
    task_slice,
)
from ._result import SolverResult, stack_solver_results
from ._timing import time_alternatives
from ._transforms import any_wrapped
from ._tree import batch_size, is_tree, tree_flatten, tree_map
from ._types import BackwardDtype, Batched, HvpMode, OnFailure

InDims = Union[int, None, Sequence[int | None]]
_STRATEGIES = ("auto", "vmap", "loop")


def _strategy(batched: Any, x: Any, name: str) -> str | None:
    """How a batch of tasks runs: None (not batched), "auto", "vmap" or "loop"."""
    if batched is False:
        return None
    if batched is True:
        return "auto"
    if isinstance(batched, str) and batched in _STRATEGIES:
        return batched
    raise BilevelValueError(f"{name}: batched must be False, True or one of {_STRATEGIES}, got {batched!r}")


def _shape_key(x0: Any, args: tuple, dims: Sequence[int | None]) -> tuple:
    """What the ``"auto"`` choice depends on: the device, dtypes and shapes of the unknowns
    and of the arguments (and which of them carry the task dimension)."""
    leaves = tree_flatten(x0)[0]
    key: list[Any] = [str(leaves[0].device)] + [(tuple(t.shape), t.dtype) for t in leaves]
    for a, d in zip(args, dims):
        if is_tree(a):
            key.append((d, tuple((tuple(t.shape), t.dtype) for t in tree_flatten(a)[0])))
    return tuple(key)


def _measure_strategies(one: Callable[..., Tensor], x0: Any, args: tuple, dims: tuple) -> dict[str, float]:
    """Seconds per strategy of what a batched solve is made of: one gradient and one
    Hessian-vector product of the objective for every task -- vmapped over the tasks, or one
    task at a time.  The inner solver's steps and the Krylov iterations of the backward are
    repetitions of exactly these, so their ratio is the solve's.

    Cost, once per shape: a warm-up gradient each way (the first ``torch.func`` transform of
    a process imports modules; the allocator warms up), then one timed round each; a second
    round, interleaved, only if the two are within 1.3× of each other (the faster round of
    each counts: :func:`~bilevel.time_alternatives`).  That is about two to four meta-steps'
    worth of gradients of one inner step -- a fraction of one meta-step of a 16-step inner
    loop."""
    from ._implicit import _suspended_saved_tensor_hooks
    from ._autodiff import hvp, value_and_grad

    x = tree_map(lambda t: t.detach(), x0)
    a = tuple(tree_map(lambda t: t.detach(), v) if is_tree(v) else v for v in args)
    v = tree_map(torch.ones_like, x)
    batched_obj = torch.func.vmap(one, in_dims=(0, *dims))
    n = batch_size(x)

    def vmapped(with_hvp: bool = True) -> None:
        value_and_grad(batched_obj, x, a, batched=True)
        if with_hvp:
            hvp(batched_obj, x, v, a, batched=True)

    def looped(with_hvp: bool = True) -> None:
        for b in range(n):
            xb, vb = tree_map(lambda t, b=b: t[b], x), tree_map(lambda t, b=b: t[b], v)
            ab = task_slice(a, dims, b)
            value_and_grad(one, xb, ab)
            if with_hvp:
                hvp(one, xb, vb, ab)

    device = tree_flatten(x)[0][0].device
    with _suspended_saved_tensor_hooks():
        return time_alternatives({"vmap": vmapped, "loop": looped}, device,
                                 warmups={"vmap": lambda: vmapped(False), "loop": lambda: looped(False)})


def _solution_tree(result: Any) -> Any:
    return result.x if hasattr(result, "x") and not isinstance(result, Tensor) else result


def _arg_dims(args: tuple, in_dims: InDims) -> tuple[int | None, ...]:
    """Per-argument vmap dims: ``in_dims`` for tensor trees, ``None`` for static objects."""
    if in_dims is None or isinstance(in_dims, int):
        return tuple(in_dims if is_tree(a) else None for a in args)
    dims = tuple(in_dims)
    if len(dims) != len(args):
        raise BilevelValueError(f"in_dims has {len(dims)} entries for {len(args)} arguments")
    for a, d in zip(args, dims):
        if d is not None and not is_tree(a):
            raise BilevelValueError(f"in_dims gives dimension {d} to a non-tensor argument of type {type(a).__name__}")
    return dims


def _task_count(args: tuple, dims: tuple[int | None, ...]) -> int:
    sizes = set()
    for a, d in zip(args, dims):
        if d is not None:
            for leaf in tree_flatten(a)[0]:
                sizes.add(leaf.shape[d])
    if len(sizes) != 1:
        raise BilevelValueError(
            "batched mode needs task data with one common leading (task) dimension; "
            f"found sizes {sorted(sizes) if sizes else 'none (no batched argument)'}"
        )
    n = sizes.pop()
    if n == 0:
        raise BilevelValueError("batched mode got a batch of 0 tasks (the task dimension of the data is empty)")
    return n


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


class _Layer:
    """What every layer shares: the backward's configuration, diagnostics, and :meth:`_apply`.

    Configuration is validated here, once, at construction.
    """

    symmetric: ClassVar[bool] = False

    def __init__(
        self, linsolve: Any = None, *, on_failure: OnFailure = "warn", hvp: HvpMode = "reverse",
        backward_dtype: BackwardDtype = "auto", symmetric: bool | None = None,
    ) -> None:
        from . import linsolve as _ls

        sym = self.symmetric if symmetric is None else symmetric
        if linsolve is None:
            linsolve = _ls.CG() if sym else _ls.GMRES()
        if not isinstance(linsolve, _ls.LinearSolver) and not callable(linsolve):
            raise BilevelTypeError(f"linsolve must be a bilevel.linsolve solver, got {type(linsolve).__name__}")
        if getattr(linsolve, "requires_symmetric", False) and not sym:
            raise BilevelValueError(
                f"{type(linsolve).__name__} needs a symmetric operator but {type(self).__name__}'s Jacobian is not "
                "symmetric; use GMRES, BiCGSTAB, Neumann or Dense"
            )
        self.linsolve = linsolve
        if on_failure not in _ON_FAILURE:
            raise BilevelValueError(f"on_failure must be one of {_ON_FAILURE}, got {on_failure!r}")
        self.on_failure: OnFailure = on_failure
        if hvp not in _HVP_MODES:
            raise BilevelValueError(f"hvp must be one of {_HVP_MODES}, got {hvp!r}")
        self.hvp: HvpMode = hvp
        if not (backward_dtype in ("auto", None) or (isinstance(backward_dtype, torch.dtype) and backward_dtype.is_floating_point)):
            raise BilevelValueError(f"backward_dtype must be 'auto', None or a floating torch.dtype, got {backward_dtype!r}")
        self.backward_dtype = backward_dtype
        self.diagnostics = Diagnostics()

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _apply(self, problem: Problem) -> Any:
        """Solve ``problem`` and return x*, differentiable w.r.t. the tensor trees in its args."""
        return implicit_apply(
            problem,
            linsolve=self.linsolve,
            diagnostics=self.diagnostics,
            on_failure=self.on_failure,
            hvp=self.hvp,
            backward_dtype=self.backward_dtype,
            name=self._name,
        )


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
        linsolve: linear solver for the backward system (default: ``CG`` when the
            Jacobian is symmetric, else ``GMRES``).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when the forward or
            the backward solve does not converge.
        hvp: how symmetric Jacobian-vector products are computed in the backward:
            ``"reverse"`` (default: reverse-over-reverse on a graph of the optimality map
            built once per backward and reused by every product; measured 5.5× faster
            than forward mode for a 20-iteration CG backward, ``benchmarks/README.md``)
            or ``"forward"`` (forward-over-reverse, ``torch.func.jvp`` of the optimality
            map, vmap-friendly, falling back to reverse mode for operations without a
            forward-mode rule).
        backward_dtype: the precision of the backward (the Jacobian products, the linear
            solve and its reductions, the argument VJP).  ``"auto"`` (default): float32
            when the solution or an argument is float16/bfloat16 (the inner solver may run
            in half precision; the adjoint system, a sum of many products, should not),
            else the inputs' own dtype.  ``None``: always the inputs' dtype; a dtype: that
            one.  Gradients are returned in each input's dtype.

    Attributes:
        symmetric: class attribute; ``True`` when ``dF/dx`` is symmetric (an argmin).
        diagnostics: :class:`~bilevel.Diagnostics` of the last forward and backward.
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

    def __call__(self, x0: Any, *args: Any, batched: bool = False) -> Any:
        """Solve and return x*, differentiable w.r.t. the tensors in ``args``.

        With ``batched=True`` every leaf of ``x0`` has a leading task dimension, and
        ``optimality`` must be block-diagonal over tasks (task ``b`` depends only on slice
        ``b`` of ``x``); the linear solver then runs batched with per-task convergence.
        """
        return self._apply(Problem(self.solve, self.optimality, x0, args, self.symmetric, batched))


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
        on_failure, hvp: see :class:`ImplicitLayer`.

    Call ``layer(x0, *args, batched=False, in_dims=0)``.  In batched mode the objective is
    still written for one task; it is vmapped over the leading task dimension of ``x0``
    and of the arguments whose ``in_dims`` entry is 0 (``None`` marks a shared argument).
    """

    symmetric = True

    def __init__(
        self,
        objective: Callable[..., Tensor],
        solver: Any = None,
        linsolve: Any = None,
        *,
        on_failure: OnFailure = "warn",
        hvp: HvpMode = "reverse",
        backward_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(linsolve, on_failure=on_failure, hvp=hvp, backward_dtype=backward_dtype)
        if not callable(objective):
            raise BilevelTypeError("objective must be callable")
        if solver is None:
            from .solvers import NewtonCG

            solver = NewtonCG()
        if not callable(solver):
            raise BilevelTypeError(f"solver must be callable, got {type(solver).__name__}")
        self.objective = objective
        self.solver = solver

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
        (``benchmarks/metastep.py``; README "Performance"): a fixed rule on the examples per
        task, measured on one conv net, picked the slower strategy on another.
        Not measured (``"vmap"``): inside a ``torch.func`` transform, on meta tensors, or for
        a single task; a solver declaring ``supports_batched = False`` gets ``"loop"``.
        """
        diag = self.diagnostics
        if strategy != "auto":
            diag.strategy, diag.strategy_seconds = strategy, None
            return strategy
        if getattr(self.solver, "supports_batched", True) is False:
            diag.strategy, diag.strategy_seconds = "loop", None
            return "loop"
        leaves = [*tree_flatten(x0)[0], *(t for a in args if is_tree(a) for t in tree_flatten(a)[0])]
        if batch_size(x0) < 2 or any_wrapped(leaves) or any(t.device.type == "meta" for t in leaves):
            diag.strategy, diag.strategy_seconds = "vmap", None
            return "vmap"
        cache: dict[tuple, dict[str, float]] = self.__dict__.setdefault("_strategy_cache", {})
        key = _shape_key(x0, args, dims)
        if key not in cache:
            cache[key] = _measure_strategies(_scalar_objective(objective, self._name), x0, args, dims)
        seconds = cache[key]
        diag.strategy, diag.strategy_seconds = min(seconds, key=seconds.__getitem__), dict(seconds)
        return diag.strategy

    def _problem(
        self, objective: Callable[..., Tensor], x0: Any, args: tuple, dims: tuple, strategy: str | None,
        damping: float = 0.0, closed_vjp: ClosedVJP | None = None,
    ) -> Problem:
        """The ``(solve, optimality)`` pair of one call.  ``strategy``: None (one task),
        ``"vmap"`` or ``"loop"`` (a batch of tasks)."""
        one, obj = self._objectives(objective, strategy, dims)
        if strategy == "loop":
            optimality_one = _sum_grad(one)
            if damping:
                optimality_one = _damped(optimality_one, damping)

            def solve_loop(x0_: Any, *a: Any) -> Any:
                results = []
                for b in range(batch_size(x0_)):
                    x0_b = tree_map(lambda t, b=b: t[b], x0_)
                    results.append(self.solver(one, x0_b, *task_slice(a, dims, b)))
                xs = [_solution_tree(r) for r in results]
                x = tree_map(lambda *ls: torch.stack(ls), *xs)
                if all(isinstance(r, SolverResult) for r in results):
                    return stack_solver_results(results, x)
                return x

            # The backward uses task_optimality task by task (the batched optimality is unused then).
            return Problem(solve_loop, optimality_one, x0, args, True, True, task_optimality=optimality_one,
                           task_dims=dims, closed_vjp=closed_vjp)

        def solve(x0_: Any, *a: Any) -> Any:
            return self.solver(obj, x0_, *a, batched=True) if strategy else self.solver(obj, x0_, *a)

        optimality = _sum_grad(obj)
        if damping:
            optimality = _damped(optimality, damping)
        return Problem(solve, optimality, x0, args, True, strategy is not None, closed_vjp=closed_vjp)

    def __call__(self, x0: Any, *args: Any, batched: Batched = False, in_dims: InDims = 0) -> Any:
        strategy = _strategy(batched, x0, self._name)
        dims = _arg_dims(args, in_dims) if strategy else ()
        if strategy:
            n = batch_size(x0)
            if any(d is not None for d in dims) and _task_count(args, dims) != n:
                raise BilevelValueError(f"x0 has {n} tasks but the task data has {_task_count(args, dims)}")
        strategy = self._resolve(strategy, self.objective, x0, args, dims)
        return self._apply(self._problem(self.objective, x0, args, dims, strategy))


def _lam_tree(lam: Any, theta: Any, name: str) -> Any:
    """Validate λ and return it as a tensor or a tree matching θ (leaves 0-d or θ-shaped)."""
    t_leaves, t_def = tree_flatten(theta)
    ref = t_leaves[0]
    if isinstance(lam, bool) or not isinstance(lam, (int, float, Tensor, dict, list, tuple)):
        raise BilevelTypeError(f"{name}: lam must be a float, a tensor or a tree of tensors matching theta, got {type(lam).__name__}")
    if isinstance(lam, (int, float)):
        if not math.isfinite(lam) or lam <= 0:
            raise BilevelValueError(f"{name}: lam must be finite and > 0, got {lam}")
        return torch.tensor(float(lam), dtype=ref.dtype, device=ref.device)
    if isinstance(lam, Tensor) and lam.dim() == 0:
        leaves = [lam]
    else:
        try:
            leaves, d = tree_flatten(lam)
        except TypeError as e:
            raise BilevelTypeError(f"{name}: lam: {e}") from None
        if d != t_def:
            raise BilevelValueError(f"{name}: lam's structure {d!r} must be a scalar or match theta's {t_def!r}")
        for lt, tt in zip(leaves, t_leaves):
            if lt.dim() != 0 and lt.shape != tt.shape:
                raise BilevelValueError(
                    f"{name}: each leaf of lam must be a scalar (per layer) or have its parameter's shape "
                    f"(per element); got {tuple(lt.shape)} for a parameter of shape {tuple(tt.shape)}"
                )
    for leaf in leaves:
        if not leaf.dtype.is_floating_point:
            raise BilevelTypeError(f"{name}: lam must be floating point, got {leaf.dtype}")
        # One host sync per call (not per iteration) to refuse a λ that makes the problem ill-posed.
        if not bool(torch.isfinite(leaf).all()) or not bool((leaf > 0).all()):
            raise BilevelValueError(f"{name}: lam must be finite and > 0 everywhere; got min {float(leaf.min())}")
    return lam


def proximal_term(phi: Any, theta: Any, lam: Any) -> Tensor:
    """½ Σ_j λ_j ‖φ_j − θ_j‖² for λ a scalar, a per-leaf scalar or a per-element tree."""
    p_leaves, _ = tree_flatten(phi)
    t_leaves, _ = tree_flatten(theta)
    if isinstance(lam, Tensor) and lam.dim() == 0:
        return 0.5 * lam * sum(((p - t) ** 2).sum() for p, t in zip(p_leaves, t_leaves))
    l_leaves, _ = tree_flatten(lam)
    return 0.5 * sum((lj * (p - t) ** 2).sum() for p, t, lj in zip(p_leaves, t_leaves, l_leaves))  # type: ignore[return-value]


def _proximal_vjp(n_theta: int, scalar_lam: bool, batched: bool) -> ClosedVJP:
    """The argument gradients of a :class:`Proximal` layer in closed form from the adjoint u.

    With ``F(φ; θ, λ, data) = ∇L(φ; data) + Λ(φ − θ)`` (+ the damping term, which does not
    depend on the arguments), ``−(∂F/∂θ)ᵀ u = Λ u`` and ``−(∂F/∂λ)ᵀ u = −(φ* − θ) · u``
    (Rajeswaran et al. 2019, Eq. 6: the meta-gradient is ``λ (H + λI)^{-1} v``), summed
    over tasks in batched mode.  Nothing re-evaluates F -- no forward/backward of the inner
    loss, which the generic VJP pays for terms that do not depend on θ or λ.  Returns
    ``None`` (use the generic VJP) when a data argument needs a gradient, which the closed
    form does not give.

    Args:
        n_theta: number of θ leaves; the arguments are θ's leaves, λ's, then the data's.
        scalar_lam: λ is one 0-d tensor shared by all leaves (else a tree matching θ
            whose leaves are 0-d or θ-shaped).
        batched: φ* and u carry a leading task dimension (θ and λ do not).
    """
    n_lam = 1 if scalar_lam else n_theta

    def vjp(x: list[Tensor], u: list[Tensor], args: Sequence[Tensor], need: Sequence[bool]) -> list[Tensor | None] | None:
        if any(need[n_theta + n_lam:]):
            return None
        theta, lam = args[:n_theta], args[n_theta:n_theta + n_lam]
        out: list[Tensor | None] = []
        for j in range(n_theta):
            if need[j]:
                uj = u[j].sum(0) if batched else u[j]  # θ is shared: the task gradients add
                out.append((lam[0 if scalar_lam else j] * uj).to(theta[j].dtype))
            else:
                out.append(None)
        prods = [(xj - tj) * uj for xj, tj, uj in zip(x, theta, u)] if any(need[n_theta:n_theta + n_lam]) else []
        if scalar_lam:
            out.append(-torch.stack([p.sum() for p in prods]).sum().to(lam[0].dtype) if need[n_theta] else None)
        else:
            for j, lj in enumerate(lam):
                if not need[n_theta + j]:
                    out.append(None)
                elif lj.dim() == 0:
                    out.append(-prods[j].sum().to(lj.dtype))
                else:
                    out.append(-(prods[j].sum(0) if batched else prods[j]).to(lj.dtype))
        out.extend([None] * (len(args) - n_theta - n_lam))
        return out

    return vjp


class Proximal(Argmin):
    """φ*(θ) = argmin_φ inner_loss(φ, *args) + ½ Σ_j λ_j ‖φ_j − θ_j‖²  (implicit MAML).

    The inner solver starts at θ.  The backward solves ``(H + Λ) u = v`` with ``H`` the
    Hessian of ``inner_loss`` at φ* and returns ``dl/dθ = Λ u`` — for a scalar λ the
    paper's ``(I + H/λ)^{-1} v`` (Rajeswaran et al. 2019, Eq. 6) — and, as a by-product
    of the same solve, ``dl/dλ_j = −Σ (φ*_j − θ_j) u_j``.  ``H + Λ`` is SPD whenever λ
    exceeds the most negative eigenvalue of ``H``, so CG runs on it directly (not on the
    normal equations).  Memory kept for backward: φ*, θ, λ and the task data, whatever
    the number of inner steps.

    Args:
        inner_loss: ``inner_loss(phi, *args) -> scalar`` for one task (e.g. the support
            loss of a network evaluated with ``torch.func.functional_call``).
        lam: λ > 0: a float, a 0-d tensor (may require grad), or a tree matching θ whose
            leaves are 0-d (one λ per parameter tensor) or θ-shaped (one per element).
            A λ computed from a learned parameter (e.g. ``softplus(rho)``) should be passed
            per call as ``layer(theta, ..., lam=...)`` so that no graph is kept on the layer.
        solver: inner solver (default ``NewtonCG()``); it is called with the objective
            ``inner_loss + proximal term`` and θ as the initial point.
        linsolve: backward linear solver (default ``CG()``).
        damping: δ ≥ 0 added to the backward system only: it solves ``(H + Λ + δI) u = v``
            and returns ``Λ u`` (and ``−(φ* − θ) u`` for λ).  The forward is unchanged.
            δ > 0 keeps the system positive definite where ``H`` has eigenvalues below
            ``−λ`` (batch-norm nets far from a minimiser), at the price of a **biased**
            gradient: for scalar λ it is ``λ (H + (λ + δ) I)^{-1} v`` instead of
            ``(I + H/λ)^{-1} v`` — shrunk towards ``λ/(λ+δ) · v`` along directions of small
            curvature.  The official iMAML code's ``(1 + c) I + H/(λ + δ')`` system is
            this with ``lam = λ + δ'`` and ``damping = c (λ + δ')``.  Default 0 (exact).
        on_failure, hvp: see :class:`ImplicitLayer`.

    Batched (a meta-batch of B tasks in one computation)::

        phi = layer(theta, x_support, y_support, batched=True)   # x_support: (B, K, ...)

    θ and λ are shared; every argument with ``in_dims`` 0 carries the task dimension;
    every leaf of φ* gets a leading dimension B.  The solver and CG run batched with
    per-task step sizes and convergence; the gradient w.r.t. θ is the sum of the per-task
    gradients.
    """

    def __init__(
        self,
        inner_loss: Callable[..., Tensor],
        lam: Any = 1.0,
        solver: Any = None,
        linsolve: Any = None,
        *,
        damping: float = 0.0,
        on_failure: OnFailure = "warn",
        hvp: HvpMode = "reverse",
        backward_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(inner_loss, solver, linsolve, on_failure=on_failure, hvp=hvp, backward_dtype=backward_dtype)
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            if not math.isfinite(lam) or lam <= 0:
                raise BilevelValueError(f"Proximal: lam must be finite and > 0, got {lam}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
            raise BilevelValueError(f"Proximal: damping must be a finite float >= 0, got {damping!r}")
        try:
            lam_leaves = tree_flatten(lam)[0] if not isinstance(lam, (int, float)) else []
        except TypeError:
            lam_leaves = []  # refused with a clear message at the first call
        if any(t.grad_fn is not None for t in lam_leaves):
            raise BilevelValueError(
                "Proximal: lam carries an autograd graph (it was computed from a parameter, e.g. softplus(rho)); "
                "stored on the layer, that graph would be freed by the first backward and every later call would "
                "fail. Pass a learned λ per call instead: layer(theta, ..., lam=softplus(rho))"
            )
        self.lam = lam
        self.damping = float(damping)

    def _proximal_objective(self) -> Callable[..., Tensor]:
        """``(phi, theta, lam, *args) -> inner_loss(phi, *args) + proximal term``, the same
        function object on every call while ``self.objective`` is unchanged (see
        :meth:`Argmin._objectives`)."""
        inner = self.objective
        cached = self.__dict__.get("_proximal_cache")
        if cached is None or cached[0] is not inner:

            def objective(phi: Any, theta: Any, lam: Any, *a: Any) -> Tensor:
                return inner(phi, *a) + proximal_term(phi, theta, lam)

            cached = (inner, objective)
            self.__dict__["_proximal_cache"] = cached
        return cached[1]

    def __call__(  # type: ignore[override]
        self,
        theta: Any,
        *args: Any,
        lam: Any = None,
        batched: Batched = False,
        in_dims: InDims = 0,
    ) -> Any:
        name = type(self).__name__
        strategy = _strategy(batched, theta, name)
        try:
            theta_leaves, _ = tree_flatten(theta)
        except TypeError as e:
            raise BilevelTypeError(f"{name}: theta must be a tensor tree: {e}") from None
        if not theta_leaves:
            raise BilevelValueError(f"{name}: theta is an empty tree ({theta!r}): there are no meta-parameters to solve for")
        lam_t = _lam_tree(self.lam if lam is None else lam, theta, name)
        objective = self._proximal_objective()

        if strategy:
            dims = (None, None, *_arg_dims(args, in_dims))
            n = _task_count(args, dims[2:])
            x0 = tree_map(lambda t: t.detach().unsqueeze(0).expand(n, *t.shape).clone(), theta)
            strategy = self._resolve(strategy, objective, x0, (theta, lam_t, *args), dims)
        else:
            dims = ()
            # A copy: a solver that updates its initial point in place must not touch θ.
            x0 = tree_map(lambda t: t.detach().clone(), theta)
            self.diagnostics.strategy, self.diagnostics.strategy_seconds = None, None
        scalar_lam = isinstance(lam_t, Tensor) and lam_t.dim() == 0
        vjp = _proximal_vjp(len(tree_flatten(theta)[0]), scalar_lam, strategy is not None)
        return self._apply(self._problem(objective, x0, (theta, lam_t, *args), dims, strategy, self.damping, vjp))


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
        on_failure, hvp: see :class:`ImplicitLayer`.
    """

    symmetric = False

    def __init__(
        self, fn: Callable[..., Any], solver: Any = None, linsolve: Any = None, *, on_failure: OnFailure = "warn",
        backward_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(linsolve, on_failure=on_failure, backward_dtype=backward_dtype)
        if not callable(fn):
            raise BilevelTypeError("fn must be callable")
        if solver is None:
            from .solvers import FixedPointIteration

            solver = FixedPointIteration()
        self.fn = fn
        self.solver = solver

    def __call__(self, x0: Any, *args: Any, batched: bool = False, in_dims: InDims = 0) -> Any:
        fn = self.fn
        if batched:
            dims = _arg_dims(args, in_dims)
            fn = torch.func.vmap(self.fn, in_dims=(0, *dims))

        def solve(x0_: Any, *a: Any) -> Any:
            return self.solver(fn, x0_, *a, batched=True) if batched else self.solver(fn, x0_, *a)

        def optimality(x: Any, *a: Any) -> Any:
            # x − fn(x), not fn(x) − x: same root and gradient, but I − J has its spectrum
            # near +1 for a contraction, which Neumann and positive-definite-leaning solvers need.
            return tree_map(torch.sub, x, fn(x, *a))

        return self._apply(Problem(solve, optimality, x0, args, False, batched))


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

    def __call__(self, x0: Any, *args: Any, batched: bool = False) -> Any:
        return self._apply(Problem(self._solve_fn, self._optimality_fn, x0, args, self.symmetric, batched))


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
        linsolve: backward linear solver (default ``CG()`` if ``symmetric`` else ``GMRES()``).
        symmetric: declare ``dF/dx`` symmetric (e.g. F is a gradient), enabling CG/MINRES.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` on non-convergence.
        hvp: ``"forward"`` or ``"reverse"`` (symmetric case; see :class:`ImplicitLayer`).

    Example::

        @bilevel.custom_root(lambda x, a: x**2 - a, symmetric=True)
        def sqrt(x0, a):
            return newton(x0, a)   # any algorithm, even outside torch
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
