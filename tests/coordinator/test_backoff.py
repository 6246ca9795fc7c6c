"""Stages that keep failing leave the plan with exponential, capped backoff (coordinator/backoff.py)."""

from __future__ import annotations

import pytest

from coordinator.backoff import Backoff


def test_strikes_bench_then_probation_doubles_up_to_the_cap():
    backoff = Backoff(strikes_to_bench=3, base_s=5.0, max_s=30.0)
    assert backoff.fail("p", "refused", 0.0) is None and backoff.fail("p", "refused", 1.0) is None
    assert backoff.benched(1.0) == set()
    assert backoff.fail("p", "refused again", 2.0) == 5.0
    assert backoff.benched(6.9) == {"p"} and backoff.benched(7.0) == set()
    [shown] = backoff.public(3.0)
    assert shown == {"peer": "p", "benched": True, "back_in_s": 4.0, "benches": 1, "failures": 0,
                     "reason": "refused again"}
    # back from the bench on probation: one failure benches it again, each time twice as long, up to the cap
    lengths = [backoff.fail("p", "refused", t) for t in (10.0, 100.0, 200.0, 300.0)]
    assert lengths == [10.0, 20.0, 30.0, 30.0]


def test_serving_a_step_forgives_and_other_peers_are_apart():
    backoff = Backoff(strikes_to_bench=2, base_s=1.0, max_s=8.0)
    backoff.fail("a", "x", 0.0)
    backoff.fail("b", "y", 0.0)
    backoff.served("a")
    assert backoff.fail("a", "x", 0.0) is None  # its count started again
    assert backoff.fail("b", "y", 0.0) == 1.0
    assert backoff.benched(0.5) == {"b"}
    backoff.served("b")
    assert backoff.benched(0.5) == set() and [p["peer"] for p in backoff.public(0.5)] == ["a"]


def test_bad_settings_are_refused():
    for kwargs in ({"strikes_to_bench": 0}, {"base_s": 0.0}, {"base_s": 10.0, "max_s": 5.0}):
        with pytest.raises(ValueError):
            Backoff(**kwargs)
