"""Prometheus metrics of a running gateway, in the text format site monitoring scrapes.

Owns: the metric names and their meaning, read from the gateway's parts at scrape time (``prometheus_client``
renders them): whether a policy is in force and how long it stays valid, whether the ledger is writable and
what it owes, requests in flight, and the public certificate's expiry. Served on the admin socket
(``GET /metrics``), never on the ward-facing port.
Never: carries a caller's text, a token, a key or any other secret in a label or a value; keeps state of its
own (every value is read from its owner when scraped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from appliance.ledger.store import Ledger
from appliance.policy_state import PolicyKeeper

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class GatewayMetrics:
    """A registry holding one collector that reads the gateway's parts on each scrape."""

    def __init__(
        self,
        keeper: PolicyKeeper,
        ledger: Ledger,
        in_flight: Callable[[], int],
        transport: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._keeper = keeper
        self._ledger = ledger
        self._in_flight = in_flight
        self._transport = transport
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        """The exposition text of every metric, as of now."""
        return bytes(generate_latest(self.registry))

    def collect(self) -> Iterator[Metric]:
        state = self._keeper.current
        yield _gauge(
            "phi_policy_in_force",
            "1 if a verified, unexpired policy is in force (else all refused)",
            1 if state else 0,
        )
        if state is not None:
            yield _gauge("phi_policy_version", "Version of the policy in force", state.version)
            yield _gauge(
                "phi_policy_expiry_timestamp_seconds",
                "When the policy in force expires (Unix time); alert on it minus time()",
                state.policy.expires_at.timestamp(),
            )
            yield _gauge(
                "phi_policy_remaining_validity_seconds",
                "Seconds until the policy in force expires and every request is refused",
                max(self._keeper.remaining_s() or 0.0, 0.0),
            )
        ledger = self._ledger
        yield _gauge(
            "phi_ledger_writable",
            "1 if the ledger accepts records (else the gateway refuses)",
            1 if ledger.healthy else 0,
        )
        yield _gauge(
            "phi_ledger_owed_outcomes",
            "Outcome records waiting to be written after a storage fault",
            ledger.owed_outcomes,
        )
        yield _gauge(
            "phi_ledger_stdout_lines_dropped",
            "Audit lines stdout could not take (the ledger has them)",
            ledger.dropped_lines,
        )
        yield _gauge("phi_http_in_flight_requests", "Requests whose handler is running", self._in_flight())
        transport = self._transport() if self._transport is not None else {}
        yield _gauge("phi_tls_enabled", "1 if the public port speaks TLS", 1 if transport.get("tls") else 0)
        not_after = _timestamp(transport.get("not_after"))
        if not_after is not None:
            yield _gauge(
                "phi_tls_certificate_expiry_timestamp_seconds",
                "When the public port's certificate expires (Unix time)",
                not_after,
            )
        yield _gauge("phi_scrape_timestamp_seconds", "When this scrape was answered (Unix time)", time.time())


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
