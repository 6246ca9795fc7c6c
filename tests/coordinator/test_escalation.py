"""Escalation before slashing on the margin (coordinator/audits.py, verification/check.py)."""

from __future__ import annotations

from coordinator.audits import Escalation
from verification.check import FAIL, MARGINAL_EXCESS, PASS, Outcome


def marginal() -> Outcome:
    return Outcome(FAIL, "layer 3: median over its threshold", {"excess": MARGINAL_EXCESS * 0.8})


def clear() -> Outcome:
    return Outcome(FAIL, "retained output does not match the receipt's output hash")


def test_a_clear_failure_is_recorded_at_once():
    escalation = Escalation(audits=3)
    assert not clear().marginal and escalation.decides("p", clear()) and not escalation.suspects()
    assert not Outcome(FAIL, "far over", {"excess": MARGINAL_EXCESS * 5}).marginal


def test_a_marginal_failure_escalates_and_a_second_failure_is_recorded():
    escalation = Escalation(audits=3)
    assert marginal().marginal and not escalation.decides("p", marginal())  # withheld: nobody slashed yet
    assert escalation.suspects() == {"p"}
    assert escalation.decides("p", Outcome(PASS, "ok"))  # escalated audits are recorded as they come
    assert escalation.decides("p", marginal())  # a failure while suspect: recorded (and slashed)
    assert escalation.suspects() == set()


def test_a_marginal_failure_followed_by_passes_is_cleared():
    escalation = Escalation(audits=3)
    escalation.decides("p", marginal())
    for _ in range(3):
        assert escalation.decides("p", Outcome(PASS, "ok"))
    assert escalation.suspects() == set()
    assert not escalation.decides("p", marginal())  # a new marginal failure escalates again
    assert escalation.decides("q", Outcome(PASS, "ok")) and escalation.suspects() == {"p"}
