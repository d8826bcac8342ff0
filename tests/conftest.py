"""Shared test configuration: hypothesis profiles and small reference solvers."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite within its time budget on 2 cores; "thorough" explores more.
settings.register_profile("ci", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("BILEVEL_HYPOTHESIS_PROFILE", "ci"))
