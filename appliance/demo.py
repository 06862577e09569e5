"""The embedded demo: a gateway home that serves on defaults with no operator steps.

Owns: the demo policy (site ``demo-site``, organization ``demo``, roles ``clinician`` and ``billing``, the
tiny generated model ``local/demo`` pinned by its SHA-256), the demo authoring key kept inside the demo
home, re-signing the policy when it nears expiry or stops pinning the model file, and the demo caller's
token (kept in ``demo-token.txt``, 0600, so a second start prints the same token).
Never: runs against a real home. A real site authors its policy elsewhere and imports it from removable
media; the demo key exists only so that one command can start a working gateway.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance import signing_keys
from appliance.errors import OperatorError
from appliance.home import Home
from appliance.os_user import this_os_user
from appliance.policy import dsse, importer
from appliance.timestamps import rfc3339
from local_models.registry import hash_file
from local_models.tiny import write_tiny_model

DEMO_SITE = "demo-site"
DEMO_CALLER = ("demo-app", "demo", "clinician")
DEMO_MODEL_FILE = "demo.gguf"
_LIFETIME = timedelta(days=90)
_RENEW_BEFORE = timedelta(days=7)


def demo_policy(version: int, now: datetime, model_sha256: str) -> dict[str, Any]:
    return {
        "version": version,
        "issued_at": rfc3339(now - timedelta(minutes=1), seconds=True),
        "expires_at": rfc3339(now + _LIFETIME, seconds=True),
        "scope": {"sites": [DEMO_SITE]},
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
                "auth": "x-api-key",
                "data_classes": ["phi", "deidentified", "public"],
            },
        },
        "models": {"local/demo": {"file": DEMO_MODEL_FILE, "sha256": model_sha256, "n_ctx": 2048}},
        "organizations": {
            "demo": {
                "roles": {
                    # PHI stays local; a clinician who declares de-identified text may use the clouds.
                    "clinician": {
                        "models": ["local/*", "openai/gpt-4o*", "anthropic/claude-*"],
                        "declarable_data_classes": ["deidentified", "public"],
                    },
                    "billing": {"models": ["local/*", "openai/gpt-4o-mini"]},
                }
            }
        },
        "pricing": {
            "local/demo": {"input_per_mtok": 0.0, "output_per_mtok": 0.0},
            "openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
            "openai/gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            "anthropic/claude-sonnet-4-5": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
        },
    }


def prepare(home: Home, now: datetime | None = None) -> tuple[str, list[str]]:
    """Make ``home`` a ready demo gateway; returns (the demo token, what was done)."""
    now = now or datetime.now(UTC)
    done: list[str] = []
    if not home.initialized:
        done += home.init(DEMO_SITE)
    elif home.settings().site != DEMO_SITE:  # never turn a real home into a demo
        raise OperatorError(f"{home.root} is the home of site {home.settings().site!r}, not a demo home")
    author = home.root / "demo-author"
    if not Path(f"{author}.key").exists():
        signing_keys.generate(author)
        done.append(f"demo authoring key {author}.key")
    trust = home.trust()
    keyid = trust.add(Path(f"{author}.pub"))
    trust.save()
    model_path = home.models_dir / DEMO_MODEL_FILE
    if model_path.exists():
        with model_path.open("rb") as fh:
            model_sha256 = hash_file(fh.fileno())
    else:
        model_sha256 = write_tiny_model(model_path, size="tiny")
        done.append(f"tiny demo model generated: {model_path}")
    with home.open_vault() as vault:
        active = vault.policies.current()
        current = vault.policies.current_version()
        if active is None or _stale(active.envelope, now, model_sha256):
            version = (current or 0) + 1
            payload = json.dumps(demo_policy(version, now, model_sha256), indent=2).encode()
            envelope = dsse.sign(payload, [signing_keys.load_signing_key(Path(f"{author}.key"))])
            verified = importer.verify_bundle(
                envelope, trust, site=DEMO_SITE, current_version=current, now=now
            )
            vault.policies.activate(verified)
            vault.ledger.append_sync(
                {
                    "type": "admin",
                    "detail": f"policy_import v{version} demo key {keyid[:16]}",
                    "os_user": this_os_user(),
                }
            )
            done.append(f"demo policy v{version} signed and imported")
        token_file = home.root / "demo-token.txt"
        if token_file.exists():
            token = token_file.read_text(encoding="utf-8").strip()
        else:
            caller, org, role = DEMO_CALLER
            token = vault.tokens.issue(caller, org, role, note="demo")
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(token + "\n")
            vault.ledger.append_sync(
                {
                    "type": "admin",
                    "claw_id": caller,
                    "detail": f"token_issue org={org} role={role}",
                    "os_user": this_os_user(),
                }
            )
            done.append(f"token issued for {caller} ({org}/{role})")
    return token, done


def _stale(envelope: bytes, now: datetime, model_sha256: str) -> bool:
    """Re-sign when the demo policy nears expiry or does not pin the demo model file as it is."""
    policy = json.loads(dsse.parse_envelope(envelope).payload)
    expires = datetime.fromisoformat(policy["expires_at"].replace("Z", "+00:00"))
    pinned = policy.get("models", {}).get("local/demo", {}).get("sha256")
    return bool(expires - now < _RENEW_BEFORE) or pinned != model_sha256
