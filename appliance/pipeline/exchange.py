"""What one request carries through the four phases, and how its refusals are rendered.

Owns: ``Exchange`` (what the phases learn about one request, in the order they learn it, and the common
part of every record written about it), the endpoint names, and the error body per endpoint (OpenAI shape
everywhere; on ``/v1/messages`` the same object also carries Anthropic's top-level ``"type": "error"`` so
both SDKs parse it). Never: holds a token secret or a provider key; puts prompt text into a record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.errors import GatewayError
from appliance.http import Request
from appliance.identity import Caller
from appliance.pipeline.limits import Ticket
from appliance.policy.engine import Intervention, Verdict
from appliance.policy_state import PolicyState

Endpoint = Literal["chat", "messages", "completions", "embeddings", "models"]
"""The endpoints that pass the chain (``/health`` alone does not: it is neither identified nor recorded)."""

ErrorRenderer = Callable[[GatewayError], bytes]


def render_openai_error(error: GatewayError) -> bytes:
    return error.body()


def render_anthropic_error(error: GatewayError) -> bytes:
    body: dict[str, Any] = {"type": "error", **error.to_dict()}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(slots=True)
class Exchange:
    """What the phases learn about one request, in the order they learn it."""

    request: Request
    endpoint: Endpoint
    caller: Caller | None = None
    payload: dict[str, Any] | None = None
    model: str | None = None
    model_label: str | None = None  # what the record says: the model, or a digest if it is no model name
    state: PolicyState | None = None
    verdict: Verdict | None = None
    interventions: list[Intervention] = field(default_factory=list)  # the policy actions taken on it
    ticket: Ticket | None = None
    served: str | None = None  # the provider/model that answered (a fallback's, if one did)
    request_sha256: str | None = None

    @property
    def render(self) -> ErrorRenderer:
        return render_anthropic_error if self.endpoint == "messages" else render_openai_error

    def base_record(self, type_: str) -> dict[str, Any]:
        caller, verdict, state = self.caller, self.verdict, self.state
        peer = self.request.peer
        return {
            "type": type_,
            "request_id": self.request.request_id,
            "claw_id": caller.id if caller else None,
            "org": caller.org if caller else None,
            "role": caller.role if caller else None,
            "model": self.model_label,
            "route": self.served.partition("/")[0]
            if self.served
            else (verdict.route_name if verdict else None),
            "policy_version": state.version if state else None,
            "data_class": verdict.data_class if verdict else _role_data_class(state, caller),
            "request_sha256": self.request_sha256,
            "latency_ms": round((time.perf_counter() - self.request.received_at) * 1000, 3),
            # The client certificate the TLS handshake verified (mutual TLS): who the connection was.
            "client_cert": peer.cert_subject,
            "client_cert_sha256": peer.cert_fingerprint.removeprefix("sha256:")
            if peer.cert_fingerprint
            else None,
        }


def _role_data_class(state: PolicyState | None, caller: Caller | None) -> str | None:
    if state is None or caller is None:
        return None
    role = state.engine.role(caller.org, caller.role)
    return role.default_data_class if role else None
