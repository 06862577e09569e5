"""The public API surface: which method and path reach which endpoint of the pipeline, and health.

    POST /v1/chat/completions   OpenAI chat (stream and not)                     -> Pipeline
    POST /v1/messages           Anthropic Messages, native passthrough           -> Pipeline
    POST /v1/completions        OpenAI completions                               -> Pipeline
    POST /v1/embeddings         OpenAI embeddings                                -> Pipeline
    GET  /v1/models             the models the caller's role may use             -> Pipeline
    anything else               404 / 405, recorded as a refusal                 -> Pipeline
    GET  /health                readiness: policy in force, ledger writable (no identity, not recorded)
    GET  /metrics               only with ``server.public_metrics``: the admin socket's Prometheus text
                                (no identity, not recorded)

Owns: dispatch and the health document. Never: identifies, polices or records a request itself: every
endpoint but ``/health`` is one call of ``Pipeline.run``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from appliance import __version__
from appliance.errors import MethodNotAllowed, NotFound
from appliance.http import Request, Responder
from appliance.ledger.store import Ledger
from appliance.pipeline import Pipeline
from appliance.pipeline.exchange import Endpoint
from appliance.policy_state import PolicyKeeper
from local_models.runtime import LocalRuntime

_JSON = [(b"Content-Type", b"application/json")]
_HEALTH = "/health"
_METRICS = "/metrics"

# path -> (method, endpoint)
_ENDPOINTS: dict[str, tuple[str, Endpoint | None]] = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/messages": ("POST", "messages"),
    "/v1/completions": ("POST", "completions"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/v1/models": ("GET", "models"),
    _HEALTH: ("GET", None),
}


class Api:
    def __init__(
        self,
        pipeline: Pipeline,
        keeper: PolicyKeeper,
        ledger: Ledger,
        local: LocalRuntime | None = None,
        *,
        transport: Callable[[], dict[str, Any]] | None = None,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        """``transport`` says how the public port is protected (TLS in force, its certificate, or plain
        HTTP the operator chose) for the health document; ``metrics``: serve ``/metrics`` here too (the
        operator enabled it), rendering (body, content type)."""
        self._transport = transport
        self._metrics = metrics
        self._pipeline = pipeline
        self._local = local
        self._keeper = keeper
        self._ledger = ledger
        self._started = time.monotonic()

    async def handle(self, request: Request, responder: Responder) -> None:
        path = request.path.rstrip("/") or "/"
        if path == _METRICS and self._metrics is not None and request.method in ("GET", "HEAD"):
            body, content_type = self._metrics()
            await responder.send(200, [(b"Content-Type", content_type.encode())], body)
            return
        entry = _ENDPOINTS.get(path)
        if entry is None:
            error = NotFound(f"no such endpoint: {request.method} {request.path}", code="unknown_endpoint")
            await self._pipeline.run(request, responder, "chat", refusal=error)
            return
        method, endpoint = entry
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            refusal = MethodNotAllowed(f"{request.path} accepts {method} only")
            await self._pipeline.run(request, responder, "chat", refusal=refusal)
            return
        if endpoint is None:
            await self.health(request, responder)
            return
        await self._pipeline.run(request, responder, endpoint)

    async def health(self, request: Request, responder: Responder) -> None:
        state = self._keeper.current
        ledger_ok = self._ledger.healthy
        serving = state is not None and ledger_ok
        doc = {
            "status": "ok" if serving else "refusing",
            "version": __version__,
            "policy": {
                "in_force": state is not None,
                "version": state.version if state else None,
                "expires_at": state.policy.expires_at.isoformat() if state else None,
                "expires_in_s": _whole(self._keeper.remaining_s()),
                "reason": self._keeper.reason,
            },
            "ledger": {"writable": ledger_ok, "stdout_lines_dropped": self._ledger.dropped_lines},
            "local_models": {
                model: row.get("state", "not loaded")
                for model, row in (self._local.status() if self._local else {}).items()
            },
            "transport": self._transport() if self._transport is not None else {"tls": False},
            "uptime_s": round(time.monotonic() - self._started, 1),
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        await responder.send(200 if serving else 503, _JSON, body)


def _whole(seconds: float | None) -> int | None:
    return None if seconds is None else max(int(seconds), 0)
