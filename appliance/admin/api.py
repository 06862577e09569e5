"""The admin socket's dispatcher: which endpoint answers which path, and what every endpoint shares.

    GET  /metrics                                  Prometheus text format (``appliance.metrics``)
    GET  /admin/status | /admin/activity | /admin/models                        ``admin.live``
    GET  /admin/audit | /admin/audit/record | /admin/audit/stream               ``admin.audit``
    POST /admin/audit/prove
    GET  /admin/callers; POST /admin/callers/issue | revoke | expiry            ``admin.callers``
    POST /admin/models/load | unload                                             ``admin.live``
    GET  /admin/policy; POST /admin/policy/verify | import | reload              ``admin.policy``
    GET  /admin/keys; POST /admin/keys/set | remove                              ``admin.keys``
    GET  /admin/ledger | /admin/ledger/verify; POST /admin/ledger/verify | checkpoint   ``admin.ledger``

Owns: the socket's routing table, ``AdminCall`` (query, JSON or raw body, the peer's OS user) and
``AdminContext`` (the running gateway's parts the endpoints may use), answers as JSON, an operator's
mistake (``OperatorError``) answered 400 with its message, and the ``admin`` record of every action
(``AdminContext.record``: durable before the answer, naming the verb and the socket peer's OS user).
The socket is ``<home>/admin.sock``, mode 0600 inside the 0700 home: only the appliance's own user can
connect, so the file mode is the authentication.
Never: listens on the network (the admin plane must not be reachable from the wards); returns a secret
(the one exception: a token at its issue, once); names an OS user the transport did not vouch for.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from appliance.errors import BadRequest, MethodNotAllowed, NotFound, OperatorError
from appliance.http import Request, Responder
from appliance.os_user import peer_os_user

if TYPE_CHECKING:
    from appliance.activity import Activity
    from appliance.admin.verify_job import VerifyJob
    from appliance.home import Home, Vault
    from appliance.policy_state import PolicyKeeper
    from local_models.runtime import LocalRuntime

_JSON = [(b"Content-Type", b"application/json")]


@dataclass
class AdminContext:
    """The running gateway's parts the admin endpoints use."""

    home: Home
    vault: Vault
    keeper: PolicyKeeper
    local: LocalRuntime
    activity: Activity
    status: Callable[[], dict[str, Any]]
    metrics: Callable[[], tuple[bytes, str]]
    in_flight: Callable[[], int]
    verify_job: VerifyJob
    started: float  # time.monotonic() when the gateway started (the uptime /admin/status also reports)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def record(self, call: AdminCall, detail: str, claw_id: str | None = None) -> None:
        """The ``admin`` record of an action, durable before the action is answered (for actions that are
        not a vault write of their own: those commit their record with them, ``record_with``)."""
        await self.vault.ledger.append(_admin_record(call, detail, claw_id))

    def record_with(
        self, call: AdminCall, detail: Callable[[int], str | None], claw_id: str | None = None
    ) -> Callable[[sqlite3.Connection, int], None]:
        """For a vault change's ``also``: its ``admin`` record, written in the change's own transaction, so
        that a change whose record cannot be written does not happen. ``detail(rows)`` words it (None: the
        change changed nothing, so nothing is recorded)."""

        def also(conn: sqlite3.Connection, rows: int) -> None:
            text = detail(rows)
            if text is not None:
                self.vault.ledger.record_in(conn, _admin_record(call, text, claw_id))

        return also


def _admin_record(call: AdminCall, detail: str, claw_id: str | None) -> dict[str, Any]:
    record = {"type": "admin", "detail": f"{detail} via admin socket", "os_user": call.os_user}
    if claw_id is not None:
        record["claw_id"] = claw_id
    return record


class AdminCall:
    """One request to the admin socket, as the endpoints read it."""

    def __init__(self, request: Request, responder: Responder) -> None:
        self.request = request
        self.responder = responder
        self.query = dict(parse_qsl(request.query or "", keep_blank_values=True))
        self.os_user = peer_os_user(request.peer)

    async def json(self) -> dict[str, Any]:
        raw = await self.request.body()
        try:
            doc = json.loads(raw or b"{}")
        except ValueError as exc:
            raise BadRequest("the body must be a JSON object") from exc
        if not isinstance(doc, dict):
            raise BadRequest("the body must be a JSON object")
        return doc

    async def data(self) -> bytes:
        return await self.request.body()

    def int_param(self, name: str, default: int | None = None) -> int | None:
        value = self.query.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise BadRequest(f"{name} must be an integer", param=name) from None
        return _in_range(number, name)


Handler = Callable[[AdminContext, AdminCall], Awaitable[dict[str, Any] | None]]
"""An endpoint: the JSON document to answer, or None when it answered itself (a stream)."""


MAX_INT = (1 << 63) - 1
"""Seqs, ids and statuses are SQLite integers: larger ones are refused, not left to overflow in a query."""


def _in_range(number: int, name: str) -> int:
    if not 0 <= number <= MAX_INT:
        raise BadRequest(f"{name} must be an integer from 0 to {MAX_INT}", param=name)
    return number


def int_field(doc: dict[str, Any], name: str) -> int:
    """A required integer of a JSON body (not a bool, within SQLite's range)."""
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name!r} is required (an integer)", param=name)
    return _in_range(value, name)


def text_field(doc: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name!r} is required (a non-empty string)", param=name)
    return value


class AdminApi:
    def __init__(self, context: AdminContext, routes: dict[tuple[str, str], Handler]) -> None:
        self._context = context
        self._routes = routes
        self._paths = {path for _, path in routes}

    async def handle(self, request: Request, responder: Responder) -> None:
        path = request.path.rstrip("/")
        handler = self._routes.get((request.method, path))
        if handler is None:
            if path in self._paths:
                allowed = sorted(method for method, known in self._routes if known == path)
                raise MethodNotAllowed(f"{request.path} accepts {' or '.join(allowed)} only")
            raise NotFound(f"no such admin endpoint: {request.path}")
        call = AdminCall(request, responder)
        try:
            doc = await handler(self._context, call)
        except OperatorError as exc:  # an operator's mistake (an unknown caller, a bad expiry): say it
            raise BadRequest(str(exc)) from exc
        if doc is not None:
            await send_json(responder, doc)


async def send_json(responder: Responder, doc: dict[str, Any]) -> None:
    await responder.send(200, _JSON, json.dumps(doc, separators=(",", ":"), default=str).encode())
