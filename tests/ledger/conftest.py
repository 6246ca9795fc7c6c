"""Ledger fixtures: every test runs against SQLite and against PostgreSQL.

PostgreSQL comes from $MESHPOOL_TEST_POSTGRES_URL (scripts/postgres.sh prints one); each test gets
its own schema (search_path in the URL), so tests and their subprocesses never share state.
Without the variable the PostgreSQL half is skipped, saying why.
"""

from __future__ import annotations


import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.chain import public_key_hex
from ledger.db import make_engine, resolve_url
from ledger.receipts import sign_receipt
from ledger.service import LedgerService
from tests.postgres import empty_schema_url

KEY_SEED = bytes(range(32))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A URL for an empty ledger database (`--db` form), removed after the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with empty_schema_url("the PostgreSQL half") as url:
        yield url


@pytest.fixture
def coordinator_key():
    return Ed25519PrivateKey.from_private_bytes(KEY_SEED)


@pytest.fixture
def service(db_url, coordinator_key):
    svc = LedgerService(make_engine(resolve_url(db_url)), coordinator_key, checkpoint_every_entries=8)
    yield svc
    svc.close()


class Pool:
    """A funded consumer and two providers with their own keys, on a fresh ledger."""

    def __init__(self, svc: LedgerService, funds_units: int = 10_000_000) -> None:
        self.svc = svc
        self.keys = {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
                     for i, name in enumerate(["peerA", "peerB", "peerC"])}
        svc.open_account("consumer:alice", "consumer")
        for name, key in self.keys.items():
            svc.open_account(name, "provider", public_key_hex(key))
        if funds_units:
            svc.mint("fund:alice", "consumer:alice", funds_units)

    def receipt(self, provider: str, request_id: str, layers: tuple[int, int], tokens: int, **override):
        body = dict(request_id=request_id, model="tiny", layer_start=layers[0], layer_end=layers[1],
                    token_count=tokens, input_hash="00" * 32, output_hash="11" * 32, provider_id=provider)
        body.update(override)
        return sign_receipt(self.keys[provider], **body)


@pytest.fixture
def pool(service):
    return Pool(service)
