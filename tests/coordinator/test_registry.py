"""Who may serve: vouches, promotion by audits, demotion by slashes, bans."""

from __future__ import annotations

import pytest

from contracts import MoneyParams
from contracts.audits import Standing
from coordinator.registry import Registry, add_vouch

PARAMS = MoneyParams(promotion_agreements=3)


def registry(tmp_path) -> Registry:
    return Registry(tmp_path, params=PARAMS)


def join(reg: Registry, peer: str) -> str:
    return reg.register(peer, {}, [f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], 2**30).state


def test_a_newcomer_serves_once_promoted_and_goes_back_to_verifying_when_slashed(tmp_path):
    reg = registry(tmp_path)
    assert join(reg, "new") == "newcomer" and not reg.candidates()
    reg.set_standing("new", Standing(reputation=2, audits_agreed=2))
    assert not reg.refresh() and reg.get("new").state == "newcomer"  # K = 3 not reached
    reg.set_standing("new", Standing(reputation=3, audits_agreed=3))
    assert reg.refresh() and [p.peer for p in reg.candidates()] == ["new"]
    reg.set_standing("new", Standing(reputation=-17, audits_agreed=3, slash_count=1))
    assert reg.refresh() and reg.get("new").state == "newcomer" and not reg.candidates()


def test_a_vouched_provider_serves_at_once_until_a_slash_makes_its_reputation_negative(tmp_path):
    add_vouch(tmp_path, "vouched")
    reg = registry(tmp_path)
    assert join(reg, "vouched") == "idle"
    reg.set_standing("vouched", Standing(reputation=5, audits_passed=5))
    assert not reg.refresh()
    reg.set_standing("vouched", Standing(reputation=-15, audits_passed=5, slash_count=1))
    assert reg.refresh() and reg.get("vouched").state == "newcomer"


def test_a_banned_peer_is_marked_and_cannot_register_again(tmp_path):
    add_vouch(tmp_path, "cheat")
    reg = registry(tmp_path)
    join(reg, "cheat")
    reg.set_standing("cheat", Standing(reputation=-60, slash_count=3, banned=True))
    assert reg.refresh() and reg.get("cheat").state == "banned" and not reg.candidates()
    with pytest.raises(ValueError, match="banned"):
        join(reg, "cheat")
