"""Phase 4, Record: the ledger records of one request, durable before anything leaves.

Owns: the request record and one record per policy action taken on it (durable before forwarding), the
refusal record (durable before the caller is told; refusals of unidentified requests sampled per window,
``sampling``), the models-listing record, a fallback's record as it happens, and the outcome record that
follows the answer (lazy: it shares the next request's fsync, and a crash before it leaves the request
visibly open in ``audit pending``). When the ledger cannot be written the request is refused with 503
(fail closed).
Never: records prompt or completion text (only SHA-256 digests of the bodies), a token or a provider key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.errors import GatewayError, LedgerUnavailable, LimitReached, PolicyDenied, StorageUnavailable
from appliance.ledger.store import Ledger
from appliance.pipeline.exchange import Exchange
from appliance.pipeline.sampling import FloodSampler
from routes.pricing import cost_usd
from routes.result import RouteResult

log = logging.getLogger("phi.pipeline")

# A refusal's intervention, from the verdict's reason (the rest are "policy_denied").
_DENIALS = {
    "data_class_denied": "data_class_denied",
    "data_class_downgrade": "data_class_denied",
    "tools_denied": "tool_denied",
    "prompt_denied": "prompt_denied",
    "too_many_messages": "prompt_denied",
    "prompt_too_long": "prompt_denied",
}


@dataclass(slots=True)
class Outcome:
    """What forwarding learnt, for the one outcome record."""

    status: int = 0
    digest: str | None = None
    error: GatewayError | None = None
    detail: str | None = None
    watching: bool = True  # while forwarding: a disconnect then cancels the work
    first_chunk_s: float | None = None  # a stream: seconds from the request's arrival to its first chunk


class Record:
    def __init__(
        self,
        ledger: Ledger,
        flood_window_s: float = 1.0,
        on_first_chunk: Callable[[str | None, float], None] | None = None,
    ) -> None:
        """``on_first_chunk(route, seconds)``: told of each streamed answer's time to its first chunk (the
        metrics; the ledger keeps the whole latency only)."""
        self._ledger = ledger
        self._on_first_chunk = on_first_chunk
        self.flood = FloodSampler(self._queue, flood_window_s)

    async def admitted(self, ex: Exchange) -> None:
        """The request record, and one record per policy action taken on it; durable before forwarding."""
        record = ex.base_record("request")
        record["decision"] = "allowed"
        record["intervention"] = None
        records = [record]
        for action in ex.interventions:
            acted = ex.base_record("intervention")
            acted.update(
                decision="allowed", intervention=action.reason, rule=action.rule, detail=action.detail
            )
            records.append(acted)
        await self._durable(records)

    async def refused(self, ex: Exchange, error: GatewayError) -> None:
        """A refusal, durable before the caller is told; with no identified caller, sampled (``sampling``)."""
        if ex.caller is None and not self.flood.take(error.status):
            return
        denied = isinstance(error, PolicyDenied | LimitReached)
        record = ex.base_record("intervention" if denied else "error")
        record["decision"] = "denied"
        record["status_code"] = error.status
        record["detail"] = error.code  # for a policy refusal, the verdict's reason
        record["intervention"] = None
        if isinstance(error, PolicyDenied):
            record["intervention"] = _DENIALS.get(error.code, "policy_denied")
            record["rule"] = error.rule
        elif isinstance(error, LimitReached):
            record["intervention"] = error.code  # rate_limited or budget_exceeded
            record["rule"] = error.rule
        await self._durable([record])

    def fallback(self, ex: Exchange, frm: str, to: str, error: GatewayError) -> None:
        """A route failed before answering and the next allowed one is tried: recorded as it happens."""
        record = ex.base_record("intervention")
        primary = ex.verdict.model if ex.verdict else frm
        position = ex.verdict.fallbacks.index(to) if ex.verdict and to in ex.verdict.fallbacks else 0
        # A fallback's key and alternatives are policy names; the primary may have matched only a glob.
        named = ex.state.engine.ledger_name if ex.state else str
        record.update(
            decision="allowed",
            intervention="fallback",
            rule=f"fallbacks.{named(primary)}[{position}]",
            detail=f"{named(frm)} -> {named(to)} after {error.code}",
            status_code=error.status,
        )
        self._queue(record)

    def unidentified(self, record: dict[str, Any]) -> None:
        """A refusal the HTTP server answered itself (no caller is known yet): sampled, queued."""
        if self.flood.take(record.get("status_code") or 0):
            self._queue(record)

    def _queue(self, record: dict[str, Any]) -> None:
        """Append without waiting (lazy: it joins the next commit); a failure is logged, and an outcome
        that fails is kept and retried by the ledger until it is durable."""
        self._ledger.append(record, lazy=True).add_done_callback(_log_failed_outcome)

    async def listed(self, ex: Exchange, body: bytes) -> None:
        """A models listing: one record, durable before the answer."""
        record = ex.base_record("response")
        record["decision"] = "allowed"
        record["status_code"] = 200
        record["intervention"] = None
        record["response_sha256"] = hashlib.sha256(body).hexdigest()
        record["detail"] = "models_list"
        await self._durable([record])

    def outcome(self, ex: Exchange, out: Outcome, result: RouteResult | None) -> None:
        """The outcome record; queued after the answer (a crash before it leaves the request visibly open)."""
        error, detail = out.error, out.detail
        record = ex.base_record("error" if error is not None else "response")
        record["decision"] = "allowed"
        record["status_code"] = error.status if error is not None else out.status
        record["response_sha256"] = out.digest
        record["intervention"] = None
        if result is not None:
            usage = result.usage
            record["tokens_in"] = usage.tokens_in
            record["tokens_out"] = usage.tokens_out
            served = ex.served or (ex.verdict.model if ex.verdict else ex.model)
            price = ex.state.engine.price(served) if ex.state and served else None
            record["cost_usd"] = cost_usd(price, usage.tokens_in, usage.tokens_out)
            if not usage.reported and detail is None:
                detail = "usage_not_reported"
            if price is None and detail is None:
                detail = "unpriced_model"
        record["detail"] = error.code if error is not None else detail
        self._queue(record)
        if out.first_chunk_s is not None and self._on_first_chunk is not None:
            self._on_first_chunk(record["route"], out.first_chunk_s)

    async def _durable(self, records: list[dict[str, Any]]) -> None:
        try:
            await asyncio.gather(*(self._ledger.append(record) for record in records))
        except (StorageUnavailable, LedgerUnavailable) as exc:
            raise LedgerUnavailable(
                "the audit ledger cannot be written; the gateway refuses traffic until it can"
            ) from exc


def _log_failed_outcome(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("an outcome record could not be written: %s", fut.exception())
