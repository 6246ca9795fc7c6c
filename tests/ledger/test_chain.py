"""Canonical encoding, entry hashing and the coordinator key file."""

from __future__ import annotations

import os

import pytest

from ledger.chain import (COORDINATOR_KEY_FILE, Entry, canonical_json, load_or_create_coordinator_key, public_key_hex)
from ledger.errors import InvalidTransfer
from ledger.merkle import leaf_hash


def test_canonical_json_is_sorted_compact_and_refuses_floats():
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == b'{"a":[true,null,"\\u00e9"],"b":1}'
    with pytest.raises(InvalidTransfer):
        canonical_json({"amount": 1.0})
    with pytest.raises(InvalidTransfer):
        canonical_json({1: "non-string key"})


def test_entry_hash_is_the_rfc6962_leaf_of_its_canonical_bytes():
    e = Entry(3, "op", 0, "transfer", "a", "b", 5, None, {"memo": "x"}, 1_700_000_000_000, "00" * 32)
    assert e.hash() == leaf_hash(e.canonical_bytes())
    changed = Entry(3, "op", 0, "transfer", "a", "b", 6, None, {"memo": "x"}, 1_700_000_000_000, "00" * 32)
    assert changed.hash() != e.hash()


def test_coordinator_key_file(tmp_path):
    key = load_or_create_coordinator_key(tmp_path)
    path = tmp_path / COORDINATOR_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_hex(load_or_create_coordinator_key(tmp_path)) == public_key_hex(key)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        load_or_create_coordinator_key(tmp_path)
