"""Test harness: a real gateway home, a real signed policy, and a real gateway server on 127.0.0.1.

The gateway runs on its own event loop (uvloop where available) in a background thread, so the tests can
drive it with the real, synchronous OpenAI and Anthropic SDKs. Everything is real but the cloud provider,
which is ``FakeUpstream``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance import signing_keys
from appliance.config import LocalSettings
from appliance.gateway import Gateway
from appliance.home import Home
from appliance.http.limits import HttpLimits
from appliance.policy import dsse, importer

SITE = "test-site"
PROVIDER_KEYS = {
    "openai": "sk-test-openai-0123456789abcdef0123",
    "anthropic": "sk-ant-test-fedcba9876543210fedc",
}


def policy_doc(upstream: str, version: int = 1, **overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    doc: dict[str, Any] = {
        "version": version,
        "issued_at": (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": (now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "scope": {"sites": [SITE]},
        "routes": {
            # Both clouds are under a BAA here (they may receive PHI); data-class tests add one that is not.
            "openai": {
                "kind": "openai",
                "base_url": f"{upstream}/v1",
                "auth": "bearer",
                "timeout_s": 2,
                "data_classes": ["phi", "deidentified", "public"],
            },
            "anthropic": {
                "kind": "anthropic",
                "base_url": upstream,
                "auth": "x-api-key",
                "timeout_s": 2,
                "data_classes": ["phi", "deidentified", "public"],
            },
            "local": {"kind": "local", "data_classes": ["phi", "deidentified", "public"]},
        },
        "organizations": {
            "stmarys": {
                "roles": {
                    "radiology": {"models": ["openai/*", "anthropic/*"]},
                    "billing": {"models": ["openai/gpt-4o-mini"]},
                }
            }
        },
        "pricing": {
            "openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
            "openai/gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            "anthropic/claude-sonnet-4-5": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
        },
    }
    doc.update(overrides)
    return doc


class AuditSink:
    """Stands in for stdout: collects the audit JSON lines the ledger prints after each commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: list[str] = []

    def write(self, text: str) -> int:
        with self._lock:
            self._chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def for_request(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("request_id") == request_id]


class GatewayHarness:
    def __init__(self, root: Path) -> None:
        self.home = Home(root / "home")
        self.home.init(SITE)
        self.author = root / "author"
        signing_keys.generate(self.author)
        trust = self.home.trust()
        trust.add(Path(f"{self.author}.pub"))
        trust.save()
        self.audit = AuditSink()
        self.gateway: Gateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- operator actions (the same calls the CLI makes) --

    def import_policy(self, doc: dict[str, Any]) -> None:
        envelope = dsse.sign(
            json.dumps(doc).encode(), [signing_keys.load_signing_key(Path(f"{self.author}.key"))]
        )
        with self.home.open_vault() as vault:
            vb = importer.verify_bundle(
                envelope, self.home.trust(), site=SITE, current_version=vault.policies.current_version()
            )
            vault.policies.activate(vb)

    def issue(self, caller: str, org: str = "stmarys", role: str = "radiology") -> str:
        with self.home.open_vault() as vault:
            return vault.tokens.issue(caller, org, role)

    def revoke(self, caller: str) -> int:
        with self.home.open_vault() as vault:
            return vault.tokens.revoke(caller)

    def set_provider_keys(self) -> None:
        with self.home.open_vault() as vault:
            for name, secret in PROVIDER_KEYS.items():
                vault.keys.set(name, secret)

    # -- the server --

    def start(
        self,
        limits: HttpLimits | None = None,
        reload_interval_s: float = 0.1,
        local: LocalSettings | None = None,
    ) -> str:
        settings = self.home.settings()
        settings.policy.reload_interval_s = reload_interval_s
        if limits is not None:
            settings.server.limits = limits
        if local is not None:
            settings.local = local
        self.gateway = Gateway(self.home, settings, audit_out=self.audit)
        loop = _new_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="gateway-under-test", daemon=True)
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(self.gateway.start("127.0.0.1", 0), loop).result(10)
        self.port = server.port
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self._loop is None or self.gateway is None:
            return
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def ledger_rows(self) -> Iterator[dict[str, Any]]:
        with self.home.open_vault() as vault:
            rows = vault.db.reader().execute("SELECT record FROM ledger ORDER BY seq").fetchall()
        for (record,) in rows:
            yield json.loads(record)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
