"""RFC 6962/9162 Merkle functions against hand-computed small trees, and proofs round-tripping."""

from __future__ import annotations

import hashlib
import random

import pytest

from ledger import merkle


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


LEAVES = [merkle.leaf_hash(bytes([i])) for i in range(8)]
a, b, c, d, e, f, g, hh = LEAVES


def n(x: bytes, y: bytes) -> bytes:
    return h(b"\x01" + x + y)


def test_leaf_and_node_use_domain_separation():
    assert merkle.leaf_hash(b"x") == h(b"\x00x")
    assert merkle.node_hash(b"L", b"R") == h(b"\x01LR")
    assert merkle.root([]) == h(b"")


def test_roots_of_small_trees_by_hand():
    assert merkle.root([a]) == a
    assert merkle.root([a, b]) == n(a, b)
    assert merkle.root([a, b, c]) == n(n(a, b), c)  # split at k = 2
    assert merkle.root([a, b, c, d]) == n(n(a, b), n(c, d))
    assert merkle.root([a, b, c, d, e]) == n(n(n(a, b), n(c, d)), e)
    assert merkle.root(LEAVES[:7]) == n(n(n(a, b), n(c, d)), n(n(e, f), g))


def test_inclusion_paths_by_hand():
    # RFC 6962 2.1.3 example tree of 7 leaves: path of d is [c, hash(a,b), hash(e,f,g)].
    assert merkle.inclusion_proof(LEAVES[:7], 3) == [c, n(a, b), n(n(e, f), g)]
    assert merkle.inclusion_proof(LEAVES[:7], 6) == [n(e, f), n(n(a, b), n(c, d))]
    assert merkle.inclusion_proof(LEAVES[:7], 0) == [b, n(c, d), n(n(e, f), g)]


def test_consistency_proofs_by_hand():
    # RFC 6962 2.1.4 examples on the 7-leaf tree.
    assert merkle.consistency_proof(LEAVES[:7], 3) == [c, d, n(a, b), n(n(e, f), g)]
    assert merkle.consistency_proof(LEAVES[:7], 4) == [n(n(e, f), g)]
    assert merkle.consistency_proof(LEAVES[:7], 6) == [n(e, f), g, n(n(a, b), n(c, d))]


def test_every_inclusion_proof_verifies_and_wrong_ones_fail():
    for size in range(1, 34):
        leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
        root = merkle.root(leaves)
        for index in range(size):
            proof = merkle.inclusion_proof(leaves, index)
            assert len(proof) <= (size - 1).bit_length()
            assert merkle.verify_inclusion(leaves[index], index, size, proof, root)
            assert not merkle.verify_inclusion(leaves[index], index, size, proof, h(b"other"))
            if size > 1:
                assert not merkle.verify_inclusion(leaves[index], (index + 1) % size, size, proof, root)
            if proof:
                assert not merkle.verify_inclusion(leaves[index], index, size, proof[:-1], root)


def test_every_consistency_proof_verifies_and_wrong_ones_fail():
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(33)]
    for second in range(1, 34):
        for first in range(0, second + 1):
            proof = merkle.consistency_proof(leaves[:second], first)
            r1, r2 = merkle.root(leaves[:first]), merkle.root(leaves[:second])
            assert merkle.verify_consistency(first, second, r1, r2, proof)
            if 0 < first < second:
                assert not merkle.verify_consistency(first, second, h(b"x"), r2, proof)
                assert not merkle.verify_consistency(first, second, r1, h(b"x"), proof)
                forked = leaves[:first - 1] + [h(b"fork")] + leaves[first:second]
                assert not merkle.verify_consistency(first, second, r1, merkle.root(forked), proof)


def test_frontier_matches_the_full_tree():
    rng = random.Random(7)
    frontier, leaves = [], []
    for size in range(200):
        leaf = rng.randbytes(32)
        frontier = merkle.frontier_append(frontier, size, leaf)
        leaves.append(leaf)
        assert merkle.frontier_root(frontier) == merkle.root(leaves)
        assert len(frontier) == bin(size + 1).count("1")


def test_proof_requests_outside_the_tree_are_refused():
    with pytest.raises(merkle.ProofError):
        merkle.inclusion_proof(LEAVES[:3], 3)
    with pytest.raises(merkle.ProofError):
        merkle.consistency_proof(LEAVES[:3], 4)
