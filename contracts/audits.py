"""Audits: probability, selection, and what an audit's outcome does to a provider's standing.

A provider's standing is derived from the ledger (audit, slash and misconduct entries) by these functions,
so replaying the log gives the same reputation and the same `may_serve` answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from contracts.params import PPM_DENOMINATOR, ContractError, MoneyParams, check_units
from contracts.stakes import check_probability_ppm, required_stake_units


def deters_cheating(p_ppm: int, slash_units: int, gain_units: int) -> bool:
    """The rule p * slash > (1 - p) * gain, in integers."""
    check_probability_ppm(p_ppm)
    check_units("slash_units", slash_units)
    check_units("gain_units", gain_units)
    return p_ppm * slash_units > (PPM_DENOMINATOR - p_ppm) * gain_units


def min_audit_probability_ppm(slash_units: int, gain_units: int) -> int:
    """Smallest p (ppm) with p * slash > (1 - p) * gain; refuses when no p < 1 deters."""
    check_units("slash_units", slash_units)
    check_units("gain_units", gain_units)
    if gain_units == 0:
        return 1
    p_ppm = PPM_DENOMINATOR * gain_units // (slash_units + gain_units) + 1
    if p_ppm >= PPM_DENOMINATOR:
        raise ContractError(f"a slash of {slash_units} cannot deter a gain of {gain_units} at any p < 1")
    return p_ppm


def should_audit(secret_seed: bytes, request_id: str, stage_index: int, p_ppm: int) -> bool:
    """Deterministic coin with probability p: unpredictable to a provider that lacks the seed."""
    check_probability_ppm(p_ppm)
    if len(secret_seed) < 16:
        raise ContractError("the audit seed must have at least 16 bytes")
    digest = hashlib.sha256(b"meshpool-audit/1\x00" + secret_seed + b"\x00" + request_id.encode() + b"\x00"
                            + str(stage_index).encode()).digest()
    return int.from_bytes(digest[:8], "big") % PPM_DENOMINATOR < p_ppm


@dataclass(frozen=True)
class Standing:
    """A provider's record, all derived from ledger entries.

    `stake_units` is what the provider has locked (escrow:stakes): the ledger keeps it on the
    account, beside this record, and `LedgerReader.standing` puts it here for `may_serve`."""

    reputation: int = 0
    audits_agreed: int = 0  # as verifier: agreed with the referee
    audits_disagreed: int = 0  # as verifier: disagreed with the referee
    audits_passed: int = 0  # as audited stage: found correct
    slash_count: int = 0
    banned: bool = False
    stake_units: int = 0
    misconduct_count: int = 0  # signed profiles that the coordinator's timing contradicted


def after_verifying(standing: Standing, agreed_with_referee: bool, params: MoneyParams) -> Standing:
    if agreed_with_referee:
        return replace(standing, reputation=standing.reputation + params.reputation_per_agreement,
                       audits_agreed=standing.audits_agreed + 1)
    return replace(standing, reputation=standing.reputation - params.reputation_penalty_per_disagreement,
                   audits_disagreed=standing.audits_disagreed + 1)


def after_audited(standing: Standing, passed: bool, params: MoneyParams) -> Standing:
    """The audited stage's record; a failed audit costs reputation through `after_slash`."""
    if passed:
        return replace(standing, reputation=standing.reputation + params.reputation_per_agreement,
                       audits_passed=standing.audits_passed + 1)
    return standing


def after_slash(standing: Standing, params: MoneyParams) -> Standing:
    count = standing.slash_count + 1
    return replace(standing, reputation=standing.reputation - params.reputation_penalty_per_slash,
                   slash_count=count, banned=standing.banned or count >= params.ban_after_slashes)


def after_misconduct(standing: Standing, params: MoneyParams) -> Standing:
    """A claim that measurement contradicted (contracts.params, `misconduct_claim_ratio`)."""
    return replace(standing, reputation=standing.reputation - params.reputation_penalty_per_misconduct,
                   misconduct_count=standing.misconduct_count + 1)


def audit_reputation(standing: Standing, params: MoneyParams) -> int:
    """The reputation audits and slashes gave: misconduct penalties added back (they do not bench)."""
    return standing.reputation + standing.misconduct_count * params.reputation_penalty_per_misconduct


def may_serve(standing: Standing, params: MoneyParams, vouched: bool = False) -> bool:
    """Who serves: not banned, the stake locked, and either vouched or promoted by audits.

    Serving needs `required_stake_units(params)` locked, so that the slash for any stage it runs is
    taken from locked credits (contracts.stakes). Promotion: agreed with the referee on K audits,
    reputation above zero. A provider the operator vouched for skips the K audits, not the slashes:
    it serves while its reputation (0 at first, + per passed audit, - per slash) is not negative.
    A slash that leaves the stake short stops it serving until the stake is topped up.
    Misconduct (a profile its measurement contradicted) lowers the reputation shown, not the one these
    tests judge, until it happens `bench_after_misconducts` times (contracts.params says why)."""
    if standing.banned or standing.stake_units < required_stake_units(params):
        return False
    return may_serve_but_for_stake(standing, params, vouched)


def may_serve_but_for_stake(standing: Standing, params: MoneyParams, vouched: bool = False) -> bool:
    """The audit half of `may_serve`: whether locking the required stake is all that is missing."""
    if standing.banned or standing.misconduct_count >= params.bench_after_misconducts:
        return False
    earned = audit_reputation(standing, params)
    if vouched:
        return earned >= 0
    return standing.audits_agreed >= params.promotion_agreements and earned > 0
