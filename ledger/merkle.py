"""Merkle tree hashing of the entry log, as in Certificate Transparency (RFC 6962 / RFC 9162, 2.1).

leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right), the tree of n leaves
splits at k = the largest power of two below n. Pure functions over lists of 32-byte hashes:
tree head, inclusion proofs (PATH), consistency proofs (PROOF) and their verifiers, plus the
compact "frontier" (roots of the perfect subtrees of the log) that the ledger keeps so that
appending a leaf and computing the tree head cost O(log n).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof request outside the tree (index or size out of range)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]): the audit path of leaf `index` in the tree of all `leaves`."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ProofError(f"leaf {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return inclusion_proof(leaves[:k], index) + [root(leaves[k:])]
    return inclusion_proof(leaves[k:], index - k) + [root(leaves[:k])]


def consistency_proof(leaves: Sequence[bytes], first_size: int) -> list[bytes]:
    """PROOF(m, D[n]): that the tree of the first `first_size` leaves is a prefix of this one."""
    n = len(leaves)
    if not 0 <= first_size <= n:
        raise ProofError(f"size {first_size} is not within a tree of {n}")
    if first_size in (0, n):
        return []
    return _subproof(first_size, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [root(leaves)]
    k = _split(n)
    if m <= k:
        return _subproof(m, leaves[:k], whole) + [root(leaves[k:])]
    return _subproof(m - k, leaves[k:], False) + [root(leaves[:k])]


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], tree_root: bytes) -> bool:
    """RFC 9162, 2.1.3.2."""
    if not 0 <= index < tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == tree_root


def verify_consistency(first_size: int, second_size: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162, 2.1.4.2 (with the trivial cases: equal sizes, empty first tree)."""
    if not 0 <= first_size <= second_size:
        return False
    if first_size == second_size:
        return not proof and first_root == second_root
    if first_size == 0:
        return not proof and first_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if first_size & (first_size - 1) == 0:  # an exact power of two: the first tree is a subtree
        path.insert(0, first_root)
    fn, sn = first_size - 1, second_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


def frontier_append(frontier: list[bytes], size: int, leaf: bytes) -> list[bytes]:
    """Append `leaf` to a log of `size` leaves whose perfect-subtree roots (largest first) are `frontier`."""
    out = list(frontier)
    h, s = leaf, size
    while s & 1:
        h = node_hash(out.pop(), h)
        s >>= 1
    out.append(h)
    return out


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """The tree head of the log the frontier summarises (RFC 6962 trees fold from the right)."""
    if not frontier:
        return EMPTY_ROOT
    h = frontier[-1]
    for left in reversed(frontier[:-1]):
        h = node_hash(left, h)
    return h
