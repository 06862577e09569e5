"""Prometheus metrics of a running gateway, in the text format site monitoring scrapes.

Owns: the gauges read from the gateway's parts at scrape time (``prometheus_client`` renders them): whether
a policy is in force, its version and how long it stays valid; whether the ledger is writable, its records,
what it owes and its last stored checkpoint; requests in flight; each local model's queue depth, running
requests, slots, tokens generated and per second (what llama-server exposes as ``llamacpp:*``); the public
certificate's expiry. The counters and histograms of answered requests are ``appliance.activity``'s, in the
same registry. Served on the admin socket (``GET /metrics``), and on the public port only when the operator
enables ``server.public_metrics``.
Never: carries a caller's text, a token, a key or any other secret in a label or a value; keeps state of its
own (every gauge is read from its owner when scraped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from appliance import timestamps
from appliance.activity import Activity
from appliance.ledger.store import Ledger
from appliance.policy_state import PolicyKeeper

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

disable_created_metrics()  # no `_created` series beside each counter: a scrape carries what it measures only


class GatewayMetrics:
    """A registry holding one collector that reads the gateway's parts on each scrape."""

    def __init__(
        self,
        keeper: PolicyKeeper,
        ledger: Ledger,
        in_flight: Callable[[], int],
        transport: Callable[[], dict[str, Any]] | None = None,
        *,
        registry: CollectorRegistry | None = None,
        activity: Activity | None = None,
        local: Callable[[], dict[str, Any]] | None = None,
        last_checkpoint: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """``registry``: the one ``activity``'s counters live in; ``local``: the local models' status;
        ``last_checkpoint``: the newest stored checkpoint (size, at, reason)."""
        self._keeper = keeper
        self._ledger = ledger
        self._in_flight = in_flight
        self._transport = transport
        self._activity = activity
        self._local = local
        self._last_checkpoint = last_checkpoint
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        """The exposition text of every metric, as of now."""
        if self._activity is not None:
            self._activity.drain()
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
        yield CounterMetricFamily(
            "phi_ledger_stdout_lines_dropped",
            "Audit lines stdout could not take since start (the ledger has them)",
            value=float(ledger.dropped_lines),
        )
        yield _gauge(
            "phi_ledger_records", "Records in the ledger (the tree size of its head)", ledger.count()
        )
        last = self._last_checkpoint() if self._last_checkpoint is not None else None
        at = timestamps.epoch(last["at"]) if last is not None else None
        if at is not None:
            yield _gauge(
                "phi_ledger_last_checkpoint_timestamp_seconds",
                "When the newest stored, signed checkpoint was made (Unix time)",
                at,
            )
        yield _gauge("phi_http_in_flight_requests", "Requests whose handler is running", self._in_flight())
        if self._local is not None:
            yield from self._local_models(self._local())
        transport = self._transport() if self._transport is not None else {}
        yield _gauge("phi_tls_enabled", "1 if the public port speaks TLS", 1 if transport.get("tls") else 0)
        not_after = timestamps.epoch(transport.get("not_after"))
        if not_after is not None:
            yield _gauge(
                "phi_tls_certificate_expiry_timestamp_seconds",
                "When the public port's certificate expires (Unix time)",
                not_after,
            )
        yield _gauge("phi_scrape_timestamp_seconds", "When this scrape was answered (Unix time)", time.time())

    def _local_models(self, status: dict[str, Any]) -> Iterator[Metric]:
        rates = self._activity.local_rates(status) if self._activity is not None else {}
        loaded = GaugeMetricFamily(
            "phi_local_model_loaded", "1 if the local model is loaded and ready", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "phi_local_queue_depth",
            "Requests waiting for a slot (llamacpp:requests_deferred)",
            labels=["model"],
        )
        running = GaugeMetricFamily(
            "phi_local_running_requests",
            "Requests decoding now (llamacpp:requests_processing)",
            labels=["model"],
        )
        slots = GaugeMetricFamily("phi_local_slots", "Sequences decoded together", labels=["model"])
        rate = GaugeMetricFamily(
            "phi_local_generated_tokens_per_second",
            "Tokens generated per second over the last 10 s (llamacpp:predicted_tokens_seconds)",
            labels=["model"],
        )
        generated = CounterMetricFamily(
            "phi_local_generated_tokens",
            "Tokens generated since the model was loaded (llamacpp:tokens_predicted_total)",
            labels=["model"],
        )
        prompt = CounterMetricFamily(
            "phi_local_prompt_tokens",
            "Prompt tokens decoded since the model was loaded, cache hits excluded "
            "(llamacpp:prompt_tokens_total)",
            labels=["model"],
        )
        for model, row in sorted(status.items()):
            if not isinstance(row, dict):
                continue
            loaded.add_metric([model], 1.0 if row.get("state") == "ready" else 0.0)
            queue.add_metric([model], float(row.get("queue_depth") or 0))
            running.add_metric([model], float(row.get("active") or 0))
            if isinstance(row.get("slots"), int):
                slots.add_metric([model], float(row["slots"]))
            rate.add_metric([model], rates.get(model, 0.0))
            generated.add_metric([model], float(row.get("generated_tokens") or 0))
            prompt.add_metric([model], float(row.get("prompt_tokens") or 0))
        yield from (loaded, queue, running, slots, rate, generated, prompt)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
