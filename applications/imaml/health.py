"""The training-time warning about an unstable inner loop (docs/applications/imaml.md: "Inner-loop health").

The implicit gradient assumes a solved inner problem; a fixed-step inner GD whose step is
too large does not solve it.  :class:`InnerHealthWatch` reads the health statistics of each
meta-step (:func:`~.algorithms.inner_health`, ``inner_lr_curvature``) and says once, naming
the knob to turn, when the inner loop is unstable.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

__all__ = ["HEALTH_WINDOW", "InnerHealthWatch"]

#: Meta-steps over which the inner-loop health is judged.
HEALTH_WINDOW = 20


class InnerHealthWatch:
    """Warn once when the fixed-step inner GD is unstable.

    Unstable: the Lanczos estimate ``inner_lr·(H_max + λ)`` (``inner_lr_curvature``) exceeds
    2 at a step, or, over the last :data:`HEALTH_WINDOW` meta-steps, the inner objective
    rose during the loop on most tasks (median ``inner_descent`` below one half).  A stable
    GD step never raises the objective (descent lemma); single meta-batches can cross the
    line by chance, hence the window.  Momentum methods and Adam are not monotone even when
    stable, so for them the rule is the median gradient ratio (end over start) above 1.

    Args:
        meta_steps: the run's length (a shorter run is judged on all its steps).
        inner_optimizer: ``"gd"``, ``"momentum"``, ``"nesterov"`` or ``"adam"``.
        recipe: ``"proximal"`` (λ adds to the curvature GD sees) or ``"imaml-dev"``.
        log: where the warning goes.
    """

    def __init__(self, meta_steps: int, inner_optimizer: str, recipe: str, log: Callable[[str], None]) -> None:
        self.meta_steps, self.inner_optimizer, self.recipe, self.log = meta_steps, inner_optimizer, recipe, log
        self.warned = False
        self.window: list[tuple[float, float]] = []

    def update(self, step: int, stats: dict[str, float]) -> None:
        """Read the statistics of meta-step ``step``; warn if the loop is now judged unstable."""
        if self.warned:
            return
        what = self._diagnosis(stats)
        if not what:
            return
        self.warned = True
        knob = "--inner-lr" + (" or --lam (λ adds to the curvature GD sees)" if self.recipe == "proximal" else "")
        self.log(f"warning: meta-step {step}: the inner loop is unstable ({what}): lower {knob}. "
                 "The implicit gradient assumes a solved inner problem (docs/applications/imaml.md: 'Inner-loop health').")

    def _diagnosis(self, stats: dict[str, float]) -> str | None:
        curv = stats.get("inner_lr_curvature")
        ratio, descent = stats.get("inner_grad_ratio"), stats.get("inner_descent")
        if ratio is not None and descent is not None:
            self.window.append((ratio, descent))
            del self.window[:-HEALTH_WINDOW]
        if curv is not None and curv > 2.0:
            return f"inner_lr·(H_max + λ) ≈ {curv:.2f} > 2"
        if len(self.window) < min(HEALTH_WINDOW, max(1, self.meta_steps)):
            return None
        r = statistics.median(h[0] for h in self.window)
        d = statistics.median(h[1] for h in self.window)
        if self.inner_optimizer != "gd":
            # Momentum and Adam need not lower the objective at every step even when
            # stable (no descent lemma): judge them by where the gradient ends.
            if r > 1.0:
                return (f"over the last {len(self.window)} meta-steps the inner gradient ended at a median {r:.2f}× "
                        f"its start ({self.inner_optimizer} did not reduce it)")
        elif d < 0.5:
            return (f"over the last {len(self.window)} meta-steps the inner objective rose during the loop on a median "
                    f"{100 * (1 - d):.0f}% of the tasks, and its gradient ended at a median {r:.2f}× its start")
        return None
