"""Shared builders for the policy tests: a sample document, real Ed25519 keys, trust stores, bundles."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import signing_keys
from appliance.policy import dsse
from appliance.policy.schema import Policy
from appliance.policy.trust import TrustStore

SITE = "stmarys-main"
NOW = datetime(2026, 12, 1, tzinfo=UTC)
SHA = "ab" * 32

DOC: dict[str, Any] = {
    "version": 7,
    "issued_at": "2026-11-25T00:00:00Z",
    "expires_at": "2027-02-25T00:00:00Z",
    "scope": {"sites": [SITE, "stmarys-annex"]},
    "routes": {
        "local": {"kind": "local", "data_classes": ["phi", "deidentified", "public"]},
        "openai": {
            "kind": "openai",
            "base_url": "https://api.openai.com/v1",
            "auth": "bearer",
            "data_classes": ["deidentified", "public"],
        },
        "anthropic": {
            "kind": "anthropic",
            "base_url": "https://api.anthropic.com",
            "data_classes": ["phi", "deidentified", "public"],
        },
    },
    "models": {
        "local/demo": {"file": "demo.gguf", "sha256": SHA, "n_ctx": 2048},
        "local/tiny": {"file": "tiny.gguf", "sha256": SHA},
    },
    "organizations": {
        "stmarys": {
            "roles": {
                "radiology": {"models": ["local/*", "anthropic/claude-*"], "default_data_class": "phi"},
                "billing": {"models": ["local/demo"], "default_data_class": "phi"},
                "research": {"models": ["openai/gpt-4o", "openai/gpt-4o", "openai/o?-mini", "*/*"]},
            }
        },
        "northside": {"roles": {"er": {"models": ["anthropic/claude-3-5-sonnet", "openai/*"]}}},
    },
    "pricing": {
        "openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
        "anthropic/claude-3-5-haiku": {"input_per_mtok": 0.8, "output_per_mtok": 4},
    },
}


def doc(**changes: Any) -> dict[str, Any]:
    """A deep copy of ``DOC`` with top-level ``changes``; a value of ``None`` removes the field."""
    out = copy.deepcopy(DOC)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def payload(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def policy(**changes: Any) -> Policy:
    return Policy.model_validate_json(payload(doc(**changes)), strict=True)


def new_key(tmp_path: Path, name: str) -> signing_keys.SigningKey:
    signing_keys.generate(tmp_path / name)
    return signing_keys.load_signing_key(tmp_path / f"{name}.key")


def trust_of(tmp_path: Path, *signers: signing_keys.SigningKey, threshold: int = 1) -> TrustStore:
    store = TrustStore.load(tmp_path / "trust.json")
    for signer in signers:
        store.add(tmp_path / f"{_name_of(tmp_path, signer)}.pub")
    if signers:
        store.set_threshold(threshold)
    return store


def bundle(document: dict[str, Any] | bytes, *signers: signing_keys.SigningKey) -> bytes:
    body = document if isinstance(document, bytes) else payload(document)
    return dsse.sign(body, list(signers))


def _name_of(tmp_path: Path, signer: signing_keys.SigningKey) -> str:
    for pub in tmp_path.glob("*.pub"):
        if json.loads(pub.read_text())["keyid"] == signer.keyid:
            return pub.stem
    raise LookupError(signer.keyid)


def test_sample_document_is_a_valid_policy() -> None:
    p = policy()
    assert p.version == 7 and p.routes["anthropic"].auth == "x-api-key" and p.routes["local"].auth == "none"
    assert p.routes["openai"].timeout_s == 120.0 and p.models["local/tiny"].n_ctx == 2048
    assert p.expires_at.tzinfo is not None and p.expires_at.utcoffset() is not None
