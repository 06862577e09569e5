"""Fuzzing the RFC 9162 verifiers (``appliance.ledger.merkle``): random trees, their proofs, and mutations.

Properties: a proof built by the tree verifies; any change to it (a flipped bit, a hash dropped, added,
swapped or resized, another index or size, another root) is refused with ``ProofError`` and never with
another exception; and arbitrary inputs, however ill-typed in size, raise ``ProofError`` or pass.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from appliance.errors import ProofError
from appliance.ledger.merkle import (
    HASH_SIZE,
    consistency_path,
    inclusion_path,
    leaf_hash,
    mth,
    subtree_of,
    verify_consistency,
    verify_inclusion,
)
from tests.fuzz._profile import examples

pytestmark = pytest.mark.fuzz

MAX_LEAVES = 300  # crosses a 256-leaf tile boundary, where stored trees change how they are read

sizes = st.integers(1, MAX_LEAVES)


def _leaves(n: int, salt: int) -> list[bytes]:
    return [leaf_hash(b"%d-%d" % (salt, i)) for i in range(n)]


hashes = st.binary(min_size=HASH_SIZE, max_size=HASH_SIZE)
any_hash = st.one_of(hashes, st.binary(max_size=2 * HASH_SIZE))


@st.composite
def mutated_path(draw: st.DrawFn, path: list[bytes]) -> list[bytes]:
    """``path`` with one change that must make it fail (the caller rules out no-op changes)."""
    path = list(path)
    kind = draw(st.sampled_from(["flip", "drop", "add", "swap", "resize", "replace"]))
    if kind == "flip" and path:
        i = draw(st.integers(0, len(path) - 1))
        bit = draw(st.integers(0, HASH_SIZE * 8 - 1))
        h = bytearray(path[i])
        h[bit // 8] ^= 1 << (bit % 8)
        path[i] = bytes(h)
    elif kind == "drop" and path:
        del path[draw(st.integers(0, len(path) - 1))]
    elif kind == "swap" and len(path) >= 2:
        i, j = draw(st.lists(st.integers(0, len(path) - 1), min_size=2, max_size=2, unique=True))
        path[i], path[j] = path[j], path[i]
    elif kind == "resize" and path:
        i = draw(st.integers(0, len(path) - 1))
        path[i] = draw(st.binary(max_size=2 * HASH_SIZE).filter(lambda b: len(b) != HASH_SIZE))
    elif kind == "replace" and path:
        path[draw(st.integers(0, len(path) - 1))] = draw(hashes)
    else:
        path.insert(draw(st.integers(0, len(path))), draw(hashes))
    return path


@examples(200)
@given(size=sizes, data=st.data())
def test_inclusion_proofs_verify_and_mutations_are_refused(size: int, data: st.DataObject) -> None:
    leaves = _leaves(size, data.draw(st.integers(0, 3), label="salt"))
    index = data.draw(st.integers(0, size - 1), label="index")
    root = mth(leaves)
    path = inclusion_path(index, size, subtree_of(leaves))
    verify_inclusion(index, size, leaves[index], path, root)

    mutated = data.draw(mutated_path(path), label="mutated path")
    assume(mutated != path)
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaves[index], mutated, root)

    other_index = data.draw(st.integers(-2, size + 2), label="other index")
    other_size = data.draw(st.integers(-2, MAX_LEAVES + 2), label="other size")
    other_leaf = data.draw(any_hash, label="other leaf")
    other_root = data.draw(any_hash, label="other root")
    for args in [
        (other_index, size, leaves[index], path, root),
        (index, other_size, leaves[index], path, root),
        (index, size, other_leaf, path, root),
        (index, size, leaves[index], path, other_root),
    ]:
        # A leaf equal to another one (or the same index, size, root) proves what it claims; anything else
        # must be refused, and only with ProofError.
        holds = (
            0 <= args[0] < args[1]
            and args[0] < len(leaves) == args[1]
            and args[2] == leaves[args[0]]
            and args[4] == root
        )
        try:
            verify_inclusion(*args)
        except ProofError:
            assert not holds, args[:2]
        else:
            # A root does not commit to its size: the same path may verify for another (index, size) of
            # the same shape. It must still be a tree of this root, with this leaf at a valid index.
            assert args[2] == leaves[index] and args[4] == root and 0 <= args[0] < args[1]


@examples(200)
@given(new_size=sizes, data=st.data())
def test_consistency_proofs_verify_and_mutations_are_refused(new_size: int, data: st.DataObject) -> None:
    leaves = _leaves(new_size, data.draw(st.integers(0, 3), label="salt"))
    old_size = data.draw(st.integers(1, new_size), label="old size")
    old_root, new_root = mth(leaves[:old_size]), mth(leaves)
    path = consistency_path(old_size, new_size, subtree_of(leaves))
    verify_consistency(old_size, new_size, old_root, new_root, path)

    mutated = data.draw(mutated_path(path), label="mutated path")
    assume(mutated != path)
    with pytest.raises(ProofError):
        verify_consistency(old_size, new_size, old_root, new_root, mutated)

    wrong_root = data.draw(any_hash, label="wrong root")
    assume(wrong_root not in (old_root, new_root))
    with pytest.raises(ProofError):
        verify_consistency(old_size, new_size, wrong_root, new_root, path)
    with pytest.raises(ProofError):
        verify_consistency(old_size, new_size, old_root, wrong_root, path)

    other_old = data.draw(st.integers(-2, MAX_LEAVES + 2), label="other old size")
    other_new = data.draw(st.integers(-2, MAX_LEAVES + 2), label="other new size")
    try:
        verify_consistency(other_old, other_new, old_root, new_root, path)
    except ProofError:
        pass
    else:  # sizes of the same proof shape; the roots still are those of a prefix and its extension
        assert 0 < other_old <= other_new


@examples(200)
@given(
    index=st.integers(-(2**70), 2**70),
    size=st.integers(-(2**70), 2**70),
    leaf=any_hash,
    path=st.lists(any_hash, max_size=80),
    root=any_hash,
    old_size=st.integers(-(2**70), 2**70),
    new_root=any_hash,
)
def test_arbitrary_inputs_raise_only_proof_error(
    index: int, size: int, leaf: bytes, path: list[bytes], root: bytes, old_size: int, new_root: bytes
) -> None:
    """Huge and negative sizes and indices, wrong-sized hashes: refused with ProofError, nothing else."""
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaf, path, hashlib.sha256(root).digest())
    try:
        verify_consistency(old_size, size, root, new_root, path)
    except ProofError:
        pass
    else:  # only equal sizes with equal roots and no path hold without a real proof
        assert old_size == size > 0 and root == new_root and not path
