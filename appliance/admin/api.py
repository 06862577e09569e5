"""The operator plane of a running gateway: a small JSON API on a unix socket, and its client.

    GET  /metrics                 Prometheus text format (``appliance.metrics``)
    GET  /admin/status            policy, ledger, local models, counters (what /health shows, and more)
    POST /admin/policy/reload     look for a new policy or trust file now, not at the next tick
    POST /admin/models/load       {"model": "local/<name>"}: verify the pinned file and load it
    POST /admin/models/unload     {"model": "local/<name>"}

Owns: the socket (``<home>/admin.sock``, mode 0600 inside the 0700 home: only the appliance's own user
can connect, so the file mode is the authentication), the routes above, and ``AdminClient`` used by the
CLI (and later the console). Every change made through it is an ``admin`` record in the ledger, naming
the OS user of the socket's peer (``SO_PEERCRED``, worded by ``appliance.os_user``).
Never: listens on the network (the admin plane must not be reachable from the wards); returns a
secret; names an OS user the transport did not vouch for (a peer without credentials is ``unknown``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from appliance.errors import BadRequest, MethodNotAllowed, NotFound
from appliance.http import Request, Responder
from appliance.os_user import peer_os_user

_JSON = [(b"Content-Type", b"application/json")]


class AdminTarget(Protocol):
    """What the admin plane may ask of a running gateway."""

    def status(self) -> dict[str, Any]: ...

    def reload_policy(self) -> dict[str, Any]: ...

    async def load_model(self, model: str) -> dict[str, Any]: ...

    async def unload_model(self, model: str) -> dict[str, Any]: ...

    def record_admin(self, detail: str, os_user: str | None = None) -> None: ...

    def metrics(self) -> tuple[bytes, str]: ...


class AdminApi:
    def __init__(self, target: AdminTarget) -> None:
        self._target = target
        self._routes: dict[str, tuple[str, Callable[[Request, Responder], Awaitable[None]]]] = {
            "/metrics": ("GET", self._metrics),
            "/admin/status": ("GET", self._status),
            "/admin/policy/reload": ("POST", self._reload),
            "/admin/models/load": ("POST", self._load),
            "/admin/models/unload": ("POST", self._unload),
        }

    async def handle(self, request: Request, responder: Responder) -> None:
        entry = self._routes.get(request.path.rstrip("/"))
        if entry is None:
            raise NotFound(f"no such admin endpoint: {request.path}")
        method, handler = entry
        if request.method != method:
            raise MethodNotAllowed(f"{request.path} accepts {method} only")
        await handler(request, responder)

    async def _status(self, request: Request, responder: Responder) -> None:
        await _send(responder, self._target.status())

    async def _metrics(self, request: Request, responder: Responder) -> None:
        body, content_type = self._target.metrics()
        await responder.send(200, [(b"Content-Type", content_type.encode())], body)

    async def _reload(self, request: Request, responder: Responder) -> None:
        result = self._target.reload_policy()
        self._target.record_admin("policy_reload via admin socket", peer_os_user(request.peer))
        await _send(responder, result)

    async def _load(self, request: Request, responder: Responder) -> None:
        model = _model_of(await request.body())
        result = await self._target.load_model(model)
        self._target.record_admin(f"model_load {model} via admin socket", peer_os_user(request.peer))
        await _send(responder, result)

    async def _unload(self, request: Request, responder: Responder) -> None:
        model = _model_of(await request.body())
        result = await self._target.unload_model(model)
        self._target.record_admin(f"model_unload {model} via admin socket", peer_os_user(request.peer))
        await _send(responder, result)


def _model_of(body: bytes) -> str:
    try:
        doc = json.loads(body or b"{}")
    except ValueError as exc:
        raise BadRequest('the body must be JSON: {"model": "local/<name>"}') from exc
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: \"local/<name>\"", param="model")
    return model


async def _send(responder: Responder, doc: dict[str, Any]) -> None:
    await responder.send(200, _JSON, json.dumps(doc, separators=(",", ":"), default=str).encode())
