"""Auditors see money, not people: the public /ledger routes name a consumer only by its random
pseudonym, and a consumer sees its own account and requests at /ledger/me with its key."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from coordinator.accounts import Accounts
from coordinator.api import create_app
from node.transport.identity import Identity

N_LAYERS = 30
MODEL = "smollm2-135m-instruct"
NAMES = ("alice-whose-name-is-private", "bob-also-private")


class NoPool:
    def submit(self, request) -> None:
        raise AssertionError("not used")

    def snapshot(self) -> dict:
        return {"providers": [], "pipelines": [], "pending_requests": 0, "plan_error": ""}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def app(tmp_path, tokenizer):
    accounts = Accounts(tmp_path / "coordinator", N_LAYERS)
    provider = Identity.generate()
    accounts.open_provider(provider.peer_id_str, provider.public_key_bytes)
    keys = {name: accounts.add_consumer(name, 10**9) for name in NAMES}
    for name, key in keys.items():  # a request each, ended (voided: no receipt) with its usage row
        who = accounts.lookup(key)
        charge = accounts.admit(who, f"cmpl-{name[:3]}", MODEL, 5, 8)
        accounts.finish(charge, None, "length")
    app = create_app(NoPool(), tokenizer, MODEL, 512, (2,), accounts,
                     rate_limit_rps=0)
    with TestClient(app) as client:
        yield client, keys, accounts, provider.peer_id_str
    accounts.close()


def test_the_public_ledger_never_names_a_consumer(app):
    client, keys, accounts, provider = app
    ids = {name: accounts.lookup(key).account_id for name, key in keys.items()}
    assert all(name not in ids[name] and ids[name].startswith("consumer:c-") for name in NAMES)
    assert len(set(ids.values())) == len(NAMES)
    paths = ["/ledger/entries?limit=1000", "/ledger/supply", "/ledger/checkpoints", "/dashboard/state",
             *(f"/ledger/accounts/{a}" for a in ids.values()), f"/ledger/accounts/{provider}",
             *(f"/ledger/ops/hold:cmpl-{n[:3]}" for n in NAMES), *(f"/ledger/ops/mint:{a}:initial" for a in ids.values())]
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, path
        assert not any(name in response.text for name in NAMES), path
    # the ledger's entries do hold each consumer's money, under its pseudonym
    entries = client.get("/ledger/entries?limit=1000").json()["entries"]
    assert {e["credit"] for e in entries if e["kind"] == "mint"} >= set(ids.values())
    assert client.get(f"/ledger/accounts/{provider}").json()["kind"] == "provider"  # providers stay public


def test_a_consumer_sees_its_own_account_and_requests_with_its_key(app):
    client, keys, accounts, _ = app
    assert client.get("/ledger/me").status_code == 401
    assert client.get("/ledger/me", headers={"Authorization": "Bearer mp-wrong"}).status_code == 401
    name = NAMES[0]
    me = client.get("/ledger/me", headers={"Authorization": f"Bearer {keys[name]}"}).json()
    assert me["id"] == accounts.lookup(keys[name]).account_id and me["name"] == name
    assert [u["request_id"] for u in me["recent_usage"]] == [f"cmpl-{name[:3]}"]  # its own, not bob's
    assert any(e["op_id"] == f"hold:cmpl-{name[:3]}" for e in me["recent_entries"])
    assert NAMES[1] not in json.dumps(me)
