"""``FixedSource``: a ``ConsoleSource`` with fixed, realistic data (and ``DownSource``, a gateway that is not
running), so the console's snapshots are the same on every run.

One module-level dict (or list) per endpoint, named after it: add a screen's data as one more of them and
one more method. Nothing here depends on the clock: ages and countdowns are numbers in the data.
Actions answer as the gateway would and record what they were asked in ``FixedSource.calls``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

from appliance.errors import OperatorError

SOCKET = "/var/lib/phi-gateway/admin.sock"
AT = "2026-12-02T13:00:00.000Z"
WINDOW = 120


def _wave(base: float, swing: float, period: float, phase: float = 0.0) -> list[float]:
    return [round(base + swing * math.sin((i + phase) / period), 3) for i in range(WINDOW)]


ACTIVITY: dict[str, Any] = {
    "at": AT,
    "uptime_s": 86_400.0 * 3 + 3_725.0,
    "window_s": WINDOW,
    "series": {
        "requests_per_s": _wave(42.0, 12.0, 9.0),
        "error_rate": [round(max(0.0, v), 4) for v in _wave(0.012, 0.015, 7.0, 3.0)],
        "p50_ms": _wave(180.0, 40.0, 11.0, 1.0),
        "p99_ms": _wave(900.0, 300.0, 13.0, 2.0),
        "tokens_per_s": _wave(5200.0, 1800.0, 10.0, 5.0),
    },
    "now": {
        "requests_per_s": 44.7,
        "error_rate": 0.0114,
        "p50_ms": 176.0,
        "p99_ms": 1043.0,
        "tokens_per_s": 5381.2,
        "in_flight": 17,
    },
    "totals": {
        "requests": 1_284_311,
        "errors": 9_612,
        "refusals": 2_417,
        "tokens_in": 412_993_120,
        "tokens_out": 88_120_443,
        "cost_usd": 4_812.37,
    },
    "spend_today": {
        "date": "2026-12-02",
        "total_usd": 612.48,
        "by_caller": [
            {"caller": "radiology-reports", "cost_usd": 301.12, "requests": 40_210},
            {"caller": "discharge-summaries", "cost_usd": 174.55, "requests": 22_918},
            {"caller": "billing-coder", "cost_usd": 88.03, "requests": 61_004},
            {"caller": "triage-bot", "cost_usd": 41.90, "requests": 9_771},
            {"caller": "research-deid", "cost_usd": 6.88, "requests": 1_203},
        ],
        "by_route": [
            {"route": "anthropic", "cost_usd": 389.20, "requests": 51_330},
            {"route": "openai", "cost_usd": 223.28, "requests": 83_560},
            {"route": "local", "cost_usd": 0.0, "requests": 12_406},
        ],
    },
    "local": [
        {
            "model": "local/tiny",
            "state": "ready",
            "queue_depth": 3,
            "active": 4,
            "slots": 4,
            "tokens_per_s": 212.5,
        },
        {
            "model": "local/medgemma",
            "state": "loading",
            "queue_depth": 0,
            "active": 0,
            "slots": None,
            "tokens_per_s": 0.0,
        },
    ],
    "ledger": {
        "writable": True,
        "records": 3_912_447,
        "owed_outcomes": 12,
        "last_checkpoint_at": "2026-12-02T12:58:21.000Z",
        "last_checkpoint_age_s": 99.0,
    },
    "policy": {
        "in_force": True,
        "version": 14,
        "expires_at": "2026-12-30T00:00:00Z",
        "expires_in_s": 2_372_400.0,
        "reason": "in force",
    },
}

STATUS: dict[str, Any] = {
    "uptime_s": ACTIVITY["uptime_s"],
    "site": "stmarys-main",
    "policy": ACTIVITY["policy"],
    "ledger": {"writable": True, "records": 3_912_447, "stdout_lines_dropped": 0, "export_error": None},
    "http": {"in_flight": 17},
    "transport": None,
    "local_models": {},
    "cpu_backend": "avx2",
}

_CALLERS = ["radiology-reports", "billing-coder", "discharge-summaries", "triage-bot"]
_MODELS = ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5", "openai/gpt-4o", "local/tiny"]


def _record(seq: int) -> dict[str, Any]:
    model = _MODELS[seq % len(_MODELS)]
    denied = seq % 11 == 0
    return {
        "seq": seq,
        "ts": f"2026-12-02T12:{50 + seq % 10:02d}:{seq % 60:02d}.{seq % 1000:03d}Z",
        "claw_id": _CALLERS[seq % len(_CALLERS)],
        "type": "intervention" if denied else "request",
        "model": model,
        "latency_ms": None if denied else 120 + (seq * 37) % 900,
        "status_code": 429 if denied else 200,
        "tokens_in": 0 if denied else 400 + seq % 300,
        "tokens_out": 0 if denied else 80 + seq % 90,
        "cost_usd": 0.0 if denied else round(0.0004 * (seq % 17 + 1), 6),
        "intervention": "rate_limited" if denied else None,
        "request_id": f"req_{seq:08x}",
        "org": "stmarys",
        "role": "radiology",
        "route": model.split("/")[0],
        "decision": "denied" if denied else "allowed",
        "policy_version": 14,
        "request_sha256": f"{seq:064x}",
        "response_sha256": None if denied else f"{seq * 7:064x}",
        "data_class": "phi",
        "detail": "rate_limited" if denied else None,
        "rule": "organizations.stmarys.roles.radiology.limits" if denied else None,
        "client_cert": None,
        "client_cert_sha256": None,
        "os_user": None,
    }


AUDIT: list[dict[str, Any]] = [_record(seq) for seq in range(3_912_400, 3_912_448)]
"""The newest audit records, oldest first (``/admin/audit``; the stream yields nothing newer)."""

PROOF: dict[str, Any] = {
    "tree_size": 3_912_448,
    "checkpoint": "stmarys-main/phi-gateway\n3912448\nq0x6cOo1nFJ5Kk3Hc7mYJ3y8xv3nq2mUx1q6gkC7Wb0=\n",
    "verified": True,
    "root_sha256": "ab34" * 16,
    "proof": {"hashes": []},
}

VERIFY_JOB: dict[str, Any] = {
    "state": "running",
    "checked": 2_400_000,
    "total": 3_912_447,
    "started_at": "2026-12-02T12:59:30.000Z",
    "finished_at": None,
    "summary": None,
    "problems": [],
}

LEDGER: dict[str, Any] = {
    "records": 3_912_447,
    "writable": True,
    "owed_outcomes": 12,
    "last_checkpoint": {"size": 3_912_300, "at": "2026-12-02T12:58:21.000Z", "reason": "interval"},
    "checkpoints": 1_412,
    "verifier_key": "stmarys-main/phi-gateway+5c1f9a2e+AQx0K1yq0b3Jm6y3P8R1Zt9u0cK4i2a7w5Q3e1r0t9y8",
    "verify": VERIFY_JOB,
}

CALLERS: dict[str, Any] = {
    "tokens": [
        {
            "id": 1,
            "caller": "radiology-reports",
            "org": "stmarys",
            "role": "radiology",
            "created_at": "2026-09-01T08:00:00Z",
            "expires_at": None,
            "revoked_at": None,
            "note": "PACS reports",
            "state": "active",
        },
        {
            "id": 2,
            "caller": "billing-coder",
            "org": "stmarys",
            "role": "billing",
            "created_at": "2026-09-03T10:12:00Z",
            "expires_at": "2027-03-03T10:12:00Z",
            "revoked_at": None,
            "note": None,
            "state": "active",
        },
        {
            "id": 3,
            "caller": "triage-bot",
            "org": "stmarys",
            "role": "radiology",
            "created_at": "2026-10-20T14:30:00Z",
            "expires_at": "2026-11-20T14:30:00Z",
            "revoked_at": None,
            "note": "pilot",
            "state": "expired",
        },
        {
            "id": 4,
            "caller": "old-importer",
            "org": "stmarys",
            "role": "billing",
            "created_at": "2026-06-01T09:00:00Z",
            "expires_at": None,
            "revoked_at": "2026-08-01T09:00:00Z",
            "note": None,
            "state": "revoked",
        },
    ]
}

MODELS: dict[str, Any] = {
    "models": [
        {
            "model": "local/tiny",
            "file": "tiny-q4.gguf",
            "sha256": "1f" * 32,
            "n_ctx": 4096,
            "state": "ready",
            "memory_bytes": 734_003_200,
            "slots": 4,
            "active": 4,
            "queue_depth": 3,
            "tokens_per_s": 212.5,
            "generated_tokens": 18_220_301,
            "prompt_tokens": 90_112_004,
            "cached_prompt_tokens": 41_000_000,
            "idle_s": 0.0,
        },
        {
            "model": "local/medgemma",
            "file": "medgemma-4b-q4.gguf",
            "sha256": "a7" * 32,
            "n_ctx": 8192,
            "state": "loading",
            "memory_bytes": None,
            "slots": None,
            "active": 0,
            "queue_depth": 0,
            "tokens_per_s": 0.0,
            "generated_tokens": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "idle_s": None,
        },
    ]
}

POLICY: dict[str, Any] = {
    "in_force": True,
    "reason": "in force",
    "version": 14,
    "sha256": "c3" * 32,
    "issued_at": "2026-11-30T00:00:00Z",
    "expires_at": "2026-12-30T00:00:00Z",
    "expires_in_s": 2_372_400.0,
    "scope": {"sites": ["stmarys-main"]},
    "keyids": ["author-1"],
    "trust": {"threshold": 1, "keys": [{"keyid": "author-1", "algorithm": "ed25519"}]},
    "summary": {
        "routes": [
            {"name": "openai", "kind": "openai", "data_classes": ["phi", "deidentified", "public"]},
            {"name": "anthropic", "kind": "anthropic", "data_classes": ["phi", "deidentified", "public"]},
            {"name": "local", "kind": "local", "data_classes": ["phi", "deidentified", "public"]},
        ],
        "models": ["local/tiny", "local/medgemma"],
        "organizations": [{"org": "stmarys", "roles": ["billing", "radiology"]}],
    },
    "document": None,
}

KEYS: dict[str, Any] = {
    "keys": [
        {"route": "openai", "fingerprint": "sha256:4b1c…9e02", "updated_at": "2026-09-01T08:00:00Z"},
        {"route": "anthropic", "fingerprint": "sha256:77aa…0c3d", "updated_at": "2026-09-01T08:01:00Z"},
    ],
    "routes_needing_keys": ["openai", "anthropic"],
}


class FixedSource:
    """A gateway that always says the same thing."""

    where = SOCKET

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    # -- reads --
    def activity(self) -> dict[str, Any]:
        return copy.deepcopy(ACTIVITY)

    def status(self) -> dict[str, Any]:
        return copy.deepcopy(STATUS)

    def audit(self, *, after: int | None = None, limit: int = 100, **filters: str) -> dict[str, Any]:
        records = [r for r in AUDIT if _matches(r, filters) and (after is None or r["seq"] > after)]
        records = records[:limit] if after is not None else records[-limit:]
        return {"records": copy.deepcopy(records), "head": AUDIT[-1]["seq"]}

    def audit_stream(self, after: int | None = None, **filters: str) -> Iterator[dict[str, Any]]:
        yield from (copy.deepcopy(r) for r in AUDIT if _matches(r, filters) and r["seq"] > (after or 0))

    def record(self, seq: int) -> dict[str, Any]:
        for r in AUDIT:
            if r["seq"] == seq:
                return {"record": copy.deepcopy(r)}
        raise OperatorError(f"the gateway refused: no audit record {seq}")

    def ledger(self) -> dict[str, Any]:
        return copy.deepcopy(LEDGER)

    def verify_job(self) -> dict[str, Any]:
        return copy.deepcopy(VERIFY_JOB)

    def callers(self, all: bool = False) -> dict[str, Any]:
        tokens = [t for t in CALLERS["tokens"] if all or t["state"] != "revoked"]
        return {"tokens": copy.deepcopy(tokens)}

    def models(self) -> dict[str, Any]:
        return copy.deepcopy(MODELS)

    def policy(self) -> dict[str, Any]:
        return copy.deepcopy(POLICY)

    def keys(self) -> dict[str, Any]:
        return copy.deepcopy(KEYS)

    # -- actions --
    def prove(self, seq: int) -> dict[str, Any]:
        self.calls.append(("prove", seq))
        return {"seq": seq, **copy.deepcopy(PROOF)}

    def start_verify(self) -> dict[str, Any]:
        self.calls.append(("start_verify", None))
        return copy.deepcopy(VERIFY_JOB)

    def checkpoint(self) -> dict[str, Any]:
        self.calls.append(("checkpoint", None))
        return {"size": LEDGER["records"], "note": PROOF["checkpoint"]}

    def issue(
        self, caller: str, org: str, role: str, expires: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(("issue", caller))
        return {
            "token": f"{caller}:" + "0" * 48,
            "caller": caller,
            "org": org,
            "role": role,
            "expires_at": None,
        }

    def revoke(self, caller: str | None = None, id: int | None = None) -> dict[str, Any]:
        self.calls.append(("revoke", caller or id))
        return {"revoked": 1}

    def set_expiry(self, id: int, expires: str | None) -> dict[str, Any]:
        self.calls.append(("set_expiry", id))
        return {"id": id, "expires_at": None}

    def load(self, model: str) -> dict[str, Any]:
        self.calls.append(("load", model))
        return {"model": model}

    def unload(self, model: str) -> dict[str, Any]:
        self.calls.append(("unload", model))
        return {"model": model}

    def reload_policy(self) -> dict[str, Any]:
        self.calls.append(("reload_policy", None))
        return copy.deepcopy(POLICY)

    def verify_bundle(self, data: bytes) -> dict[str, Any]:
        self.calls.append(("verify_bundle", len(data)))
        return {"ok": False, "check": "signature", "message": "the fixed source verifies nothing"}

    def import_bundle(self, data: bytes, sha256: str) -> dict[str, Any]:
        self.calls.append(("import_bundle", sha256))
        return {"ok": False, "check": "signature", "message": "the fixed source imports nothing"}

    def set_key(self, route: str, key: str) -> dict[str, Any]:
        self.calls.append(("set_key", route))
        return {"route": route, "fingerprint": "sha256:0000…0000", "rotated": True}

    def remove_key(self, route: str) -> dict[str, Any]:
        self.calls.append(("remove_key", route))
        return {"route": route, "removed": True}


_FIELDS = {"caller": "claw_id", "status": "status_code"}


def _matches(record: dict[str, Any], filters: dict[str, str]) -> bool:
    return all(str(record.get(_FIELDS.get(k, k))) == v for k, v in filters.items() if v)


class DownSource:
    """A gateway that is not running: every call fails as ``AdminClient`` does when nothing answers."""

    where = SOCKET

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise OperatorError(
                f"no gateway is running for this home (nothing answers on {SOCKET}); start it with "
                "phi-gateway serve"
            ) from ConnectionRefusedError(111, "Connection refused")

        return fail


# ---------------------------------------------------------------------------------------------------------
# The action screens (Callers 3, Models 4, Policy 5, Keys 6) and their modals, appended by their author:
# ``ActionSource`` is a FixedSource whose bundle verification passes (a report with a diff) unless the bundle
# holds b"west", and whose keys leave one route of the policy without a key.
# ---------------------------------------------------------------------------------------------------------

ISSUED_SECRET = "5f3c2a9e8b7d6c5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b"
"""The 48-hex secret ActionSource.issue answers with."""

ACTION_KEYS: dict[str, Any] = {
    "keys": copy.deepcopy(KEYS["keys"]),
    "routes_needing_keys": ["azure-deid"],
}
"""``/admin/keys`` with a route that needs a key and has none (the gateway lists only those)."""

BUNDLE_REPORT: dict[str, Any] = {
    "ok": True,
    "imported": False,
    "version": 15,
    "previous_version": 14,
    "sha256": "4e1a9c7d2b3f60588a9d0c1e2f3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c",
    "keyids": ["author-1"],
    "trust_rotation": None,
    "changes": [
        {"section": "version", "name": None, "change": "changed", "before": 14, "after": 15, "fields": []},
        {"section": "expires_at", "name": None, "change": "changed", "before": "2026-12-30T00:00:00Z",
         "after": "2027-01-30T00:00:00Z", "fields": []},
        {"section": "routes", "name": "azure-deid", "change": "added", "before": None,
         "after": {"kind": "openai"}, "fields": []},
        {"section": "roles", "name": "stmarys/billing", "change": "changed", "before": {}, "after": {},
         "fields": ["models", "limits"]},
        {"section": "pricing", "name": "openai/gpt-4o", "change": "changed", "before": {}, "after": {},
         "fields": ["input_per_mtok"]},
    ],
    "checks": [
        {"check": "size", "ok": True, "detail": "4182 bytes (limit 1048576)"},
        {"check": "format", "ok": True, "detail": "DSSE envelope, payloadType application/vnd.phi.policy"},
        {"check": "signature", "ok": True, "detail": "1 trusted key(s) verified (author-1); threshold 1"},
        {"check": "schema", "ok": True, "detail": "policy v15 is a valid policy document"},
        {"check": "rotation", "ok": True, "detail": "no trust change"},
        {"check": "freshness", "ok": True,
         "detail": "issued 2026-12-01T00:00:00+00:00, expires 2027-01-30T00:00:00+00:00"},
        {"check": "scope", "ok": True, "detail": "this site 'stmarys-main' is in stmarys-main"},
        {"check": "rollback", "ok": True, "detail": "v15 is newer than v14 in force"},
    ],
}  # fmt: skip
"""``/admin/policy/verify`` of a good bundle (the import answers the same with "imported": true)."""

BUNDLE_REFUSED: dict[str, Any] = {
    "ok": False,
    "imported": False,
    "check": "scope",
    "message": "policy v15 is for site(s) stmarys-west, not this site 'stmarys-main'",
}
"""``/admin/policy/verify`` of a bundle for another site."""


class ActionSource(FixedSource):
    """FixedSource with a passing bundle verification and a route missing its key."""

    def keys(self) -> dict[str, Any]:
        return copy.deepcopy(ACTION_KEYS)

    def issue(
        self, caller: str, org: str, role: str, expires: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(("issue", caller))
        expires_at = None if expires is None else "2027-01-01T13:00:00.000Z"
        return {"token": f"{caller}:{ISSUED_SECRET}", "caller": caller, "org": org, "role": role,
                "expires_at": expires_at}  # fmt: skip

    def verify_bundle(self, data: bytes) -> dict[str, Any]:
        self.calls.append(("verify_bundle", len(data)))
        return copy.deepcopy(BUNDLE_REFUSED if b"west" in data else BUNDLE_REPORT)

    def import_bundle(self, data: bytes, sha256: str) -> dict[str, Any]:
        self.calls.append(("import_bundle", sha256))
        if b"west" in data:
            return copy.deepcopy(BUNDLE_REFUSED)
        return {**copy.deepcopy(BUNDLE_REPORT), "imported": True}
