"""A record as the ledger stores it, and its link in the hash chain: the rule the writer and ``verify`` share.

A record's stored text is its audit line without ``seq``: its fields in ``FIELDS`` order (the cllama audit
line first, then ours), compact JSON, not ASCII-escaped (``encode_record``; ``canonical_json`` is the plain
encoder it must agree with). One encoding serves the chain, the Merkle leaf and the stdout line; verify
hashes the stored text, so the order need not be sorted. Each record is linked to the one before it::

    hash(n) = SHA-256(hash(n - 1) as 64 hex digits || "\\n" || stored text of record n as UTF-8)
    hash(0) = GENESIS

``chain_hash`` is that rule, in one place: ``store``'s writer and ``verify`` both call it, with the UTF-8
bytes they also hash into the record's Merkle leaf (so the text is encoded once per record).

Owns: ``FIELDS``, the record encoding, ``GENESIS``, ``chain_hash``, ``sha256_hex``.
Never: does I/O or knows of tables; decides which records may be written (``store`` validates them) or
whether a chain holds (``verify`` does); imports anything of the appliance.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring
from typing import Any, Final

GENESIS: Final = "0" * 64
"""The previous hash of record 1."""

FIELDS: Final = (
    # the cllama audit line
    "ts",
    "claw_id",
    "type",
    "model",
    "latency_ms",
    "status_code",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "intervention",
    # ours
    "request_id",
    "org",
    "role",
    "route",
    "decision",
    "policy_version",
    "request_sha256",
    "response_sha256",
    "data_class",
    "detail",
    "rule",
    "client_cert",
    "client_cert_sha256",
    "os_user",  # admin records: the OS user who acted (the CLI's, or the admin socket peer's)
)

canonical_json: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode
"""The record encoding for any dict: compact, not ASCII-escaped, no NaN."""

_KEYS: Final = tuple(f"{encode_basestring(name)}:" for name in FIELDS)
_sha256: Final = hashlib.sha256


def sha256_hex(data: bytes) -> str:
    return _sha256(data).hexdigest()


def chain_hash(prev_hash: str, record_json: str | bytes) -> str:
    """The link: SHA-256 over the previous hash (hex), a newline, and this record's stored JSON text.

    ``record_json``: the text, or its UTF-8 bytes when the caller has them already (for the leaf too).
    """
    data = record_json.encode() if isinstance(record_json, str) else record_json
    return _sha256(f"{prev_hash}\n".encode() + data).hexdigest()


def encode_record(ordered: dict[str, Any]) -> str:
    """``canonical_json(ordered)`` for a dict in FIELDS order, about 1.5 us faster per record (the append
    path runs on the event loop): None, str and int are written here, anything else by the encoder itself."""
    parts = []
    for key, value in zip(_KEYS, ordered.values(), strict=True):
        if value is None:
            parts.append(key + "null")
        elif value.__class__ is str:
            parts.append(key + encode_basestring(value))
        elif value.__class__ is int:  # not bool, a subclass: the encoder writes true/false
            parts.append(key + int.__repr__(value))
        else:
            parts.append(key + canonical_json(value))
    return "{" + ",".join(parts) + "}"
