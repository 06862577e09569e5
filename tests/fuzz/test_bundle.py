"""Fuzzing the policy bundle verifier: ``dsse.parse_envelope``, ``importer.verify_bundle`` (signatures, the
schema, rotation), and ``TrustStore.load``.

Properties: arbitrary bytes and mutated signed bundles are refused with ``BundleRejected`` (never another
exception); whatever is accepted is genuine (the payload a trusted key signed, byte for byte); random
payloads under a valid signature are refused with ``BundleRejected("schema"...)`` or parse into a policy;
a trust file of any content loads or raises ``OperatorError``.

The keys are derived from fixed seeds and Ed25519 signs deterministically, so every example is the same on
every run.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.errors import BundleRejected, OperatorError
from appliance.policy import dsse
from appliance.policy.importer import verify_bundle
from appliance.policy.trust import TrustedKey, TrustStore
from appliance.signing_keys import SigningKey, keyid_of
from tests.fuzz._profile import examples
from tests.fuzz.strategies import json_values, mutate_bytes
from tests.policy.test_fixtures import DOC, NOW, SITE

pytestmark = pytest.mark.fuzz


def _key(seed: str) -> SigningKey:
    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())
    return SigningKey(keyid_of(private.public_key()), private)


TRUSTED = _key("fuzz-trusted")
OTHER = _key("fuzz-untrusted")
NEW = _key("fuzz-rotation")
TRUST = TrustStore(
    Path("/nonexistent/trust.json"),
    {TRUSTED.keyid: TrustedKey(TRUSTED.keyid, "ed25519", TRUSTED.public, "")},
    threshold=1,
)
PAYLOAD = json.dumps(DOC).encode()
VALID = dsse.sign(PAYLOAD, [TRUSTED])


def _raw_public(key: SigningKey) -> str:
    return key.public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _verify(data: bytes) -> Any:
    return verify_bundle(data, TRUST, site=SITE, current_version=None, now=NOW)


def test_the_unmutated_bundle_is_accepted() -> None:
    assert _verify(VALID).payload == PAYLOAD


@examples(200)
@given(data=st.one_of(st.binary(max_size=4096), st.text(max_size=2048).map(str.encode)))
@example(data=b"[" * 100_000)
@example(data=b'{"payloadType": "x", "payload": "", "signatures": [{"keyid": "k", "sig": "=="}]}')
def test_arbitrary_bytes_are_refused_with_bundle_rejected(data: bytes) -> None:
    with pytest.raises(BundleRejected):
        _verify(data)


@examples(200)
@given(mutated=mutate_bytes(VALID))
def test_byte_mutations_are_refused_or_genuine(mutated: bytes) -> None:
    try:
        accepted = _verify(mutated)
    except BundleRejected:
        return
    # A change that kept the bundle valid (JSON whitespace, say) must still carry exactly what was signed.
    assert accepted.payload == PAYLOAD and accepted.keyids == [TRUSTED.keyid]


def _b64_variants(raw: bytes) -> st.SearchStrategy[str]:
    std = base64.b64encode(raw).decode()
    return st.sampled_from(
        [std, std.rstrip("="), base64.urlsafe_b64encode(raw).decode(), std + "=", " " + std, std + "\n"]
    )


@st.composite
def envelope_mutations(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(an envelope changed at the JSON level, whether the change keeps what the trusted key signed)."""
    doc = json.loads(VALID)
    kind = draw(
        st.sampled_from(
            [
                "payload_b64",
                "payload_bytes",
                "sig_bytes",
                "sig_b64",
                "keyid",
                "payload_type",
                "extra_field",
                "drop_field",
                "duplicate_sig",
                "add_other_sig",
                "replace_value",
            ]
        )
    )
    genuine = False
    if kind == "payload_b64":
        doc["payload"] = draw(_b64_variants(PAYLOAD))
        genuine = doc["payload"].strip() == doc["payload"] and not doc["payload"].endswith("==")
    elif kind == "payload_bytes":
        doc["payload"] = base64.b64encode(draw(mutate_bytes(PAYLOAD))).decode()
    elif kind == "sig_bytes":
        sig = base64.b64decode(doc["signatures"][0]["sig"])
        doc["signatures"][0]["sig"] = base64.b64encode(draw(mutate_bytes(sig))).decode()
    elif kind == "sig_b64":
        sig = base64.b64decode(doc["signatures"][0]["sig"])
        doc["signatures"][0]["sig"] = draw(_b64_variants(sig))
    elif kind == "keyid":
        doc["signatures"][0]["keyid"] = draw(
            st.one_of(st.sampled_from([OTHER.keyid, NEW.keyid, TRUSTED.keyid.upper(), ""]), st.text())
        )
    elif kind == "payload_type":
        doc["payloadType"] = draw(st.one_of(st.text(), json_values()))
    elif kind == "extra_field":
        doc[draw(st.text())] = draw(json_values())
    elif kind == "drop_field":
        del doc[draw(st.sampled_from(sorted(doc)))]
    elif kind == "duplicate_sig":
        doc["signatures"] = doc["signatures"] * draw(st.integers(2, 40))
        genuine = len(doc["signatures"]) <= dsse.MAX_SIGNATURES
    elif kind == "add_other_sig":
        signer = draw(st.sampled_from([OTHER, NEW]))
        extra = json.loads(dsse.sign(PAYLOAD, [signer]))["signatures"][0]
        doc["signatures"].insert(draw(st.integers(0, 1)), extra)
        genuine = True  # signatures by keys this appliance does not trust are not counted
    else:
        path = draw(st.sampled_from([("payloadType",), ("payload",), ("signatures",), ("signatures", 0)]))
        target: Any = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = draw(json_values())
    return json.dumps(doc).encode(), genuine


@examples(200)
@given(case=envelope_mutations())
def test_envelope_mutations_are_refused_or_genuine(case: tuple[bytes, bool]) -> None:
    data, genuine = case
    try:
        accepted = _verify(data)
    except BundleRejected:
        if genuine:
            raise
        return
    assert accepted.payload == PAYLOAD and accepted.keyids == [TRUSTED.keyid]


@st.composite
def policy_payloads(draw: st.DrawFn) -> bytes:
    """Payloads near a valid policy: a field replaced, removed or added, a rotation, or any JSON."""
    doc = copy.deepcopy(DOC)
    kind = draw(st.sampled_from(["any_json", "replace", "remove", "add", "trust", "bytes"]))
    if kind == "any_json":
        return json.dumps(draw(json_values())).encode()
    if kind == "bytes":
        return draw(mutate_bytes(PAYLOAD))
    if kind == "trust":
        keys: dict[str, Any] = {}
        for signer in draw(st.lists(st.sampled_from([TRUSTED, NEW, OTHER]), max_size=3, unique_by=id)):
            entry: dict[str, Any] = {"keytype": "ed25519", "scheme": "ed25519", "public": _raw_public(signer)}
            if draw(st.booleans()):
                entry[draw(st.sampled_from(["keytype", "scheme", "public"]))] = draw(json_values())
            keys[draw(st.sampled_from([signer.keyid, hashlib.sha256(b"x").hexdigest()]))] = entry
        doc["trust"] = {"threshold": draw(st.one_of(st.integers(-1, 4), json_values())), "keys": keys}
        return json.dumps(doc).encode()
    # Walk to a random object inside the document and change one of its members.
    target: Any = doc
    while isinstance(target, dict) and target and draw(st.booleans()):
        child = target[draw(st.sampled_from(sorted(target)))]
        if not isinstance(child, dict) or not child:
            break
        target = child
    if kind == "replace" and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(json_values())
    elif kind == "remove" and target:
        del target[draw(st.sampled_from(sorted(target)))]
    else:
        target[draw(st.text(max_size=12))] = draw(json_values())
    return json.dumps(doc).encode()


@examples(200)
@given(payload=policy_payloads(), rotate=st.booleans())
@example(payload=b'{"version": NaN}', rotate=False)
@example(payload=b"[" * 50_000, rotate=False)
def test_signed_random_payloads_are_refused_or_parse(payload: bytes, rotate: bool) -> None:
    """Under genuine signatures (the current key, and the new one for a rotation), only the schema, the
    rotation and the freshness checks stand between a payload and activation: they refuse with
    ``BundleRejected``, never another exception."""
    bundle = dsse.sign(payload, [TRUSTED, NEW] if rotate else [TRUSTED])
    try:
        accepted = _verify(bundle)
    except BundleRejected as exc:
        assert exc.check in {"schema", "rotation", "expired", "not_yet_valid", "scope"}, exc
        return
    assert accepted.payload == payload and accepted.policy.version >= 1


@examples(150)
@given(
    content=st.one_of(
        st.binary(max_size=2048),
        json_values().map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda threshold, keys: json.dumps({"version": 1, "threshold": threshold, "keys": keys}).encode(),
            st.one_of(st.integers(-1, 3), json_values()),
            st.dictionaries(
                st.sampled_from([TRUSTED.keyid, NEW.keyid, "", "ab"]),
                st.one_of(
                    json_values(),
                    st.fixed_dictionaries(
                        {
                            "keytype": st.sampled_from(["ed25519", "rsa"]),
                            "scheme": st.sampled_from(["ed25519", "ecdsa"]),
                            "public": st.sampled_from([_raw_public(TRUSTED), _raw_public(NEW), "00" * 32]),
                        },
                        optional={"added_at": json_values()},
                    ),
                ),
                max_size=3,
            ),
        ),
    )
)
@example(content=b"[" * 100_000)
def test_trust_files_load_or_raise_operator_error(content: bytes, tmp_path_factory: Any) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-trust.json"
    path.write_bytes(content)
    try:
        store = TrustStore.load(path)
    except OperatorError:
        return
    for key in store.entries():
        assert keyid_of(key.public) == key.keyid


@pytest.mark.parametrize("kind", [["openai"], {"k": 1}])
def test_a_route_kind_of_any_json_type_is_a_schema_error(kind: Any) -> None:
    doc = copy.deepcopy(DOC)
    doc["routes"]["openai"]["kind"] = kind
    del doc["routes"]["openai"]["auth"]
    with pytest.raises(BundleRejected, match="schema"):
        _verify(dsse.sign(json.dumps(doc).encode(), [TRUSTED]))
