"""Admission: the connections and running handlers one server holds, in all and per client address.

Owns the counts behind ``max_connections``, ``max_connections_per_address``, ``max_concurrency`` and
``max_concurrency_per_address``, the refusal each breach earns, and the ``Rejection`` record every
refusal of the server's own becomes. It must never touch a transport, parse a request or write an
answer; the connection protocol asks before it admits and answers the refusal itself. A client
without an address (a unix socket) is held to the totals only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import GatewayError, Overloaded, RateLimited
from appliance.http.cycle import Request, new_request_id
from appliance.http.limits import HttpLimits

logger = logging.getLogger("phi.http")


@dataclass(slots=True)
class Rejection:
    """A request the server refused itself, without (or before) calling the handler; for the audit."""

    status: int
    code: str
    method: str | None
    path: str | None
    client: tuple[str, int] | None
    request_id: str


class Admission:
    """Counters checked when a connection opens and when a request is handed to its handler.

    Every count taken is given back exactly once: ``open`` by ``close``, ``start`` by ``finish``, each
    with the same address. Dictionary entries are dropped at zero so a passing crowd of addresses
    leaves nothing behind.
    """

    __slots__ = ("_connections_of", "_running_of", "connections", "in_flight", "limits", "on_reject")

    def __init__(self, limits: HttpLimits, on_reject: Callable[[Rejection], None] | None = None) -> None:
        self.limits = limits
        self.on_reject = on_reject
        self.connections = 0  # open connections admitted
        self.in_flight = 0  # handlers running
        self._connections_of: dict[str, int] = {}
        self._running_of: dict[str, int] = {}

    def open(self, address: str | None) -> GatewayError | None:
        """Count a new connection from ``address``; or the refusal, and nothing is counted."""
        limits = self.limits
        if address is not None:
            held = self._connections_of.get(address, 0)
            if held >= limits.max_connections_per_address:
                return RateLimited(
                    "too many connections from this address; close idle ones or retry shortly",
                    code="too_many_connections_from_address",
                )
        else:
            held = 0
        if self.connections >= limits.max_connections:
            return Overloaded(
                "the gateway is at its connection limit; retry shortly", code="too_many_connections"
            )
        if address is not None:
            self._connections_of[address] = held + 1
        self.connections += 1
        return None

    def close(self, address: str | None) -> None:
        """Give back the count of a connection ``open`` admitted."""
        self.connections -= 1
        if address is not None:
            _decrement(self._connections_of, address)

    def start(self, address: str | None, *, exempt: bool = False) -> GatewayError | None:
        """Count a handler about to run for ``address``; or the refusal, and nothing is counted.

        ``exempt`` requests are counted but never refused: a readiness probe must see the node as
        it is, not as busy as it happens to be this second.
        """
        running = 0 if address is None else self._running_of.get(address, 0)
        if not exempt:
            limits = self.limits
            if running >= limits.max_concurrency_per_address:
                return RateLimited(
                    "too many requests in progress from this address; retry shortly",
                    code="too_many_requests_from_address",
                )
            if self.in_flight >= limits.max_concurrency:
                return Overloaded("the gateway is at its concurrency limit; retry shortly")
        if address is not None:
            self._running_of[address] = running + 1
        self.in_flight += 1
        return None

    def finish(self, address: str | None) -> None:
        """Give back the count of a handler ``start`` admitted."""
        self.in_flight -= 1
        if address is not None:
            _decrement(self._running_of, address)

    def report(self, error: GatewayError, request: Request | None, client: tuple[str, int] | None) -> str:
        """Tell ``on_reject`` of a refusal (``request``: what was parsed of it, if anything); returns the
        request id its answer must carry."""
        if request is None:
            request_id, method, path = new_request_id(), None, None
        else:
            request_id, method, path = request.request_id, request.method or None, request.path or None
        if self.on_reject is not None:
            try:
                self.on_reject(Rejection(error.status, error.code, method, path, client, request_id))
            except Exception:
                logger.exception("on_reject callback failed")
        return request_id


def _decrement(counts: dict[str, int], address: str) -> None:
    left = counts[address] - 1
    if left:
        counts[address] = left
    else:
        del counts[address]
