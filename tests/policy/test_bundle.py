"""Key files, the DSSE envelope, the trust store, and every import check with a real vault behind it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance import signing_keys
from appliance.errors import BundleRejected, OperatorError
from appliance.policy import dsse
from appliance.policy.importer import MAX_BUNDLE_BYTES, verify_bundle
from appliance.policy.store import MIGRATIONS, PolicyStore
from appliance.policy.trust import TrustStore
from appliance.vault.db import Database
from tests.policy.test_fixtures import NOW, SITE, bundle, doc, new_key, payload, trust_of

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


# -- key files ----------------------------------------------------------------------------------------------


@posix_only
def test_generate_writes_a_0600_private_key_and_a_public_json(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # a permissive umask must not widen the private key's mode
    try:
        keyid = signing_keys.generate(tmp_path / "signer")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "signer.key").stat().st_mode) == 0o600
    assert (tmp_path / "signer.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub = json.loads((tmp_path / "signer.pub").read_text())
    assert pub["keytype"] == pub["scheme"] == "ed25519" and pub["keyid"] == keyid
    assert hashlib.sha256(bytes.fromhex(pub["public"])).hexdigest() == keyid


@pytest.mark.parametrize("existing", ["signer.key", "signer.pub"])
def test_generate_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(OperatorError, match="already exists"):
        signing_keys.generate(tmp_path / "signer")
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_key_files_round_trip_with_a_stable_keyid(tmp_path: Path) -> None:
    keyid = signing_keys.generate(tmp_path / "signer")
    signer = signing_keys.load_signing_key(tmp_path / "signer.key")
    assert signer.keyid == keyid == signing_keys.load_signing_key(tmp_path / "signer.key").keyid
    pub_keyid, public = signing_keys.load_public_key(tmp_path / "signer.pub")
    assert pub_keyid == keyid and signing_keys.keyid_of(public) == keyid
    public.verify(signer.private.sign(b"x"), b"x")
    (tmp_path / "signer.pem").write_bytes(
        public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    assert signing_keys.load_public_key(tmp_path / "signer.pem")[0] == keyid


def test_public_key_files_are_checked(tmp_path: Path) -> None:
    signing_keys.generate(tmp_path / "signer")
    pub = json.loads((tmp_path / "signer.pub").read_text())
    (tmp_path / "lying.pub").write_text(json.dumps({**pub, "keyid": "00" * 32}))
    with pytest.raises(OperatorError, match="keyid does not match"):
        signing_keys.load_public_key(tmp_path / "lying.pub")
    (tmp_path / "rsa.pub").write_text(json.dumps({**pub, "scheme": "rsassa-pss-sha256"}))
    with pytest.raises(OperatorError, match="only keytype/scheme 'ed25519'"):
        signing_keys.load_public_key(tmp_path / "rsa.pub")
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pem").write_bytes(ec_pem)
    with pytest.raises(OperatorError, match="not an Ed25519"):
        signing_keys.load_public_key(tmp_path / "ec.pem")
    with pytest.raises(OperatorError, match="cannot read"):
        signing_keys.load_public_key(tmp_path / "missing.pub")


# -- envelope -----------------------------------------------------------------------------------------------


def test_pae_matches_the_dsse_specification() -> None:
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert dsse.pae("", b"") == b"DSSEv1 0  0 "


def test_sign_and_parse_round_trip(tmp_path: Path) -> None:
    signer = new_key(tmp_path, "a")
    env = dsse.parse_envelope(dsse.sign(b'{"x": 1}', [signer]))
    assert env.payload_type == dsse.PAYLOAD_TYPE and env.payload == b'{"x": 1}'
    assert [s.keyid for s in env.signatures] == [signer.keyid]
    signer.public.verify(env.signatures[0].sig, env.pae())


def _envelope(**fields: Any) -> bytes:
    base: dict[str, Any] = {"payloadType": dsse.PAYLOAD_TYPE, "payload": "e30=", "signatures": []}
    base["signatures"] = [{"keyid": "k", "sig": "AAAA"}]
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "not a JSON document"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "not a JSON document"),
        (_envelope(payload=None), "missing payload"),
        (_envelope(extra=1), "unknown extra"),
        (_envelope(payloadType=5), "payloadType must be a string"),
        (_envelope(payload="e30=!"), "payload is not valid base64"),
        (_envelope(payload="e3 0="), "payload is not valid base64"),
        (_envelope(signatures=[]), "non-empty list"),
        (_envelope(signatures={"k": "AAAA"}), "non-empty list"),
        (_envelope(signatures=[{"keyid": "k"}]), "exactly keyid and sig"),
        (_envelope(signatures=[{"keyid": "k", "sig": "AAAA", "x": 1}]), "exactly keyid and sig"),
        (_envelope(signatures=[{"keyid": 3, "sig": "AAAA"}]), "keyid must be a non-empty string"),
        (_envelope(signatures=[{"keyid": "k", "sig": "*"}]), r"signatures\[0\].sig is not valid base64"),
        (_envelope(signatures=[{"keyid": "k", "sig": "AAAA"}] * 33), "at most 32"),
        (b'{"payloadType": "a", "payloadType": "b", "payload": "", "signatures": []}', "duplicate key"),
    ],
)
def test_malformed_envelopes_are_format_errors(data: bytes, fragment: str) -> None:
    with pytest.raises(BundleRejected, match=fragment) as info:
        dsse.parse_envelope(data)
    assert info.value.check == "format"


def test_url_safe_and_unpadded_base64_are_accepted() -> None:
    raw = bytes([0xFB, 0xFF, 0xFE])
    for text in (base64.urlsafe_b64encode(raw).decode(), base64.b64encode(raw).decode().rstrip("=")):
        env = dsse.parse_envelope(_envelope(payload=text))
        assert env.payload == raw


# -- trust store --------------------------------------------------------------------------------------------


def test_missing_trust_file_means_no_keys(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path / "trust.json")
    assert dict(store.keys) == {} and store.threshold == 1


@posix_only
def test_trust_store_round_trips_and_saves_atomically_0644(tmp_path: Path) -> None:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    store = TrustStore.load(tmp_path / "trust.json")
    assert store.add(tmp_path / "a.pub") == a.keyid
    assert store.add(tmp_path / "a.pub") == a.keyid  # idempotent
    store.add(tmp_path / "b.pub")
    store.set_threshold(2)
    store.save()
    assert stat.S_IMODE((tmp_path / "trust.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.glob(".trust-*")] == []
    again = TrustStore.load(tmp_path / "trust.json")
    assert again.threshold == 2 and set(again.keys) == {a.keyid, b.keyid}
    doc_ = json.loads((tmp_path / "trust.json").read_text())
    assert doc_["version"] == 1 and doc_["keys"][a.keyid]["scheme"] == "ed25519"
    assert doc_["keys"][a.keyid]["added_at"].endswith("Z")


def test_threshold_and_removal_are_bounded(tmp_path: Path) -> None:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    store = trust_of(tmp_path, a, b, threshold=2)
    for bad in (0, 3):
        with pytest.raises(OperatorError, match="between 1 and"):
            store.set_threshold(bad)
    with pytest.raises(OperatorError, match="lower the threshold first"):
        store.remove(a.keyid)
    store.set_threshold(1)
    store.remove(a.keyid)
    with pytest.raises(OperatorError, match="not trusted"):
        store.remove(a.keyid)
    store.remove(b.keyid)
    assert dict(store.keys) == {} and store.threshold == 1


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d, k: d["keys"][k].update(scheme="ecdsa-sha2-nistp256"), "only keytype/scheme"),
        (lambda d, k: d["keys"].update({"00" * 32: d["keys"].pop(k)}), "not the SHA-256"),
        (lambda d, k: d.update(threshold=0), "threshold must be"),
        (lambda d, k: d.update(version=2), "version 1"),
        (lambda d, k: d["keys"][k].update(public="zz"), "64 hex"),
    ],
)
def test_a_tampered_trust_file_is_refused(
    tmp_path: Path, mutate: Callable[[dict[str, Any], str], None], fragment: str
) -> None:
    a = new_key(tmp_path, "a")
    trust_of(tmp_path, a).save()
    document = json.loads((tmp_path / "trust.json").read_text())
    mutate(document, a.keyid)
    (tmp_path / "trust.json").write_text(json.dumps(document))
    with pytest.raises(OperatorError, match=fragment):
        TrustStore.load(tmp_path / "trust.json")


# -- import checks, each against a vault holding v7 ---------------------------------------------------------


@dataclass
class World:
    tmp: Path
    a: signing_keys.SigningKey
    b: signing_keys.SigningKey
    stranger: signing_keys.SigningKey
    trust: TrustStore
    store: PolicyStore


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    a, b, stranger = new_key(tmp_path, "a"), new_key(tmp_path, "b"), new_key(tmp_path, "stranger")
    trust = trust_of(tmp_path, a, b)
    with Database(tmp_path / "vault.db", MIGRATIONS) as db:
        store = PolicyStore(db)
        store.activate(verify_bundle(bundle(doc(), a), trust, site=SITE, current_version=None, now=NOW))
        yield World(tmp_path, a, b, stranger, trust, store)


def _v8(**changes: Any) -> dict[str, Any]:
    return doc(**{"version": 8, **changes})


def _resign(data: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    envelope = json.loads(data)
    mutate(envelope)
    return json.dumps(envelope).encode()


def _foreign_sig(private: Any, message: bytes) -> bytes:
    if isinstance(private, rsa.RSAPrivateKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
        sig: bytes = private.sign(message, pss, hashes.SHA256())
        return sig
    sig = private.sign(message, ec.ECDSA(hashes.SHA256()))
    return sig


def _substituted(w: World, private: Any) -> bytes:
    body = payload(_v8())
    sig = _foreign_sig(private, dsse.pae(dsse.PAYLOAD_TYPE, body))
    return json.dumps(
        {
            "payloadType": dsse.PAYLOAD_TYPE,
            "payload": base64.b64encode(body).decode(),
            "signatures": [{"keyid": w.a.keyid, "sig": base64.b64encode(sig).decode()}],
        }
    ).encode()


def _mix_and_match(w: World) -> bytes:
    signed_old = json.loads(bundle(_v8(), w.a))
    altered = _v8(organizations={"stmarys": {"roles": {"all": {"models": ["*/*"]}}}})
    signed_old["payload"] = base64.b64encode(payload(altered)).decode()
    return json.dumps(signed_old).encode()


def _flip_sig(data: bytes) -> bytes:
    def flip(env: dict[str, Any]) -> None:
        sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
        sig[10] ^= 0x01
        env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()

    return _resign(data, flip)


def _later(minutes: int) -> str:
    return (NOW + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def _route_typo(d: dict[str, Any]) -> dict[str, Any]:
    d["routes"]["openai"]["base_ur"] = d["routes"]["openai"].pop("base_url")
    return d


def _naive(d: dict[str, Any]) -> dict[str, Any]:
    d["issued_at"] = "2026-11-25T00:00:00"
    return d


def _swap_sigs(env: dict[str, Any]) -> None:
    # Keep both keyids but put key b's signature in key a's slot signature: one valid, one not.
    env["signatures"][0]["sig"] = env["signatures"][1]["sig"]


# (case id, check, build(world) -> (bundle bytes, trust), message fragment)
Case = tuple[str, str, Callable[[World], tuple[bytes, TrustStore]], str]
CASES: list[Case] = [
    (
        "oversize",
        "size",
        lambda w: (bundle(_v8(), w.a) + b" " * MAX_BUNDLE_BYTES, w.trust),
        "limit is 1048576",
    ),
    ("not json", "format", lambda w: (b"\x00garbage", w.trust), "not a JSON document"),
    (
        "wrong payloadType",
        "format",
        lambda w: (dsse.sign(payload(_v8()), [w.a], "application/vnd.in-toto+json"), w.trust),
        "payloadType is 'application/vnd.in-toto+json'",
    ),
    (
        "no trusted keys",
        "untrusted",
        lambda w: (bundle(_v8(), w.a), TrustStore.load(w.tmp / "empty.json")),
        "no policy signing keys are trusted",
    ),
    (
        "unknown key",
        "unknown_key",
        lambda w: (bundle(_v8(), w.stranger), w.trust),
        "signed only by keys this appliance does not trust",
    ),
    ("bad signature", "signature", lambda w: (_flip_sig(bundle(_v8(), w.a)), w.trust), "does not verify"),
    ("mix and match", "signature", lambda w: (_mix_and_match(w), w.trust), "the payload was altered"),
    (
        "one bad among good",
        "signature",
        lambda w: (_resign(bundle(_v8(), w.a, w.b), _swap_sigs), w.trust),
        "does not verify",
    ),
    (
        "substituted ecdsa",
        "signature",
        lambda w: (_substituted(w, ec.generate_private_key(ec.SECP256R1())), w.trust),
        "does not verify",
    ),
    (
        "substituted rsa",
        "signature",
        lambda w: (_substituted(w, rsa.generate_private_key(public_exponent=65537, key_size=2048)), w.trust),
        "does not verify",
    ),
    (
        "threshold 2, one signature",
        "threshold",
        lambda w: (bundle(_v8(), w.a, w.stranger), trust_of(w.tmp, w.a, w.b, threshold=2)),
        "from 1 trusted key(s); this appliance requires 2",
    ),
    (
        "threshold 2, one key twice",
        "threshold",
        lambda w: (bundle(_v8(), w.a, w.a), trust_of(w.tmp, w.a, w.b, threshold=2)),
        "from 1 trusted key(s)",
    ),
    (
        "unverified garbage is never parsed",
        "signature",
        lambda w: (_flip_sig(bundle(b"{not json", w.a)), w.trust),
        "does not verify",
    ),
    ("payload not json", "schema", lambda w: (bundle(b"{not json", w.a), w.trust), "not valid JSON"),
    ("payload NaN", "schema", lambda w: (bundle(b'{"version": NaN}', w.a), w.trust), "not valid JSON"),
    (
        "payload duplicate key",
        "schema",
        lambda w: (bundle(payload(_v8())[:-1] + b', "version": 99}', w.a), w.trust),
        "duplicate key 'version'",
    ),
    ("unknown field", "schema", lambda w: (bundle(_v8(verison=9), w.a), w.trust), "verison: unknown field"),
    (
        "unknown nested field",
        "schema",
        lambda w: (bundle(_route_typo(_v8()), w.a), w.trust),
        "routes.openai.base_ur: unknown field",
    ),
    ("bad type", "schema", lambda w: (bundle(_v8(version="9"), w.a), w.trust), "version: Input should be"),
    (
        "missing field",
        "schema",
        lambda w: (bundle(_v8(expires_at=None), w.a), w.trust),
        "expires_at: a required field is missing",
    ),
    (
        "naive time",
        "schema",
        lambda w: (bundle(_naive(_v8()), w.a), w.trust),
        "issued_at: Input should have timezone",
    ),
    (
        "undefined route in role",
        "schema",
        lambda w: (
            bundle(_v8(organizations={"o": {"roles": {"r": {"models": ["mistral/large"]}}}}), w.a),
            w.trust,
        ),
        "organizations.o.roles.r.models[0]: 'mistral/large' names undefined route 'mistral'",
    ),
    (
        "local model on a cloud route",
        "schema",
        lambda w: (
            bundle(_v8(models={"openai/demo": {"file": "demo.gguf", "sha256": "ab" * 32}}), w.a),
            w.trust,
        ),
        "must name a route of kind local",
    ),
    (
        "literal local model not listed",
        "schema",
        lambda w: (
            bundle(_v8(organizations={"o": {"roles": {"r": {"models": ["local/ghost"]}}}}), w.a),
            w.trust,
        ),
        "names a local model not listed in models",
    ),
    (
        "price for undefined route",
        "schema",
        lambda w: (
            bundle(_v8(pricing={"mistral/large": {"input_per_mtok": 1, "output_per_mtok": 1}}), w.a),
            w.trust,
        ),
        "pricing: 'mistral/large' names undefined route 'mistral'",
    ),
    (
        "model file with a path",
        "schema",
        lambda w: (
            bundle(_v8(models={"local/demo": {"file": "../etc/passwd", "sha256": "ab" * 32}}), w.a),
            w.trust,
        ),
        "models.local/demo.file",
    ),
    (
        "cloud route without url",
        "schema",
        lambda w: (bundle(_v8(routes={"openai": {"kind": "openai"}}), w.a), w.trust),
        "needs a base_url",
    ),
    (
        "expiry before issue",
        "schema",
        lambda w: (bundle(_v8(expires_at="2026-11-24T00:00:00Z"), w.a), w.trust),
        "expires_at must be later than issued_at",
    ),
    (
        "expired",
        "expired",
        lambda w: (bundle(_v8(issued_at="2026-01-01T00:00:00Z", expires_at=_later(0)), w.a), w.trust),
        "policy v8 expired at 2026-12-01T00:00:00Z",
    ),
    (
        "not yet valid",
        "not_yet_valid",
        lambda w: (bundle(_v8(issued_at=_later(6)), w.a), w.trust),
        "check this appliance's clock",
    ),
    (
        "wrong scope",
        "scope",
        lambda w: (bundle(_v8(scope={"sites": ["northside"]}), w.a), w.trust),
        "for site(s) northside, not this site 'stmarys-main'",
    ),
    ("rollback equal", "rollback", lambda w: (bundle(doc(), w.a), w.trust), "v7 is the same as v7 in force"),
    ("rollback lower", "rollback", lambda w: (bundle(doc(version=6), w.a), w.trust), "v6 is older than v7"),
]


@pytest.mark.parametrize(("check", "build", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_bundles_change_nothing(
    world: World, check: str, build: Callable[[World], tuple[bytes, TrustStore]], fragment: str
) -> None:
    before, history = world.store.current(), world.store.history()
    data, trust = build(world)
    with pytest.raises(BundleRejected) as info:
        vb = verify_bundle(data, trust, site=SITE, current_version=world.store.current_version(), now=NOW)
        world.store.activate(vb)
    assert info.value.check == check
    assert fragment in str(info.value)
    assert world.store.current() == before and world.store.history() == history


def test_good_bundle_activates(world: World) -> None:
    data = bundle(_v8(), world.b, world.stranger)  # an unknown extra signature is ignored, not fatal
    vb = verify_bundle(data, world.trust, site="stmarys-annex", current_version=7, now=NOW)
    assert vb.policy.version == 8 and vb.keyids == [world.b.keyid]
    assert vb.sha256 == hashlib.sha256(data).hexdigest() and vb.envelope == data
    world.store.activate(vb)
    current = world.store.current()
    assert current is not None and current.version == 8 and current.envelope == data
    assert [h["version"] for h in world.store.history()] == [8, 7]


def test_threshold_two_is_met_by_two_distinct_keys(world: World) -> None:
    trust = trust_of(world.tmp, world.a, world.b, threshold=2)
    vb = verify_bundle(bundle(_v8(), world.a, world.b, world.a), trust, site=SITE, current_version=7, now=NOW)
    assert vb.keyids == sorted([world.a.keyid, world.b.keyid])


def test_clock_skew_tolerates_an_issue_time_minutes_ahead(world: World) -> None:
    vb = verify_bundle(
        bundle(_v8(issued_at=_later(4)), world.a), world.trust, site=SITE, current_version=7, now=NOW
    )
    assert vb.policy.version == 8


def test_schema_errors_are_listed_concisely(world: World) -> None:
    bad = _v8(
        version=0, routes={"local": {"kind": "lokal"}}, organizations={"o": {"roles": {"r": {"models": "x"}}}}
    )
    with pytest.raises(BundleRejected) as info:
        verify_bundle(bundle(bad, world.a), world.trust, site=SITE, current_version=7, now=NOW)
    text = str(info.value)
    assert info.value.check == "schema"
    assert "version: Input should be greater than or equal to 1" in text
    assert "routes.local.kind: Input should be 'local', 'openai' or 'anthropic'" in text
    assert "organizations.o.roles.r.models: Input should be a valid" in text
    assert "https://" not in text and len(text) < 1000  # no pydantic URLs, no echo of the whole document


def test_oversize_is_refused_before_parsing(world: World) -> None:
    with pytest.raises(BundleRejected) as info:
        verify_bundle(b"{" * (MAX_BUNDLE_BYTES + 1), world.trust, site=SITE, current_version=7, now=NOW)
    assert info.value.check == "size"


def test_naive_now_is_a_programming_error(world: World) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        naive = NOW.replace(tzinfo=None)
        verify_bundle(bundle(_v8(), world.a), world.trust, site=SITE, current_version=7, now=naive)


def test_a_fresh_ed25519_key_with_a_trusted_keyid_is_refused(world: World) -> None:
    impostor = signing_keys.SigningKey(world.a.keyid, Ed25519PrivateKey.generate())
    with pytest.raises(BundleRejected) as info:
        verify_bundle(bundle(_v8(), impostor), world.trust, site=SITE, current_version=7, now=NOW)
    assert info.value.check == "signature"
