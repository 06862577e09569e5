"""Trust rotation and the TUF attack list, in the style of TUF's updater tests: each attack is named.

A bundle may carry a new trust set; it passes only when signed by a threshold of the keys trusted now
and by the new set's threshold of its own keys. Everything runs against a real vault holding v7.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import signing_keys
from appliance.errors import BundleRejected, OperatorError
from appliance.policy import dsse
from appliance.policy.importer import MAX_BUNDLE_BYTES, verify_bundle
from appliance.policy.schema import TrustSpec
from appliance.policy.store import MIGRATIONS, PolicyStore, load_active
from appliance.policy.trust import TrustStore
from appliance.vault.db import Database
from tests.policy.test_fixtures import NOW, SITE, bundle, doc, new_key, payload, trust_of


@dataclass
class World:
    tmp: Path
    a: signing_keys.SigningKey
    b: signing_keys.SigningKey
    n1: signing_keys.SigningKey
    n2: signing_keys.SigningKey
    n3: signing_keys.SigningKey
    trust: TrustStore
    """The appliance's trust.json: a and b, threshold 2."""
    store: PolicyStore


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    n1, n2, n3 = (new_key(tmp_path, n) for n in ("n1", "n2", "n3"))
    trust = trust_of(tmp_path, a, b, threshold=2)
    trust.save()
    with Database(tmp_path / "vault.db", MIGRATIONS) as db:
        store = PolicyStore(db)
        store.activate(verify_bundle(bundle(doc(), a, b), trust, site=SITE, current_version=None, now=NOW))
        yield World(tmp_path, a, b, n1, n2, n3, trust, store)


def spec(*signers: signing_keys.SigningKey, threshold: int) -> dict[str, Any]:
    entries = {}
    for s in signers:
        entry = signing_keys.public_json(s.public)
        entries[entry.pop("keyid")] = entry
    return {"threshold": threshold, "keys": entries}


def rotation(w: World, version: int = 8, **changes: Any) -> dict[str, Any]:
    return doc(version=version, trust=spec(w.n1, w.n2, w.n3, threshold=2), **changes)


def verify(w: World, data: bytes, trust: TrustStore | None = None) -> Any:
    return verify_bundle(
        data, trust or w.trust, site=SITE, current_version=w.store.current_version(), now=NOW
    )


def rejected(w: World, data: bytes, trust: TrustStore | None = None) -> BundleRejected:
    before = w.store.history()
    with pytest.raises(BundleRejected) as info:
        w.store.activate(verify(w, data, trust))
    assert w.store.history() == before
    return info.value


# -- rotation -------------------------------------------------------------------------------------------


def test_rotation_accepted_with_old_and_new_thresholds(world: World) -> None:
    w = world
    vb = verify(w, bundle(rotation(w), w.a, w.b, w.n1, w.n3))
    assert vb.keyids == sorted([w.a.keyid, w.b.keyid])  # the keys trusted now
    assert vb.new_trust == TrustSpec.model_validate(spec(w.n1, w.n2, w.n3, threshold=2))
    w.store.activate(vb)
    w.trust.replace(vb.new_trust)

    installed = TrustStore.load(w.tmp / "trust.json")
    assert set(installed.keys) == {w.n1.keyid, w.n2.keyid, w.n3.keyid} and installed.threshold == 2
    policy, reason = load_active(w.store, installed, SITE, NOW)  # the bundle in force still verifies
    assert reason == "ok" and policy is not None and policy.version == 8

    old_only = rejected(w, bundle(doc(version=9), w.a, w.b), installed)
    assert old_only.check == "unknown_key"  # the old keys are retired
    assert verify(w, bundle(doc(version=9), w.n2, w.n3), installed).policy.version == 9


def test_rotation_signed_only_by_the_new_keys_is_rejected(world: World) -> None:
    """Never trust a key carried inside a bundle on its own: the payload is not even read."""
    w = world
    error = rejected(w, bundle(rotation(w), w.n1, w.n2, w.n3))
    assert error.check == "unknown_key"
    assert "does not trust" in str(error)


def test_rotation_rejected_without_the_old_threshold(world: World) -> None:
    w = world
    error = rejected(w, bundle(rotation(w), w.a, w.n1, w.n2, w.n3))
    assert error.check == "threshold" and "requires 2" in str(error)


def test_rotation_rejected_without_the_new_threshold(world: World) -> None:
    w = world
    error = rejected(w, bundle(rotation(w), w.a, w.b, w.n1))
    assert error.check == "rotation"
    assert "threshold 2 of 3 keys" in str(error) and "signed by 1 of the new keys" in str(error)


def test_rotation_duplicate_new_keyids_counted_once(world: World) -> None:
    w = world
    error = rejected(w, bundle(rotation(w), w.a, w.b, w.n1, w.n1, w.n1))
    assert error.check == "rotation" and "signed by 1 of the new keys" in str(error)


def test_rotation_bad_signature_by_a_new_key(world: World) -> None:
    w = world
    envelope = json.loads(bundle(rotation(w), w.a, w.b, w.n1, w.n2))
    sig = bytearray(base64.b64decode(envelope["signatures"][3]["sig"]))
    sig[5] ^= 1
    envelope["signatures"][3]["sig"] = base64.b64encode(bytes(sig)).decode()
    error = rejected(w, json.dumps(envelope).encode())
    assert error.check == "rotation" and "does not verify" in str(error)


def test_rotation_algorithm_substitution_under_a_new_keyid(world: World) -> None:
    w = world
    body = payload(rotation(w))
    foreign = ec.generate_private_key(ec.SECP256R1()).sign(
        dsse.pae(dsse.PAYLOAD_TYPE, body), ec.ECDSA(hashes.SHA256())
    )
    envelope = json.loads(bundle(body, w.a, w.b, w.n1))
    envelope["signatures"].append({"keyid": w.n2.keyid, "sig": base64.b64encode(foreign).decode()})
    error = rejected(w, json.dumps(envelope).encode())
    assert error.check == "rotation" and "does not verify" in str(error)


def _mutate_spec(mutate: Callable[[dict[str, Any]], None]) -> Callable[[World], dict[str, Any]]:
    def build(w: World) -> dict[str, Any]:
        document = rotation(w)
        mutate(document["trust"])
        return document

    return build


def _first(trust: dict[str, Any]) -> dict[str, Any]:
    return next(iter(trust["keys"].values()))


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (_mutate_spec(lambda t: t.update(threshold=4)), "threshold 4 is above the number of keys (3)"),
        (_mutate_spec(lambda t: t.update(threshold=0)), "trust.threshold"),
        (_mutate_spec(lambda t: t.update(keys={})), "trust.keys"),
        (_mutate_spec(lambda t: _first(t).update(keytype="rsa")), "keytype: Input should be 'ed25519'"),
        (_mutate_spec(lambda t: _first(t).update(scheme="ecdsa-sha2-nistp256")), "scheme: Input should be"),
        (_mutate_spec(lambda t: _first(t).update(public="AB" * 32)), "trust.keys"),
        (
            _mutate_spec(lambda t: t["keys"].update({"00" * 32: t["keys"].popitem()[1]})),
            "the keyid is not the SHA-256 of the key",
        ),
        (_mutate_spec(lambda t: t.update(extra=1)), "trust.extra: unknown field"),
    ],
)
def test_rotation_trust_set_is_checked(
    world: World, build: Callable[[World], dict[str, Any]], fragment: str
) -> None:
    w = world
    error = rejected(w, bundle(build(w), w.a, w.b, w.n1, w.n2, w.n3))
    assert error.check == "schema" and fragment in str(error)


def test_rotation_replayed_is_a_rollback(world: World) -> None:
    w = world
    first = bundle(rotation(w), w.a, w.b, w.n1, w.n2)
    vb = verify(w, first)
    w.store.activate(vb)
    assert vb.new_trust is not None
    w.trust.replace(vb.new_trust)
    assert rejected(w, first).check == "rollback"
    # an older rotation back to the retired keys, signed by them and by the new ones, is a rollback too
    back = doc(version=6, trust=spec(w.a, w.b, threshold=2))
    assert rejected(w, bundle(back, w.a, w.b, w.n1, w.n2)).check == "rollback"


def test_crash_between_activation_and_trust_replace_still_loads(world: World) -> None:
    w = world
    w.store.activate(verify(w, bundle(rotation(w), w.a, w.b, w.n1, w.n2)))
    policy, reason = load_active(w.store, TrustStore.load(w.tmp / "trust.json"), SITE, NOW)
    assert reason == "ok" and policy is not None and policy.version == 8 and policy.trust is not None


# -- m-of-n for ordinary bundles ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "signers", "ok"),
    [
        (2, "ab", True),
        (2, "ac", True),
        (2, "bc", True),
        (2, "abc", True),
        (2, "a", False),
        (2, "aa", False),
        (3, "abc", True),
        (3, "ab", False),
        (1, "c", True),
    ],
)
def test_m_of_n_threshold(world: World, threshold: int, signers: str, ok: bool) -> None:
    w = world
    by = {"a": w.a, "b": w.b, "c": w.n1}
    trust = trust_of(w.tmp, w.a, w.b, w.n1, threshold=threshold)
    data = bundle(doc(version=8), *(by[s] for s in signers))
    if ok:
        assert verify(w, data, trust).keyids == sorted({by[s].keyid for s in signers})
    else:
        assert rejected(w, data, trust).check == "threshold"


# -- the TUF attack list --------------------------------------------------------------------------------


def _later(minutes: int) -> str:
    return (NOW + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def _mix_and_match(w: World) -> bytes:
    """Valid signatures of one payload under another payload: a rotation to keys the attacker holds."""
    envelope = json.loads(bundle(rotation(w), w.a, w.b, w.n1, w.n2))
    attacker = doc(version=8, trust=spec(w.n3, threshold=1))
    envelope["payload"] = base64.b64encode(payload(attacker)).decode()
    return json.dumps(envelope).encode()


def _substituted(w: World) -> bytes:
    body = payload(doc(version=8))
    foreign = ec.generate_private_key(ec.SECP256R1()).sign(
        dsse.pae(dsse.PAYLOAD_TYPE, body), ec.ECDSA(hashes.SHA256())
    )
    envelope = json.loads(bundle(body, w.b))
    envelope["signatures"].append({"keyid": w.a.keyid, "sig": base64.b64encode(foreign).decode()})
    return json.dumps(envelope).encode()


ATTACKS: list[tuple[str, Callable[[World], bytes], str]] = [
    ("rollback", lambda w: bundle(doc(version=6), w.a, w.b), "rollback"),
    ("rollback_same_version", lambda w: bundle(doc(), w.a, w.b), "rollback"),
    (
        "freeze",
        lambda w: bundle(doc(version=8, issued_at="2026-01-01T00:00:00Z", expires_at=_later(0)), w.a, w.b),
        "expired",
    ),
    (
        "freeze_rotation",
        lambda w: bundle(
            rotation(w, issued_at="2026-01-01T00:00:00Z", expires_at=_later(-1)), w.a, w.b, w.n1, w.n2
        ),
        "expired",
    ),
    ("mix_and_match", _mix_and_match, "signature"),
    ("threshold_not_met", lambda w: bundle(doc(version=8), w.a), "threshold"),
    ("rotation_without_old_threshold", lambda w: bundle(rotation(w), w.b, w.n1, w.n2, w.n3), "threshold"),
    ("rotation_by_new_keys_alone", lambda w: bundle(rotation(w), w.n1, w.n2, w.n3), "unknown_key"),
    ("rotation_without_new_threshold", lambda w: bundle(rotation(w), w.a, w.b, w.n3), "rotation"),
    ("duplicate_keyids", lambda w: bundle(doc(version=8), w.a, w.a, w.a), "threshold"),
    ("duplicate_new_keyids", lambda w: bundle(rotation(w), w.a, w.b, w.n2, w.n2), "rotation"),
    ("algorithm_substitution", _substituted, "signature"),
    ("oversize", lambda w: bundle(doc(version=8), w.a, w.b) + b" " * MAX_BUNDLE_BYTES, "size"),
    ("wrong_scope", lambda w: bundle(doc(version=8, scope={"sites": ["northside"]}), w.a, w.b), "scope"),
    (
        "wrong_scope_rotation",
        lambda w: bundle(rotation(w, scope={"sites": ["x"]}), w.a, w.b, w.n1, w.n2),
        "scope",
    ),
]


@pytest.mark.parametrize(("build", "check"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_tuf_attack_is_rejected(world: World, build: Callable[[World], bytes], check: str) -> None:
    w = world
    trust_file = (w.tmp / "trust.json").read_bytes()
    assert rejected(w, build(w)).check == check
    assert (w.tmp / "trust.json").read_bytes() == trust_file


# -- TrustStore.replace ---------------------------------------------------------------------------------


def test_replace_keeps_added_at_of_kept_keys_and_saves(world: World) -> None:
    w = world
    before = {k.keyid: k.added_at for k in w.trust.entries()}
    new = TrustSpec.model_validate(spec(w.b, w.n1, threshold=2))
    assert not w.trust.matches(new)
    w.trust.replace(new)
    assert w.trust.matches(new)
    again = TrustStore.load(w.tmp / "trust.json")
    assert set(again.keys) == {w.b.keyid, w.n1.keyid} and again.threshold == 2
    kept = again.key(w.b.keyid)
    assert kept is not None and kept.added_at == before[w.b.keyid]
    assert [p.name for p in w.tmp.glob(".trust-*")] == []


def test_replace_that_cannot_write_changes_nothing(world: World) -> None:
    w = world
    blocker = w.tmp / "blocker"
    blocker.write_text("a file where a folder should be")
    store = TrustStore.load(w.tmp / "trust.json")
    store.path = blocker / "trust.json"
    with pytest.raises(OperatorError, match="cannot write"):
        store.replace(TrustSpec.model_validate(spec(w.n1, threshold=1)))
    assert set(store.keys) == {w.a.keyid, w.b.keyid} and store.threshold == 2
