"""Who may serve: vouches, promotion by audits, demotion by slashes, bans; and the stake each needs."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from contracts import MoneyParams
from contracts.audits import Standing
from contracts.stakes import required_stake_units
from coordinator.registry import Registry, add_vouch

PARAMS = MoneyParams(promotion_agreements=3)
STAKE = required_stake_units(PARAMS)


def registry(tmp_path) -> Registry:
    return Registry(tmp_path, params=PARAMS)


def join(reg: Registry, peer: str) -> str:
    return reg.register(peer, {}, [f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], 2**30).state


def test_a_newcomer_serves_once_promoted_and_goes_back_to_verifying_when_slashed(tmp_path):
    reg = registry(tmp_path)
    assert join(reg, "new") == "newcomer" and not reg.candidates()
    reg.set_standing("new", Standing(reputation=2, audits_agreed=2, stake_units=STAKE))
    assert not reg.refresh() and reg.get("new").state == "newcomer"  # K = 3 not reached
    reg.set_standing("new", Standing(reputation=3, audits_agreed=3, stake_units=STAKE))
    assert reg.refresh() and [p.peer for p in reg.candidates()] == ["new"]
    reg.set_standing("new", Standing(reputation=-17, audits_agreed=3, slash_count=1, stake_units=STAKE))
    assert reg.refresh() and reg.get("new").state == "newcomer" and not reg.candidates()


def test_a_vouched_provider_serves_at_once_until_a_slash_makes_its_reputation_negative(tmp_path):
    add_vouch(tmp_path, "vouched")
    reg = registry(tmp_path)
    reg.set_standing("vouched", Standing(stake_units=STAKE))
    assert join(reg, "vouched") == "idle"
    reg.set_standing("vouched", Standing(reputation=5, audits_passed=5, stake_units=STAKE))
    assert not reg.refresh()
    reg.set_standing("vouched", Standing(reputation=-15, audits_passed=5, slash_count=1, stake_units=STAKE))
    assert reg.refresh() and reg.get("vouched").state == "newcomer"


def test_a_banned_peer_is_marked_and_cannot_register_again(tmp_path):
    add_vouch(tmp_path, "cheat")
    reg = registry(tmp_path)
    join(reg, "cheat")
    reg.set_standing("cheat", Standing(reputation=-60, slash_count=3, banned=True))
    assert reg.refresh() and reg.get("cheat").state == "banned" and not reg.candidates()
    with pytest.raises(ValueError, match="banned"):
        join(reg, "cheat")


def test_an_unstaked_provider_is_no_candidate_whether_vouched_or_promoted(tmp_path):
    add_vouch(tmp_path, "vouched")
    reg = registry(tmp_path)
    assert join(reg, "vouched") == "newcomer" and join(reg, "promoted") == "newcomer"
    reg.set_standing("promoted", Standing(reputation=3, audits_agreed=3, stake_units=STAKE - 1))
    assert not reg.refresh() and not reg.candidates()
    reg.set_standing("vouched", Standing(stake_units=STAKE))
    reg.set_standing("promoted", Standing(reputation=3, audits_agreed=3, stake_units=STAKE))
    assert reg.refresh() and sorted(p.peer for p in reg.candidates()) == ["promoted", "vouched"]
    # a slash that leaves the stake short sends it back to verifying, its reputation still positive
    reg.set_standing("promoted", Standing(reputation=10, audits_agreed=10, slash_count=1, stake_units=STAKE - 600))
    assert reg.refresh() and [p.peer for p in reg.candidates()] == ["vouched"]


# -- with the ledger: the coordinator's stake keeper locks what the registry asks for ----------------

def public_key(seed: int) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture
def ledger_pool(tmp_path):
    from coordinator.accounts import Accounts
    from coordinator.stakes import StakeKeeper

    accounts = Accounts(tmp_path, 0, params=PARAMS)
    accounts.payer = accounts.lookup(accounts.add_consumer("payer", 10**12)).account_id
    keeper = StakeKeeper(accounts.ledger, accounts.reader)
    reg = Registry(tmp_path, params=PARAMS, stakes=keeper)
    yield accounts, reg
    accounts.close()


def stake_ops(accounts, peer: str) -> list[dict]:
    return [e for e in accounts.reader.entries(limit=1000) if e["kind"] == "stake" and e["debit"] == peer]


def test_vouch_locks_an_operator_funded_stake_once_and_the_provider_serves(ledger_pool, tmp_path):
    accounts, reg = ledger_pool
    add_vouch(tmp_path, "vouched")
    assert join(reg, "vouched") == "newcomer"  # vouched before its ledger account exists: nothing to lock yet
    assert not reg.refresh() and not reg.candidates()
    accounts.open_provider("vouched", public_key(1))  # what registration does
    minted = accounts.reader.supply()["minted_units"]
    assert reg.refresh() and [p.peer for p in reg.candidates()] == ["vouched"]
    view = accounts.reader.account("vouched", 0)
    assert (view["stake_units"], view["balance_units"]) == (STAKE, 0)  # the mint went straight into stake
    assert accounts.reader.supply()["minted_units"] == minted + STAKE
    # vouched twice, refreshed again, the coordinator restarted (a new keeper): locked once
    assert not add_vouch(tmp_path, "vouched")
    from coordinator.stakes import StakeKeeper
    again = StakeKeeper(accounts.ledger, accounts.reader)
    assert again.ensure("vouched", vouched=True).stake_units == STAKE
    assert not reg.refresh()
    assert len(stake_ops(accounts, "vouched")) == 1 and accounts.reader.supply()["minted_units"] == minted + STAKE
    # an unvouched newcomer gets no stake from anyone
    accounts.open_provider("stranger", public_key(2))
    join(reg, "stranger")
    reg.refresh()
    assert accounts.reader.account("stranger", 0)["stake_units"] == 0 and reg.get("stranger").state == "newcomer"


def test_a_promoted_newcomer_locks_its_stake_from_earnings_and_again_after_a_slash(ledger_pool):
    accounts, reg = ledger_pool
    ledger = accounts.ledger
    for seed, peer in ((1, "subject"), (2, "newbie")):
        accounts.open_provider(peer, public_key(seed))
        join(reg, peer)
    ledger.transfer("fund-audit-pool", accounts.payer, "fees:verification", 10 * STAKE)

    def audit(i: int, fee: int) -> None:
        ledger.record_audit(f"audit:{i}", audit_id=f"a{i}", verifier_id="newbie", subject_id="subject",
                            verifier_agreed=True, subject_passed=True, fee_units=fee)
        reg.set_standing("newbie", accounts.reader.standing("newbie"))  # what the auditor does

    for i in range(30):  # promoted after 3, but its fees do not cover the stake yet
        audit(i, STAKE // 40)
        reg.refresh()
        assert reg.get("newbie").state == "newcomer" and accounts.reader.account("newbie", 0)["stake_units"] == 0
    audit(30, STAKE)  # now they do: locked from its balance, and it serves
    assert reg.refresh() and [p.peer for p in reg.candidates()] == ["newbie"]
    view = accounts.reader.account("newbie", 0)
    assert view["stake_units"] == STAKE and view["balance_units"] == 30 * (STAKE // 40) and view["may_serve"]
    # slashed (from stake first): short of stake, it goes back to verifying ...
    ledger.slash("slash:1", "newbie", 600, "the referee contradicts the verifier", {})
    reg.set_standing("newbie", accounts.reader.standing("newbie"))
    view = accounts.reader.account("newbie", 0)
    assert view["stake_units"] == STAKE - 600 and view["reputation"] > 0 and not reg.may_serve("newbie")
    # ... until the next round, which re-locks the shortfall from its balance: it serves again
    reg.refresh()
    assert reg.may_serve("newbie") and [p.peer for p in reg.candidates()] == ["newbie"]
    assert accounts.reader.account("newbie", 0)["stake_units"] == STAKE
    assert len(stake_ops(accounts, "newbie")) == 2
    supply = accounts.reader.supply()
    assert supply["sum_of_balances_units"] == supply["supply_units"]


def test_one_peer_id_registers_from_one_process_and_the_same_process_keeps_its_work(tmp_path):
    add_vouch(tmp_path, "p")
    reg = registry(tmp_path)
    reg.set_standing("p", Standing(stake_units=STAKE))
    here, elsewhere = ["/ip4/127.0.0.1/tcp/1/p2p/p"], ["/ip4/127.0.0.1/tcp/2/p2p/p"]
    assert reg.register("p", {}, here, 2**30).state == "idle"
    reg.set_state("p", "serving")
    with pytest.raises(ValueError, match="live in another process"):
        reg.register("p", {}, elsewhere, 2**30)  # a second process with the same key
    assert reg.get("p").addrs == here and reg.get("p").state == "serving"  # nothing changed
    assert reg.register("p", {}, here, 2**30).state == "serving"  # the same process, back after a blip
    reg.set_state("p", "dead", "connection closed")
    assert reg.register("p", {}, elsewhere, 2**30).state == "idle"  # restarted: the old one is gone


def test_with_no_provider_registered_the_pool_says_it_waits_for_them_to_rejoin(tmp_path, default_model_dir):
    import json

    from coordinator.driver import GenerationRequest
    from coordinator.planner import ModelShape, Workload
    from coordinator.pool import REJOIN_RETRY_AFTER_S, Pool, PoolBusy

    shape = ModelShape.from_hf_config(json.loads((default_model_dir / "config.json").read_text()), name="m")
    reg = registry(tmp_path)
    pool = Pool(reg, shape, "m", ("coordinator", ()), lambda *a: None, lambda *a: None, lambda *a: None,
                lambda peer: True, Workload(batch=8, context_tokens=512, microbatches_in_flight=1))
    pool._replan()  # the planner's round, without its thread
    with pytest.raises(PoolBusy, match=r"no pipeline: waiting for providers to \(re\)join") as busy:
        pool.submit(GenerationRequest([1, 2], 4))
    assert busy.value.retry_after_s == REJOIN_RETRY_AFTER_S
    join(reg, "newcomer")
    pool._replan()
    with pytest.raises(PoolBusy, match="newcomers only verify until vouched for"):
        pool.submit(GenerationRequest([1, 2], 4))


def test_pool_tells_a_hole_punched_provider_from_a_relayed_one_by_the_links_heartbeats_report(tmp_path):
    from wire.messages import Heartbeat, MessageError, decode

    reg = registry(tmp_path)
    join(reg, "pub")
    for peer in ("home1", "home2"):
        reg.register(peer, {}, [f"/ip4/10.77.0.1/tcp/4001/p2p/coord/p2p-circuit/p2p/{peer}"], 2**30)
    # what each provider's heartbeat says, through the wire as the coordinator decodes it
    beat = Heartbeat("pub", ("coord", "home1"), ("direct", "hole-punched"))
    beat = decode(beat.to_frame(), Heartbeat)
    assert reg.heartbeat("pub", dict(zip(beat.link_peers, beat.link_kinds)))
    assert reg.heartbeat("home2", {"coord": "direct", "home1": "relayed"})
    shown = {p["peer"]: p for p in reg.snapshot()}
    assert {peer: p["reachability"] for peer, p in shown.items()} == {
        "pub": "public", "home1": "hole-punched", "home2": "relayed"}
    assert shown["pub"]["links"] == [{"peer": "coord", "kind": "direct"}, {"peer": "home1", "kind": "hole-punched"}]
    # the punched link gone (its next beat says relayed): relayed again; planner pricing never changed
    reg.heartbeat("pub", {"coord": "direct", "home1": "relayed"})
    assert {p["peer"]: p["reachability"] for p in reg.snapshot()}["home1"] == "relayed"
    assert reg.get("home1").reachability == "relayed"
    # strict decoding: unpaired entries or an unknown kind are refused
    for bad in (Heartbeat("pub", ("coord",), ()), Heartbeat("pub", ("coord",), ("punched",)),
                Heartbeat("pub", ("a", "a"), ("direct", "direct"))):
        with pytest.raises(MessageError):
            decode(bad.to_frame(), Heartbeat)


def test_bfloat16_needs_two_witnesses_of_the_class_and_an_unsettled_failure_means_float32(tmp_path):
    """coordinator/precision.py: bf16 is granted with two other live providers of the stage's class;
    once a same-recipe failure of its work could not be confirmed it serves float32, across
    registrations, while the operator's forced precision still wins."""
    from coordinator.precision import serving_dtype

    reg = registry(tmp_path)
    profile = {"hardware_class": "cpu/test/2 threads", "serving_dtype": "bfloat16"}
    for peer in ("a", "b"):
        reg.register(peer, profile, [f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], 2**30)
    assert serving_dtype(reg.get("a"), reg.records()) == "float32"  # one witness only
    reg.register("c", profile, ["/ip4/127.0.0.1/tcp/1/p2p/c"], 2**30)
    assert serving_dtype(reg.get("a"), reg.records()) == "bfloat16"
    assert reg.restrict_to_float32("a", "unconfirmed") and not reg.restrict_to_float32("a", "again")
    assert serving_dtype(reg.get("a"), reg.records()) == "float32"
    assert serving_dtype(reg.get("b"), reg.records()) == "bfloat16"
    reg.register("a", profile, ["/ip4/127.0.0.1/tcp/1/p2p/a"], 2**30)  # registering again does not clear it
    assert reg.get("a").float32_only == "unconfirmed" and reg.get("a").public(False)["float32_only"]
    assert serving_dtype(reg.get("a"), reg.records()) == "float32"
    assert serving_dtype(reg.get("a"), reg.records(), forced="bfloat16") == "bfloat16"
