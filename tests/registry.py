"""The solver configurations the tests run, with capability tags, and the problem families.

One place to add a solver: register its configurations here and every test that selects
by tag runs it; ``tests/test_registry.py`` fails for a class of ``bilevel.solvers.__all__``
or ``bilevel.linsolve.__all__`` without an entry.

An entry is one frozen solver instance with an id derived from its non-default arguments
(``CG-steps3``, ``GMRES-restart8``, ``GradientDescent-lr0.05-steps5``) and a set of tags:

* what the class can do, declared once per class in ``CAPABILITIES``;
* what the configuration is, derived from the instance (``default``, ``fixed_budget``,
  ``tolerance``, ``lean``, ``transforms``);
* ``compile``: a choice of the test suite (the configurations run compiled).

``TAGS`` lists and explains every tag.  The problem families are those of
``tests/problems.py``: ``families(solver)`` names the linear-system families a linear
solver's class solves (``SYSTEM_FAMILIES``); the inner objectives are the logistic
regression and quadratics there, and the random bilevel problems of ``bilevel.testing``.

Queries (all in registration order; an unknown id or tag is an error at collection)::

    solvers("linear", tags={"batched"})        # [pytest.param(CG(), id="CG"), ...]
    solvers(ids=["CG-steps3", "GMRES-restart3"])
    cases(["CG", "spd"], ["GMRES-restart8", "nonsymmetric"])   # (solver, system) params
    get("Neumann-alpha0.3")                    # the instance
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import pytest

from bilevel.linsolve import CG, GMRES, MINRES, BiCGSTAB, Dense, Neumann
from bilevel.linsolve import Broyden as LinearBroyden
from bilevel.solvers import (
    LBFGS,
    Adam,
    Anderson,
    FixedPointIteration,
    GradientDescent,
    NewtonCG,
    ScipyMinimize,
)
from bilevel.solvers import Broyden as InnerBroyden
from tests.problems import SYSTEM_FAMILIES

LINEAR, INNER = "linear", "inner"

TAGS: dict[str, str] = {
    # -- class capabilities (CAPABILITIES) --
    "driver": "iterates on bilevel._iterate.iterate, one call per solve",
    "batched": "solves B independent tasks at once (batched=True)",
    "direct": "linear: no iterations and no tolerance (a dense factorisation)",
    "symmetric": "linear: requires a symmetric operator",
    "positive_definite": "linear: requires a positive definite operator",
    "indefinite": "linear: solves symmetric indefinite systems",
    "nonsymmetric": "linear: solves non-symmetric (non-singular) systems",
    "contraction": "linear: requires I - alpha*A to be a contraction (a Neumann series)",
    "near_identity": "linear: meant for operators near initial_jacobian * I (Broyden from H0 = I / initial_jacobian, "
    "as the fixed-point backward's I - J): run on the Neumann families",
    "device_loop": "linear: no host-side control besides the driver's stopping test: a fixed budget makes "
    "no host sync inside the loop, and a tolerance solve runs under torch.func.vmap",
    "fixed_point": "inner: finds x = fn(x) (takes a map, not an objective)",
    # -- the configuration (derived from the instance) --
    "default": "the class with its default arguments",
    "fixed_budget": "steps=m: exactly m iterations, reported COMPLETED",
    "tolerance": "runs to rtol/atol (or the method's own test); maxiter is a cap",
    "lean": "GradientDescent/Adam's lean fixed-step loop (steps=, monitor=False)",
    "transforms": "linear: callable under torch.func.vmap/jacrev (a fixed budget, or a device_loop)",
    "traceable": "torch.compile traces it into a graph (a layer's traced path): GradientDescent/Adam with steps= and "
    "no check_minimum; a device_loop linear solver with steps= and no preconditioner",
    # -- choices of the test suite --
    "compile": "run compiled (compile=True) by tests/solvers/test_solvers_compile.py",
}

CAPABILITIES: dict[type, frozenset[str]] = {
    CG: frozenset({"driver", "batched", "device_loop", "symmetric", "positive_definite"}),
    MINRES: frozenset({"driver", "batched", "device_loop", "symmetric", "indefinite"}),
    GMRES: frozenset({"driver", "batched", "indefinite", "nonsymmetric"}),
    BiCGSTAB: frozenset({"driver", "batched", "indefinite", "nonsymmetric"}),
    Neumann: frozenset({"driver", "batched", "device_loop", "contraction"}),
    Dense: frozenset({"direct", "batched", "indefinite", "nonsymmetric"}),
    GradientDescent: frozenset({"driver", "batched"}),
    Adam: frozenset({"driver", "batched"}),
    NewtonCG: frozenset({"driver", "batched"}),
    LBFGS: frozenset({"driver"}),
    ScipyMinimize: frozenset(),
    FixedPointIteration: frozenset({"driver", "batched", "fixed_point"}),
    LinearBroyden: frozenset({"driver", "batched", "device_loop", "nonsymmetric", "near_identity"}),
    InnerBroyden: frozenset({"driver", "batched", "fixed_point"}),
    Anderson: frozenset({"driver", "batched", "fixed_point"}),
}

def _label(solver: Any) -> str:
    """``ClassName-arg1value1-...`` over the constructor arguments that differ from their
    defaults (``True`` flags by name only)."""
    parts = [type(solver).__name__]
    for f in dataclasses.fields(solver):
        if not f.init:
            continue
        value = getattr(solver, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        if value is True:
            parts.append(f.name)
        else:
            parts.append(f"{f.name}{value:g}" if isinstance(value, float) else f"{f.name}{value}")
    return "-".join(parts)


def capabilities(solver: Any) -> frozenset[str]:
    """The class capabilities of ``solver`` (``CAPABILITIES``)."""
    return CAPABILITIES[type(solver)]


def families(solver: Any) -> tuple[str, ...]:
    """The linear-system families of ``tests/problems.py`` that ``solver``'s class solves."""
    caps = capabilities(solver)
    if caps & {"contraction", "near_identity"}:
        return ("neumann-symmetric", "neumann-nonsymmetric")
    out = ["spd"]  # every other linear solver solves symmetric positive definite systems
    out += [f for f in ("indefinite", "nonsymmetric") if f in caps]
    return tuple(out)


def _derived(solver: Any, kind: str) -> set[str]:
    cls = type(solver)
    tags = set()
    try:
        if solver == cls():
            tags.add("default")
    except (TypeError, ValueError):  # a class without a default configuration
        pass
    fixed = getattr(solver, "steps", None) is not None
    if fixed:
        tags.add("fixed_budget")
    elif "direct" not in CAPABILITIES[cls]:
        tags.add("tolerance")
    if cls in (GradientDescent, Adam) and fixed and not solver.monitor:
        tags.add("lean")
    if kind == LINEAR and (fixed or "device_loop" in CAPABILITIES[cls]):
        tags.add("transforms")
    if fixed and (cls in (GradientDescent, Adam) and not solver.check_minimum
                  or kind == LINEAR and "device_loop" in CAPABILITIES[cls] and getattr(solver, "preconditioner", None) is None):
        tags.add("traceable")
    return tags


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered configuration."""

    id: str
    kind: str
    solver: Any
    tags: frozenset[str]

    def param(self) -> Any:
        return pytest.param(self.solver, id=self.id)


_ENTRIES: dict[str, Entry] = {}


def _add(kind: str, *solvers: Any, tags: Collection[str] = ()) -> None:
    for solver in solvers:
        entry_id = _label(solver)
        all_tags = frozenset(tags) | CAPABILITIES[type(solver)] | _derived(solver, kind)
        unknown = all_tags - TAGS.keys()
        assert not unknown, f"{entry_id}: unknown tags {sorted(unknown)}"
        assert entry_id not in _ENTRIES, f"{entry_id} registered twice"
        _ENTRIES[entry_id] = Entry(entry_id, kind, solver, all_tags)


def _lean_loops(steps: int, lr: float, momentum_lr: float, momentum: float, adam_lr: float) -> tuple[Any, ...]:
    """The variants of the lean fixed-step loop: plain, heavy-ball and Nesterov momentum, Adam."""
    return (
        GradientDescent(lr=lr, steps=steps),
        GradientDescent(lr=momentum_lr, steps=steps, momentum=momentum),
        GradientDescent(lr=momentum_lr, steps=steps, momentum=momentum, nesterov=True),
        Adam(lr=adam_lr, steps=steps),
    )


# -- linear solvers ---------------------------------------------------------------------
_add(LINEAR, CG(), MINRES(), GMRES(), BiCGSTAB(), Neumann(), Dense())
# Fixed budgets (a few Krylov steps, as iMAML uses them); Neumann's step for eigenvalues
# up to 30.
_add(LINEAR, CG(steps=3), CG(steps=4), MINRES(steps=4), GMRES(steps=4), BiCGSTAB(steps=4))
_add(LINEAR, Neumann(alpha=1 / 30, steps=4))
# Restart lengths below n (= 16 in the linear-system families, 6 in the driver test).
_add(LINEAR, GMRES(restart=2), GMRES(restart=3), GMRES(restart=5), GMRES(restart=8))
# Neumann steps for operators whose eigenvalues exceed 1 (alpha * lambda_max < 2).
_add(LINEAR, Neumann(alpha=0.3), Neumann(alpha=0.05, maxiter=400))
# Broyden's method on A x - b (the inner solver's algorithm), and a fixed budget.
_add(LINEAR, LinearBroyden(), LinearBroyden(steps=4))

# -- inner solvers ----------------------------------------------------------------------
_add(INNER, NewtonCG(), LBFGS(), ScipyMinimize(), FixedPointIteration(), Anderson())
# Broyden (the ids of the defaults belong to the linear Broyden): both updates, a short memory.
_add(INNER, InnerBroyden(variant="bad"), InnerBroyden(memory=5))
# First-order: a fixed budget, a tolerance, the monitored fixed-step loop.
_add(
    INNER,
    GradientDescent(lr=0.05, steps=5),
    GradientDescent(lr=0.05, maxiter=500, rtol=1e-6),
    Adam(lr=0.05, steps=5),
    Adam(lr=0.05, steps=5, monitor=True),
)
# The lean loop, with step sizes for curvature up to about 1 ...
_add(INNER, *_lean_loops(steps=9, lr=0.5, momentum_lr=0.5, momentum=0.7, adam_lr=0.1))
# ... and as the compile tests run it (compiling is slow: four configurations).
_add(INNER, *_lean_loops(steps=12, lr=0.1, momentum_lr=0.05, momentum=0.9, adam_lr=0.05), tags={"compile"})


# -- queries ------------------------------------------------------------------------------
def entries(
    kind: str | None = None,
    tags: Iterable[str] = (),
    exclude: Iterable[str] = (),
    ids: Sequence[str] | None = None,
) -> list[Entry]:
    """The entries of ``kind`` that carry every tag of ``tags`` and none of ``exclude``
    (registration order), or those named by ``ids`` (in that order)."""
    want, avoid = frozenset(tags), frozenset(exclude)
    unknown = (want | avoid) - TAGS.keys()
    if unknown:
        raise KeyError(f"unknown tags {sorted(unknown)}; see tests.registry.TAGS")
    if kind not in (None, LINEAR, INNER):
        raise KeyError(f"kind must be {LINEAR!r} or {INNER!r}, got {kind!r}")
    pool = [_ENTRIES[i] for i in ids] if ids is not None else list(_ENTRIES.values())
    return [e for e in pool if (kind is None or e.kind == kind) and want <= e.tags and not (avoid & e.tags)]


def solvers(*select: Any, **by: Any) -> list[Any]:
    """``pytest.param(solver, id=entry id)`` for each entry that ``entries(*select, **by)`` selects."""
    return [e.param() for e in entries(*select, **by)]


def classes(kind: str | None = None, tags: Iterable[str] = ()) -> list[Any]:
    """``pytest.param(cls, id=name)`` for each class with an entry that :func:`entries` selects."""
    seen: dict[type, None] = {}
    for e in entries(kind, tags):
        seen.setdefault(type(e.solver))
    return [pytest.param(c, id=c.__name__) for c in seen]


def get(entry_id: str) -> Any:
    """The solver instance registered as ``entry_id``."""
    return _ENTRIES[entry_id].solver


def cases(*pairs: Sequence[str]) -> list[Any]:
    """``pytest.param(solver, system, id="<id>-<system>")`` for each ``(entry id, family)``;
    the family must be one that the solver's class solves (:func:`families`)."""
    out = []
    for entry_id, system in pairs:
        solver = get(entry_id)
        if system not in families(solver):
            raise ValueError(f"{entry_id} does not solve {system!r} systems (it solves {families(solver)})")
        out.append(pytest.param(solver, system, id=f"{entry_id}-{system}"))
    return out


def all_cases(kind: str = LINEAR, tags: Iterable[str] = ()) -> list[Any]:
    """:func:`cases` for every selected entry and every family its class solves."""
    return cases(*[(e.id, f) for e in entries(kind, tags) for f in families(e.solver)])


__all__ = [
    "CAPABILITIES",
    "INNER",
    "LINEAR",
    "SYSTEM_FAMILIES",
    "TAGS",
    "Entry",
    "all_cases",
    "capabilities",
    "cases",
    "classes",
    "entries",
    "families",
    "get",
    "solvers",
]
