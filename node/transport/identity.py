"""Node identity: one persistent Ed25519 key = the libp2p peer id.

The key file holds the 32-byte Ed25519 seed (what py-libp2p's
Ed25519PrivateKey.to_bytes() returns), mode 0600, written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

KEY_FILE = "node_ed25519.key"
SEED_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    key_pair: KeyPair

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)

    @property
    def peer_id_str(self) -> str:
        return self.peer_id.to_base58()

    @property
    def public_key_bytes(self) -> bytes:
        return self.key_pair.public_key.to_bytes()

    def sign(self, data: bytes) -> bytes:
        return self.key_pair.private_key.sign(data)

    @classmethod
    def generate(cls) -> "Identity":
        return cls.from_seed(None)

    @classmethod
    def from_seed(cls, seed: bytes | None) -> "Identity":
        priv = Ed25519PrivateKey.new(seed)
        return cls(KeyPair(priv, priv.get_public_key()))


def load_or_create(data_dir: str | os.PathLike[str]) -> Identity:
    """Load <data_dir>/node_ed25519.key, creating it (0600) on first use."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / KEY_FILE
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise IdentityError(f"{path} has mode {mode:o}; it must be readable by its owner only (0600)")
        seed = path.read_bytes()
        if len(seed) != SEED_BYTES:
            raise IdentityError(f"{path} holds {len(seed)} bytes, wanted a {SEED_BYTES}-byte Ed25519 seed")
        return Identity.from_seed(seed)
    ident = Identity.generate()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, ident.key_pair.private_key.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return ident


def peer_id_from_public_key(public_key: bytes) -> ID:
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True iff signature is a valid Ed25519 signature of data by public_key."""
    if len(public_key) != 32 or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        return Ed25519PublicKey.from_bytes(public_key).verify(data, signature)
    except Exception:  # malformed key bytes
        return False


def verify_for_peer(peer_id: ID | str, public_key: bytes, data: bytes, signature: bytes) -> bool:
    """verify() plus: the public key really is the one behind peer_id."""
    try:
        expected = peer_id_from_public_key(public_key)
    except Exception:
        return False
    if str(expected) != str(peer_id):
        return False
    return verify(public_key, data, signature)


def verify_by_peer_id(peer_id: ID | str, data: bytes, signature: bytes) -> bool:
    """verify() with the public key inside an Ed25519 peer id (peer ids embed such keys whole)."""
    try:
        key = (peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)).extract_public_key()
        return key is not None and verify(key.to_bytes(), data, signature)
    except Exception:  # not a peer id, or not one that embeds its key
        return False
