"""What the console's screens may ask of a gateway: ``ConsoleSource``, and ``AdminSource`` that answers it
over the admin socket.

Owns: the one list of admin-API calls the console makes (one method per endpoint, each returning the
endpoint's JSON document unchanged) and the query strings they send. Screens depend on the protocol only, so
tests hand them a fixed-data source.
Never: imports the server side (vault, ledger, pipeline, home, gateway, ``appliance.admin.api``); keeps state
between calls; retries an action (a screen that retries does so on purpose); holds a secret longer than the
call that carries it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol
from urllib.parse import urlencode

from appliance.admin.client import AdminClient

Document = dict[str, Any]

AUDIT_FILTERS = ("caller", "route", "model", "decision", "status", "intervention", "type")
"""The audit fields the server filters on (exact matches); the console's filter bar knows these names."""


class ConsoleSource(Protocol):
    """The admin API as the screens see it. Every method blocks (call it from a thread worker) and raises
    ``appliance.errors.OperatorError`` when the gateway is down or refuses."""

    @property
    def where(self) -> str:
        """The gateway this source talks to, for the status line and the "not running" banner."""
        ...

    # -- reads --
    def activity(self) -> Document: ...
    def status(self) -> Document: ...
    def audit(self, *, after: int | None = None, limit: int = 100, **filters: str) -> Document: ...
    def audit_stream(self, after: int | None = None, **filters: str) -> Iterator[Document]: ...
    def record(self, seq: int) -> Document: ...
    def callers(self, all: bool = False) -> Document: ...
    def models(self) -> Document: ...
    def policy(self) -> Document: ...
    def keys(self) -> Document: ...
    def ledger(self) -> Document: ...
    def verify_job(self) -> Document: ...

    # -- actions (each is recorded in the gateway's ledger as an ``admin`` record) --
    def prove(self, seq: int) -> Document: ...
    def issue(
        self, caller: str, org: str, role: str, expires: str | None = None, note: str | None = None
    ) -> Document: ...
    def revoke(self, caller: str | None = None, id: int | None = None) -> Document: ...
    def set_expiry(self, id: int, expires: str | None) -> Document: ...
    def load(self, model: str) -> Document: ...
    def unload(self, model: str) -> Document: ...
    def reload_policy(self) -> Document: ...
    def verify_bundle(self, data: bytes) -> Document: ...
    def import_bundle(self, data: bytes, sha256: str) -> Document: ...
    def set_key(self, route: str, key: str) -> Document: ...
    def remove_key(self, route: str) -> Document: ...
    def start_verify(self) -> Document: ...
    def checkpoint(self) -> Document: ...


def audit_query(after: int | None = None, limit: int | None = None, **filters: str) -> str:
    """The query string of ``/admin/audit`` and ``/admin/audit/stream``; empty filters are left out."""
    params: dict[str, str] = {}
    if after is not None:
        params["after"] = str(after)
    if limit is not None:
        params["limit"] = str(limit)
    for name in AUDIT_FILTERS:
        value = filters.get(name)
        if value:
            params[name] = value
    return "?" + urlencode(params) if params else ""


class AdminSource(AdminClient):
    """``ConsoleSource`` over ``<home>/admin.sock``."""

    @property
    def where(self) -> str:
        return str(self.socket_path)

    def activity(self) -> Document:
        return self.call("GET", "/admin/activity")

    def status(self) -> Document:
        return self.call("GET", "/admin/status")

    def audit(self, *, after: int | None = None, limit: int = 100, **filters: str) -> Document:
        return self.call("GET", "/admin/audit" + audit_query(after, limit, **filters))

    def audit_stream(self, after: int | None = None, **filters: str) -> Iterator[Document]:
        return self.stream("/admin/audit/stream" + audit_query(after, None, **filters))

    def record(self, seq: int) -> Document:
        return self.call("GET", f"/admin/audit/record?seq={int(seq)}")

    def callers(self, all: bool = False) -> Document:
        return self.call("GET", "/admin/callers?all=1" if all else "/admin/callers")

    def models(self) -> Document:
        return self.call("GET", "/admin/models")

    def policy(self) -> Document:
        return self.call("GET", "/admin/policy")

    def keys(self) -> Document:
        return self.call("GET", "/admin/keys")

    def ledger(self) -> Document:
        return self.call("GET", "/admin/ledger")

    def verify_job(self) -> Document:
        return self.call("GET", "/admin/ledger/verify")

    def prove(self, seq: int) -> Document:
        return self.call("POST", "/admin/audit/prove", {"seq": int(seq)})

    def issue(
        self, caller: str, org: str, role: str, expires: str | None = None, note: str | None = None
    ) -> Document:
        body = {"caller": caller, "org": org, "role": role, "expires": expires, "note": note}
        return self.call("POST", "/admin/callers/issue", body)

    def revoke(self, caller: str | None = None, id: int | None = None) -> Document:
        body: Document = {"caller": caller} if id is None else {"id": int(id)}
        return self.call("POST", "/admin/callers/revoke", body)

    def set_expiry(self, id: int, expires: str | None) -> Document:
        return self.call("POST", "/admin/callers/expiry", {"id": int(id), "expires": expires})

    def load(self, model: str) -> Document:
        return self.call("POST", "/admin/models/load", {"model": model})

    def unload(self, model: str) -> Document:
        return self.call("POST", "/admin/models/unload", {"model": model})

    def reload_policy(self) -> Document:
        return self.call("POST", "/admin/policy/reload")

    def verify_bundle(self, data: bytes) -> Document:
        return self.send_bytes("POST", "/admin/policy/verify", data)

    def import_bundle(self, data: bytes, sha256: str) -> Document:
        return self.send_bytes("POST", "/admin/policy/import?" + urlencode({"sha256": sha256}), data)

    def set_key(self, route: str, key: str) -> Document:
        return self.call("POST", "/admin/keys/set", {"route": route, "key": key})

    def remove_key(self, route: str) -> Document:
        return self.call("POST", "/admin/keys/remove", {"route": route})

    def start_verify(self) -> Document:
        return self.call("POST", "/admin/ledger/verify")

    def checkpoint(self) -> Document:
        return self.call("POST", "/admin/ledger/checkpoint")
