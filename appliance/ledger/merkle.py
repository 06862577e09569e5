"""The RFC 9162 (Certificate Transparency v2) Merkle tree, section 2.1: hashes, roots, proofs, verifiers.

    leaf_hash(entry)              SHA-256(0x00 || entry)                       2.1.1
    node_hash(left, right)        SHA-256(0x01 || left || right)               2.1.1
    mth(leaf_hashes)              MTH(D[n]) over already-hashed leaves          2.1.1
    Frontier                      the compact range [0, size): append leaves, read the root
    inclusion_path / verify_...   PATH(m, D[n]) and its verification            2.1.3.1 / 2.1.3.2
    consistency_path / verify_... PROOF(m, D[n]) and its verification           2.1.4.1 / 2.1.4.2

A root does not commit to its tree's size (a proof's last hash is some subtree's root, whatever its
leaf count), so a proof can verify for several claimed sizes with the same shape: a size means something
only when it is signed together with its root, as in a checkpoint.

Sizes and indices are leaf counts; every hash is ``HASH_SIZE`` raw bytes. Builders that need a subtree's
root take a ``subtree(start, end)`` callable, so the caller decides where hashes come from (memory, stored
tiles, a database); ``subtree_of`` is the in-memory one.

Owns: the tree's arithmetic and nothing else: it is pure (hashlib only) and holds no state beyond a
``Frontier`` the caller owns.
Never: does I/O, signs, or knows what a leaf means; never accepts a proof by any rule other than the RFC's
verification algorithms (a shorter or longer path, a wrong-sized hash, or an index outside the tree is a
``ProofError`` with the reason, never a silent ``False``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from appliance.errors import ProofError

HASH_SIZE: Final = 32
EMPTY_ROOT: Final[bytes] = hashlib.sha256(b"").digest()

_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"
_sha256: Final = hashlib.sha256
_NODE_STATE: Final = hashlib.sha256(_NODE)  # never updated: only copied

Subtree = Callable[[int, int], bytes]


def leaf_hash(entry: bytes) -> bytes:
    """RFC 9162 2.1.1: the hash of one log entry, domain-separated from interior nodes by 0x00."""
    return _sha256(_LEAF + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 2.1.1: the hash of an interior node, domain-separated from leaves by 0x01."""
    return _sha256(_NODE + left + right).digest()


def mth(hashes: Sequence[bytes]) -> bytes:
    """MTH over ``hashes``, which are leaf hashes (not entries): ``EMPTY_ROOT`` for none.

    Iterative, O(n) hashing and O(log n) extra memory: a stack of the perfect subtrees completed so far
    (the same compact range ``Frontier`` keeps), folded right to left at the end. That fold is the RFC's
    split rule (largest power of two k < n goes left), so the result equals the recursive definition.

    The inputs may also be the roots of complete, aligned subtrees of one size 2^j, in order, followed by
    at most one root of a smaller subtree on the right edge (how callers combine stored 256-leaf tiles
    with a partial tail): the result is then the MTH of all the underlying leaves. This holds because
    with n = q * 2^j + r leaves (0 <= r < 2^j) and m = q + (1 if r else 0) inputs, the RFC splits n > 2^j
    at 2^j times the largest power of two below m: exactly between inputs, as if each input were one
    leaf, with the smaller tail always in the rightmost piece. Inputs not laid out that way (a smaller
    subtree anywhere but last) give the root of some other tree.
    """
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    node_state = _NODE_STATE.copy  # hashing from a copied 0x01 state skips a concatenation per node
    stack: list[bytes] = []
    push = stack.append
    pop = stack.pop
    pairs = 0
    # Leaves two at a time: each pair is a level-1 subtree; the number of pairs so far, by its trailing
    # zero bits, says how many completed subtrees on the stack the new pair closes.
    for i in range(0, n - 1, 2):
        left = hashes[i]
        right = hashes[i + 1]
        if len(left) != HASH_SIZE or len(right) != HASH_SIZE:
            _reject_input(hashes, i)
        x = node_state()
        x.update(left)
        x.update(right)
        h = x.digest()
        pairs += 1
        c = pairs
        while not c & 1:
            x = node_state()
            x.update(pop())
            x.update(h)
            h = x.digest()
            c >>= 1
        push(h)
    if n & 1:
        last = hashes[n - 1]
        if len(last) != HASH_SIZE:
            _reject_input(hashes, n - 1)
        push(last)
    return _fold(stack)


def _reject_input(hashes: Sequence[bytes], start: int) -> NoReturn:
    bad = next(i for i in range(start, len(hashes)) if len(hashes[i]) != HASH_SIZE)
    raise ValueError(f"mth: input {bad} is {len(hashes[bad])} bytes, not {HASH_SIZE}")


def _fold(stack: list[bytes]) -> bytes:
    """Root of a compact range [0, size): its perfect subtrees, largest first, joined right to left."""
    sha = _sha256
    node = _NODE
    root = stack[-1]
    for i in range(len(stack) - 2, -1, -1):
        root = sha(node + stack[i] + root).digest()
    return root


class Frontier:
    """Compact range [0, size): roots of the perfect subtrees on the left edge, largest first.

    There are popcount(size) of them, one per set bit of ``size``; it is all a log needs to keep to
    extend its tree and compute the root. ``append`` takes a leaf hash.
    """

    __slots__ = ("hashes", "size")

    size: int
    hashes: list[bytes]

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0:
            raise ValueError(f"Frontier size must be >= 0, got {size}")
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"Frontier of size {size} needs {size.bit_count()} subtree hashes, got {len(hashes)}"
            )
        for i, h in enumerate(hashes):
            if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                raise ValueError(f"Frontier hash {i} must be {HASH_SIZE} bytes")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash; amortised one node hash (the old size's trailing one bits, merged)."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes, got {len(leaf)}")
        hashes = self.hashes
        size = self.size
        self.size = size + 1
        while size & 1:
            x = _NODE_STATE.copy()
            x.update(hashes.pop())
            x.update(leaf)
            leaf = x.digest()
            size >>= 1
        hashes.append(leaf)

    def root(self) -> bytes:
        """MTH of all leaves so far (``EMPTY_ROOT`` when there are none); leaves the frontier as it is."""
        if not self.hashes:
            return EMPTY_ROOT
        return _fold(self.hashes)

    def copy(self) -> Frontier:
        twin = Frontier.__new__(Frontier)
        twin.size = self.size
        twin.hashes = list(self.hashes)
        return twin

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return self.size == other.size and self.hashes == other.hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Frontier(size={self.size}, hashes=[{', '.join(h.hex()[:12] for h in self.hashes)}])"


def subtree_of(leaves: Sequence[bytes]) -> Subtree:
    """A ``subtree(start, end)`` for callers holding every leaf hash in memory: mth(leaves[start:end])."""

    def subtree(start: int, end: int) -> bytes:
        if not 0 <= start < end <= len(leaves):
            raise ValueError(f"subtree [{start}, {end}) is not a non-empty range of {len(leaves)} leaves")
        return mth(leaves[start:end])

    return subtree


def _split(n: int) -> int:
    """The largest power of two strictly less than ``n`` (n >= 2): where RFC 9162 splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_path(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(index, D[size]): sibling roots from the leaf's neighbour up to the root's child.

    Walks the RFC recursion top-down, so ``subtree`` is only asked for ranges that recursion names: each
    starts at a multiple of the largest power of two >= its length (a tile-aligned store can serve them).
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    siblings: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            siblings.append(subtree(start + k, end))
            end = start + k
        else:
            siblings.append(subtree(start, start + k))
            start += k
    siblings.reverse()
    return siblings


def consistency_path(old_size: int, new_size: int, subtree: Subtree) -> list[bytes]:
    """RFC 9162 2.1.4.1 PROOF(old_size, D[new_size]) = SUBPROOF(old_size, D[new_size], true).

    Empty when the sizes are equal. ``subtree`` is asked only for ranges the RFC recursion names.
    """
    if not 0 < old_size <= new_size:
        raise ValueError(f"consistency needs 0 < old_size <= new_size, got {old_size} and {new_size}")
    nodes: list[bytes] = []
    start, end = 0, new_size
    whole_old_tree = True  # SUBPROOF's b: is D[start:old_size] still the entire old tree?
    while True:
        if old_size == end:
            if not whole_old_tree:
                nodes.append(subtree(start, end))
            break
        k = _split(end - start)
        if old_size - start <= k:
            nodes.append(subtree(start + k, end))
            end = start + k
        else:
            nodes.append(subtree(start, start + k))
            start += k
            whole_old_tree = False
    nodes.reverse()
    return nodes


def _check_hash(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def _check_path(what: str, path: Sequence[bytes], expected: int, context: str) -> None:
    if len(path) != expected:
        raise ProofError(f"wrong {what} length: {len(path)} hashes, {context} needs {expected}")
    for i, p in enumerate(path):
        _check_hash(f"{what} element {i}", p)


def _inclusion_length(index: int, size: int) -> int:
    # Below the highest bit where index and size - 1 differ, the leaf has a sibling at every level; above
    # it, only where the index has a one bit (the others are levels where the leaf's subtree is the
    # right edge and has no sibling).
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """The root that ``path`` proves leaf hash ``leaf`` at ``index`` into, per RFC 9162 2.1.3.2 steps 1-4.

    Raises ``ProofError`` for an index outside the tree, a path of the wrong length, or a wrong-sized hash.
    """
    _check_hash("leaf hash", leaf)
    if size <= 0 or not 0 <= index < size:
        raise ProofError(f"leaf index {index} is out of range: need 0 <= index < tree size {size}")
    _check_path("inclusion path", path, _inclusion_length(index, size), f"index {index} of size {size}")
    # The RFC's steps 2-5 follow as written. The length check above already rejects every path for which
    # the sn checks below would fail; they stay so that this reads, and fails, like the RFC.
    sha = _sha256
    node = _NODE
    fn, sn, r = index, size - 1, leaf  # steps 2, 3
    for p in path:  # step 4
        if sn == 0:  # 4a
            raise ProofError("wrong inclusion path length: hashes left over above the root")
        if fn & 1 or fn == sn:  # 4b: p is a left sibling
            r = sha(node + p + r).digest()
            while not fn & 1 and fn != 0:  # right edge: climb the levels where r has no sibling
                fn >>= 1
                sn >>= 1
        else:  # p is a right sibling
            r = sha(node + r + p).digest()
        fn >>= 1  # 4c
        sn >>= 1
    if sn != 0:  # step 5 (the root comparison is verify_inclusion's)
        raise ProofError("wrong inclusion path length: it ends below the root")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 2.1.3.2: accept (return) only if ``path`` proves ``leaf`` at ``index`` under ``root``."""
    _check_hash("root", root)
    computed = root_from_inclusion(index, size, leaf, path)
    if computed != root:
        raise ProofError(
            f"inclusion root mismatch: path for index {index} of size {size} leads to {computed.hex()}, "
            f"expected {root.hex()}"
        )


def _consistency_length(old_size: int, new_size: int) -> int:
    # The proof is the inclusion path of leaf old_size - 1 in the new tree, started at the level of the
    # old tree's lowest perfect subtree (its trailing zero bits), plus that subtree's root unless it is the
    # whole old tree (old_size a power of two: the verifier already holds it as old_root).
    shift = (old_size & -old_size).bit_length() - 1
    length = _inclusion_length(old_size - 1, new_size) - shift
    return length if old_size == 1 << shift else length + 1


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]
) -> None:
    """RFC 9162 2.1.4.2: accept (return) only if ``path`` proves D[old_size] is a prefix of D[new_size].

    Equal sizes need an empty path and equal roots (the RFC defines proofs for old_size < new_size).
    """
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    if old_size <= 0:
        raise ProofError(f"old_size must be > 0 for a consistency proof, got {old_size}")
    if old_size > new_size:
        raise ProofError(f"old_size {old_size} is larger than new_size {new_size}")
    if old_size == new_size:
        if path:
            raise ProofError(f"wrong consistency path length: {len(path)} hashes, equal sizes need 0")
        if old_root != new_root:
            raise ProofError(
                f"root mismatch: trees of equal size {old_size} have roots {old_root.hex()} "
                f"and {new_root.hex()}"
            )
        return
    _check_path(
        "consistency path",
        path,
        _consistency_length(old_size, new_size),
        f"old_size {old_size} to new_size {new_size}",
    )
    # The RFC's steps 2-7 follow as written (step 1, an empty path, is covered by the length check, which
    # also rejects every path for which the sn checks below would fail; they stay to read like the RFC).
    # Step 2: when the old tree is one perfect subtree, the proof omits its root; the verifier has it.
    proof = [old_root, *path] if old_size & (old_size - 1) == 0 else list(path)
    sha = _sha256
    node = _NODE
    fn, sn = old_size - 1, new_size - 1  # step 3
    while fn & 1:  # step 4: start at the level of the old tree's lowest perfect subtree
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]  # step 5
    for c in proof[1:]:  # step 6
        if sn == 0:  # 6a
            raise ProofError("wrong consistency path length: hashes left over above the root")
        if fn & 1 or fn == sn:  # 6b: c is a left sibling, in both trees
            fr = sha(node + c + fr).digest()
            sr = sha(node + c + sr).digest()
            while not fn & 1 and fn != 0:  # old tree's right edge: climb levels with no sibling
                fn >>= 1
                sn >>= 1
        else:  # c is a right sibling that only the new tree has
            sr = sha(node + sr + c).digest()
        fn >>= 1  # 6c
        sn >>= 1
    if sn != 0:  # step 7
        raise ProofError("wrong consistency path length: it ends below the new root")
    if fr != old_root:
        raise ProofError(
            f"old root mismatch: path for {old_size} -> {new_size} leads to {fr.hex()}, "
            f"expected {old_root.hex()}"
        )
    if sr != new_root:
        raise ProofError(
            f"new root mismatch: path for {old_size} -> {new_size} leads to {sr.hex()}, "
            f"expected {new_root.hex()}"
        )
