"""Identity: persistent Ed25519 key = libp2p peer id; sign/verify."""

from __future__ import annotations

import os
import stat

import pytest
from libp2p.peer.id import ID

from node.transport.identity import (
    KEY_FILE,
    Identity,
    IdentityError,
    load_or_create,
    peer_id_from_public_key,
    verify,
    verify_for_peer,
)


def test_key_file_is_created_0600_and_reloaded_to_the_same_peer_id(tmp_path) -> None:
    a = load_or_create(tmp_path / "node")
    path = tmp_path / "node" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    b = load_or_create(tmp_path / "node")
    assert a.peer_id_str == b.peer_id_str
    assert a.peer_id_str.startswith("12D3KooW")  # Ed25519 identity multihash
    assert a.peer_id == ID.from_pubkey(a.key_pair.public_key)
    assert load_or_create(tmp_path / "other").peer_id_str != a.peer_id_str


def test_refuses_group_readable_or_malformed_key(tmp_path) -> None:
    load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="0600"):
        load_or_create(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(IdentityError, match="32-byte"):
        load_or_create(tmp_path)


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"receipt")
    assert len(sig) == 64
    pub = ident.public_key_bytes
    assert verify(pub, b"receipt", sig)
    assert not verify(pub, b"receipt!", sig)
    assert not verify(pub, b"receipt", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify(b"\x00" * 31, b"receipt", sig)
    assert not verify(Identity.generate().public_key_bytes, b"receipt", sig)
    assert peer_id_from_public_key(pub) == ident.peer_id
    assert verify_for_peer(ident.peer_id_str, pub, b"receipt", sig)
    assert not verify_for_peer(Identity.generate().peer_id_str, pub, b"receipt", sig)


def test_seeded_identity_is_deterministic() -> None:
    assert Identity.from_seed(b"\x01" * 32).peer_id_str == Identity.from_seed(b"\x01" * 32).peer_id_str


def test_one_process_at_a_time_holds_a_data_directory(tmp_path):
    import os

    import pytest

    from node.transport.instance import AlreadyServing, InstanceLock

    first = InstanceLock(tmp_path).acquire()
    with pytest.raises(AlreadyServing, match=f"pid {os.getpid()}.*one peer id serves from one process"):
        InstanceLock(tmp_path).acquire()
    first.release()
    InstanceLock(tmp_path).acquire().release()  # free again once released (the kernel does it on exit)
