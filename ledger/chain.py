"""Entries, their canonical encoding, hashes and signatures; checkpoints; the coordinator key.

An entry is encoded as canonical JSON (sorted keys, no spaces, ASCII, integers only), so an
auditor reproduces the bytes from the database columns alone. Its hash is the RFC 6962 leaf hash
SHA-256(0x00 || bytes); each entry includes the previous entry's hash (a chain) and is the leaf
of the log's Merkle tree. The coordinator signs every entry hash and every checkpoint with
Ed25519; its public key is in the genesis entry.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ledger.errors import InvalidTransfer
from ledger.merkle import leaf_hash

ENTRY_VERSION = 1
ZERO_HASH = "00" * 32
ENTRY_DOMAIN = b"meshpool-ledger-entry/1\x00"
CHECKPOINT_DOMAIN = b"meshpool-ledger-checkpoint/1\x00"
COORDINATOR_KEY_FILE = "coordinator_ledger_ed25519.key"
MAX_META_BYTES = 4096


def canonical_json(value: Any) -> bytes:
    """Canonical bytes of a JSON value made of dicts, lists, str, int, bool and None (no floats)."""
    _check_json(value, depth=0)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_json(value: Any, depth: int) -> None:
    if depth > 8:
        raise InvalidTransfer("meta nests too deep")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidTransfer(f"meta key {key!r} is not a string")
            _check_json(item, depth + 1)
        return
    raise InvalidTransfer(f"meta value of type {type(value).__name__} is not allowed (no floats)")


@dataclass(frozen=True)
class Entry:
    """One double-entry leg: `amount_units` moves from `debit_id` to `credit_id` (either may be None)."""

    seq: int
    op_id: str
    leg: int
    kind: str
    debit_id: str | None
    credit_id: str | None
    amount_units: int
    ref_id: str | None
    meta: dict = field(default_factory=dict)
    ts_ms: int = 0
    prev_hash: str = ZERO_HASH

    def to_dict(self) -> dict:
        return {
            "v": ENTRY_VERSION, "seq": self.seq, "op_id": self.op_id, "leg": self.leg, "kind": self.kind,
            "debit": self.debit_id, "credit": self.credit_id, "amount_units": self.amount_units,
            "ref": self.ref_id, "meta": self.meta, "ts_ms": self.ts_ms, "prev_hash": self.prev_hash,
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    def hash(self) -> bytes:
        return leaf_hash(self.canonical_bytes())


def meta_json(meta: dict) -> str:
    text = canonical_json(meta).decode()
    if len(text) > MAX_META_BYTES:
        raise InvalidTransfer(f"entry meta of {len(text)} bytes, at most {MAX_META_BYTES}")
    return text


def sign_hash(key: Ed25519PrivateKey, entry_hash: bytes) -> bytes:
    return key.sign(ENTRY_DOMAIN + entry_hash)


def verify_hash_signature(public_key: Ed25519PublicKey, entry_hash: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(signature, ENTRY_DOMAIN + entry_hash)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class CheckpointBody:
    """A signed tree head: the log's size, its chain head and its Merkle root at that size."""

    entry_count: int
    head_hash: str
    tree_root: str
    ts_ms: int

    def signed_bytes(self) -> bytes:
        return CHECKPOINT_DOMAIN + canonical_json(
            {"entry_count": self.entry_count, "head_hash": self.head_hash, "tree_root": self.tree_root,
             "ts_ms": self.ts_ms})

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        return key.sign(self.signed_bytes())

    def verify(self, public_key: Ed25519PublicKey, signature: bytes) -> bool:
        try:
            public_key.verify(signature, self.signed_bytes())
        except InvalidSignature:
            return False
        return True


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidTransfer(f"not an Ed25519 public key: {text!r}") from exc


def load_or_create_coordinator_key(data_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load DATA_DIR/coordinator_ledger_ed25519.key (a 32-byte seed, mode 0600), creating it on first use."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / COORDINATOR_KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} must be readable by its owner only (chmod 600)")
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path} holds {len(seed)} bytes, wanted a 32-byte Ed25519 seed")
        return Ed25519PrivateKey.from_private_bytes(seed)
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key
