"""The public API surface: which method and path reach which handler, and the shape of each answer.

    POST /v1/chat/completions   OpenAI chat (stream and not)            -> Pipeline
    POST /v1/messages           Anthropic Messages, native passthrough  -> Pipeline
    GET  /v1/models             the models the caller's role may use    (identified, recorded)
    GET  /health                readiness: policy in force, ledger writable (no identity, not recorded)

Owns: dispatch, 404/405, the models listing, the health document, the error body per endpoint (OpenAI
shape everywhere; on /v1/messages the same object also carries Anthropic's top-level ``"type": "error"``
so both SDKs parse it). Never: decides policy or touches the ledger except through the pipeline's phases.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appliance import __version__
from appliance.errors import GatewayError, LedgerUnavailable, MethodNotAllowed, NotFound
from appliance.http import Request, Responder
from appliance.ledger.store import Ledger
from appliance.pipeline import Exchange, Pipeline
from appliance.policy_state import PolicyKeeper
from local_models.runtime import LocalRuntime

_JSON = [(b"Content-Type", b"application/json")]
_Handler = Callable[[Request, Responder], Awaitable[None]]


def render_openai_error(error: GatewayError) -> bytes:
    return error.body()


def render_anthropic_error(error: GatewayError) -> bytes:
    body: dict[str, Any] = {"type": "error", **error.to_dict()}
    return json.dumps(body, separators=(",", ":")).encode()


class Api:
    def __init__(
        self, pipeline: Pipeline, keeper: PolicyKeeper, ledger: Ledger, local: LocalRuntime | None = None
    ) -> None:
        self._pipeline = pipeline
        self._local = local
        self._keeper = keeper
        self._ledger = ledger
        self._started = time.monotonic()
        self._routes: dict[str, tuple[str, _Handler]] = {
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/messages": ("POST", self.messages),
            "/v1/completions": ("POST", self.completions),
            "/v1/embeddings": ("POST", self.embeddings),
            "/v1/models": ("GET", self.models),
            "/health": ("GET", self.health),
        }

    async def handle(self, request: Request, responder: Responder) -> None:
        entry = self._routes.get(request.path.rstrip("/") or "/")
        if entry is None:
            error = NotFound(f"no such endpoint: {request.method} {request.path}", code="unknown_endpoint")
            await self._refuse(request, responder, error)
            return
        method, handler = entry
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            await self._refuse(request, responder, MethodNotAllowed(f"{request.path} accepts {method} only"))
            return
        await handler(request, responder)

    async def _refuse(self, request: Request, responder: Responder, error: GatewayError) -> None:
        """An unknown endpoint or method: recorded like every other refusal."""
        await self._pipeline.refuse(Exchange(request, "chat"), responder, error, render_openai_error)

    async def chat_completions(self, request: Request, responder: Responder) -> None:
        await self._pipeline.run(request, responder, "chat", render_openai_error)

    async def messages(self, request: Request, responder: Responder) -> None:
        await self._pipeline.run(request, responder, "messages", render_anthropic_error)

    async def completions(self, request: Request, responder: Responder) -> None:
        await self._pipeline.run(request, responder, "completions", render_openai_error)

    async def embeddings(self, request: Request, responder: Responder) -> None:
        await self._pipeline.run(request, responder, "embeddings", render_openai_error)

    async def models(self, request: Request, responder: Responder) -> None:
        pipeline = self._pipeline
        ex = Exchange(request, "chat")
        try:
            ex.caller = pipeline.identify(request)
            ex.state = state = pipeline.police.require_state(self._keeper.current)
        except GatewayError as error:
            await pipeline.refuse(ex, responder, error, render_openai_error)
            return
        caller = ex.caller
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": model.split("/", 1)[0]}
            for model in state.engine.allowed_models(caller.org, caller.role)
        ]
        data += [  # aliases the role may use: an app can ask for "clinical-summary" by name
            {"id": alias, "object": "model", "created": 0, "owned_by": "alias"}
            for alias in state.engine.allowed_aliases(caller.org, caller.role)
        ]
        body = json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
        try:
            await pipeline.record.listed(ex, body)
        except LedgerUnavailable as error:
            await responder.send(error.status, _JSON, error.body())
            return
        await responder.send(200, _JSON, body)

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
                "reason": self._keeper.reason,
            },
            "ledger": {"writable": ledger_ok, "stdout_lines_dropped": self._ledger.dropped_lines},
            "local_models": {
                model: row.get("state", "not loaded")
                for model, row in (self._local.status() if self._local else {}).items()
            },
            "uptime_s": round(time.monotonic() - self._started, 1),
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        await responder.send(200 if serving else 503, _JSON, body)
