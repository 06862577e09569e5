"""The DSSE envelope of a policy bundle: parsing, the pre-authentication encoding, signing, key ids.

Owns: the envelope's wire form (``payloadType``, base64 ``payload``, ``signatures[{keyid, sig}]``), the
PAE bytes every signature covers, and ``keyid_of`` (hex SHA-256 of the raw 32-byte Ed25519 public key).

Must never: decide whether a signature is trusted or valid (``importer`` and ``trust`` do), or look
inside the payload: until the signatures are checked the payload is opaque bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.errors import BundleRejected
from appliance.policy.schema import no_duplicate_keys

if TYPE_CHECKING:
    from appliance.signing_keys import SigningKey

PAYLOAD_TYPE = "application/vnd.phi-gateway.policy+json"
MAX_SIGNATURES = 32
"""Bounds the verification work one bundle can demand."""

_STD_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_URL_B64 = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_ENVELOPE_FIELDS = frozenset({"payloadType", "payload", "signatures"})
_SIGNATURE_FIELDS = frozenset({"keyid", "sig"})


@dataclass(frozen=True, slots=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: list[Signature]

    def pae(self) -> bytes:
        return pae(self.payload_type, self.payload)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what each signature signs (binds the type to the payload)."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def parse_envelope(data: bytes) -> Envelope:
    """Strictly parse envelope JSON; any deviation raises ``BundleRejected("format", ...)``."""
    try:
        doc = json.loads(data, object_pairs_hook=no_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        raise BundleRejected("format", f"the bundle is not a JSON document: {exc}") from exc
    if not isinstance(doc, dict):
        raise BundleRejected("format", "the bundle must be a JSON object (a DSSE envelope)")
    missing = sorted(_ENVELOPE_FIELDS - doc.keys())
    extra = sorted(doc.keys() - _ENVELOPE_FIELDS)
    if missing or extra:
        problems = [
            f"missing {', '.join(missing)}" if missing else "",
            f"unknown {', '.join(extra)}" if extra else "",
        ]
        raise BundleRejected("format", "the DSSE envelope has " + " and ".join(p for p in problems if p))
    payload_type = doc["payloadType"]
    if not isinstance(payload_type, str):
        raise BundleRejected("format", "payloadType must be a string")
    payload = _b64decode(doc["payload"], "payload")
    raw_sigs = doc["signatures"]
    if not isinstance(raw_sigs, list) or not raw_sigs:
        raise BundleRejected("format", "signatures must be a non-empty list")
    if len(raw_sigs) > MAX_SIGNATURES:
        raise BundleRejected(
            "format", f"the envelope carries {len(raw_sigs)} signatures (at most {MAX_SIGNATURES})"
        )
    signatures = []
    for i, entry in enumerate(raw_sigs):
        if not isinstance(entry, dict) or entry.keys() != _SIGNATURE_FIELDS:
            raise BundleRejected("format", f"signatures[{i}] must be an object with exactly keyid and sig")
        keyid = entry["keyid"]
        if not isinstance(keyid, str) or not keyid:
            raise BundleRejected("format", f"signatures[{i}].keyid must be a non-empty string")
        signatures.append(Signature(keyid, _b64decode(entry["sig"], f"signatures[{i}].sig")))
    return Envelope(payload_type, payload, signatures)


def sign(payload: bytes, signers: list[SigningKey], payload_type: str = PAYLOAD_TYPE) -> bytes:
    """Wrap ``payload`` in an envelope signed by each signer; returns the envelope JSON (pretty, LF-ended)."""
    message = pae(payload_type, payload)
    doc = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": s.keyid, "sig": base64.b64encode(s.private.sign(message)).decode()} for s in signers
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def _b64decode(value: object, what: str) -> bytes:
    # DSSE admits standard or URL-safe base64, padded or not; anything else (whitespace, mixed alphabets)
    # is refused rather than silently skipped as the lenient decoders would.
    if isinstance(value, str):
        altchars = b"+/" if _STD_B64.match(value) else b"-_" if _URL_B64.match(value) else None
        if altchars is not None:
            body = value.rstrip("=")
            try:
                return base64.b64decode(body + "=" * (-len(body) % 4), altchars=altchars, validate=True)
            except binascii.Error:
                pass
    raise BundleRejected("format", f"{what} is not valid base64")
