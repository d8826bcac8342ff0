"""bilevel.time_alternatives: the timing rule of batched="auto", public for programs' own choices."""

from __future__ import annotations

import pytest

import bilevel
import bilevel._timing as timing_mod


def _counting_clock(monkeypatch: pytest.MonkeyPatch, times: dict[str, list[float]]) -> list[str]:
    """A clock that returns the given times per call, in order; returns the names timed."""
    seen: list[str] = []

    def clock(fn, device):  # type: ignore[no-untyped-def]
        name = fn()
        seen.append(name)
        return times[name][seen.count(name) - 1]

    monkeypatch.setattr(timing_mod, "probe_clock", clock)
    return seen


def test_a_clear_winner_is_timed_once_after_one_warm_up_each(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _counting_clock(monkeypatch, {"a": [1.0], "b": [3.0]})
    calls: list[str] = []

    def run(name: str):  # type: ignore[no-untyped-def]
        def f() -> str:
            calls.append(name)
            return name
        return f

    s = bilevel.time_alternatives({"a": run("a"), "b": run("b")})
    assert s == {"a": 1.0, "b": 3.0}
    assert seen == ["a", "b"]
    assert calls == ["a", "b", "a", "b"]  # the untimed warm-up of each, then one timed round


def test_close_times_get_a_second_interleaved_round_and_the_faster_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _counting_clock(monkeypatch, {"a": [1.0, 0.7], "b": [1.2, 1.5]})
    s = bilevel.time_alternatives({"a": lambda: "a", "b": lambda: "b"})
    assert seen == ["a", "b", "a", "b"]
    assert s == {"a": 0.7, "b": 1.2}
    seen.clear()
    # The same times with a tighter threshold: 1.2 / 1.0 is not close, one round.
    _counting_clock(monkeypatch, {"a": [1.0], "b": [1.2]})
    assert bilevel.time_alternatives({"a": lambda: "a", "b": lambda: "b"}, close=1.1) == {"a": 1.0, "b": 1.2}


def test_warmups_replace_the_untimed_first_call() -> None:
    calls: list[str] = []
    bilevel.time_alternatives({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              warmups={"a": lambda: calls.append("warm a")})
    assert calls[:2] == ["warm a", "b"]  # b has no warm-up of its own: itself
    assert calls[2:4] == ["a", "b"]


def test_real_clock_returns_seconds_per_name() -> None:
    s = bilevel.time_alternatives({"sum": lambda: sum(range(1000)), "noop": lambda: None})
    assert set(s) == {"sum", "noop"} and all(t >= 0.0 for t in s.values())


@pytest.mark.parametrize("runs, close, match", [({}, 1.3, "no alternatives"), ({"a": lambda: None}, 1.0, "close must be > 1")])
def test_bad_input_is_refused(runs, close, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(bilevel.BilevelValueError, match=match):
        bilevel.time_alternatives(runs, close=close)
