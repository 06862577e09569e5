"""The four phases every public request passes, in order: Identify, Police, Route, Record.

    Identify   the bearer token -> Caller(id, org, role)                          401 / 403
               at most ``max_in_flight_per_caller`` requests of one caller at once  429
    Police     before the body is read: a client certificate the role requires    403
                                        a caller already at its rate limit        429
               the policy in force decides: verdict, edits, limits admission      403 / 429 / 503
    Record     the request record is durable in the ledger BEFORE anything leaves  503 if it cannot be
    Route      provider/model -> adapter; the caller's token is replaced by the sealed provider key
    Record     the outcome record (response or error) follows the answer

Each phase is a small object in a module of its own (``identify``, ``police``, ``route``, ``record``), and
``Pipeline.run`` is the only place that chains them, top to bottom; nothing reaches around it. Every public
endpoint but ``/health`` enters here: the model endpoints, ``GET /v1/models`` (identified, policed,
recorded) and the refusals of unknown paths and methods (recorded). Refusals are recorded durably before
the caller hears of them, so every request that got an answer has its record; when the ledger cannot be
written the answer is 503.
Never: records prompt or completion text (only SHA-256 of the bodies); lets a token or provider key reach a
record, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from typing import Any

from appliance.errors import ClientDisconnected, GatewayError, LedgerUnavailable, RateLimited, Unavailable
from appliance.http import Request, Responder
from appliance.identity import TokenStore
from appliance.ledger.store import Ledger
from appliance.pipeline import answer
from appliance.pipeline.exchange import Endpoint, Exchange
from appliance.pipeline.identify import Identify
from appliance.pipeline.limits import LimitKeeper
from appliance.pipeline.police import Police
from appliance.pipeline.record import Outcome, Record
from appliance.pipeline.route import Route
from appliance.policy_state import PolicyKeeper
from appliance.vault.provider_keys import ProviderKeys
from routes.result import RouteResult

_CLIENT_CLOSED = 499  # the client went away before any answer (nginx's convention; never sent)


class Pipeline:
    def __init__(
        self,
        tokens: TokenStore,
        keys: ProviderKeys,
        ledger: Ledger,
        keeper: PolicyKeeper,
        limits: LimitKeeper | None = None,
        *,
        max_in_flight_per_caller: int = 64,
        flood_window_s: float = 1.0,
        client_ca: bool = False,
        on_first_chunk: Callable[[str | None, float], None] | None = None,
    ) -> None:
        """``client_ca``: the listener verifies client certificates (mutual TLS; see ``Police``);
        ``on_first_chunk``: told each streamed answer's time to first chunk, by route (the metrics)."""
        self.identify = Identify(tokens)
        self.police = Police(keeper, limits or LimitKeeper(), client_ca=client_ca)
        self.route = Route(keys)
        self.record = Record(ledger, flood_window_s, on_first_chunk)
        self._max_in_flight = max_in_flight_per_caller
        self._in_flight: dict[str, int] = {}  # caller id -> requests past Identify and not yet answered

    async def run(
        self,
        request: Request,
        responder: Responder,
        endpoint: Endpoint,
        *,
        refusal: GatewayError | None = None,
    ) -> None:
        """Answer one request. ``refusal``: the dispatcher already knows it refuses it (404, 405)."""
        ex = Exchange(request, endpoint)
        try:
            ex.caller = self.identify(request)
        except GatewayError as error:
            # An outsider's 404 is sampled like its 401 (sampling); the 404 is what it is told.
            await self._refuse(ex, responder, refusal or error)
            return
        caller_id = ex.caller.id
        held = self._in_flight.get(caller_id, 0)
        self._in_flight[caller_id] = held + 1
        try:
            if held >= self._max_in_flight:
                busy = RateLimited(
                    f"this caller already has {held} requests in progress; retry when one has finished",
                    code="too_many_concurrent_requests",
                )
                await self._refuse(ex, responder, busy)
                return
            if refusal is not None:  # an identified caller's 404 or 405: recorded in full
                await self._refuse(ex, responder, refusal)
                return
            await self._run_identified(ex, request, responder, endpoint)
        finally:
            left = self._in_flight[caller_id] - 1
            if left:
                self._in_flight[caller_id] = left
            else:
                del self._in_flight[caller_id]

    async def _run_identified(
        self, ex: Exchange, request: Request, responder: Responder, endpoint: Endpoint
    ) -> None:
        try:
            ex.state = self.police.current()
            self.police.before_body(ex)
            if endpoint == "models":
                listing = self.police.models_listing(ex)
            else:
                body = await request.body()
                ex.request_sha256 = hashlib.sha256(body).hexdigest()
                self.police(ex, body)
        except GatewayError as error:
            await self._refuse(ex, responder, error)
            return
        try:
            if endpoint == "models":
                await self.record.listed(ex, listing)
            else:
                await self.record.admitted(ex)
        except BaseException as error:  # nothing was forwarded: give the reservation back
            self.police.release(ex)
            if not isinstance(error, LedgerUnavailable):
                raise
            await answer.send_error(ex, responder, error)
            return
        if endpoint == "models":
            await answer.send_json(responder, listing)
        else:
            await self._forward(ex, responder)

    async def _refuse(self, ex: Exchange, responder: Responder, error: GatewayError) -> None:
        try:
            await self.record.refused(ex, error)
        except LedgerUnavailable as ledger_error:
            error = ledger_error
        await answer.send_error(ex, responder, error)

    async def _forward(self, ex: Exchange, responder: Responder) -> None:
        """Route and answer. Whatever happens here, exactly one outcome record follows."""
        out = Outcome()
        handler = asyncio.current_task()
        # The client left: stop the upstream work. Only while forwarding: a late call must not cancel the
        # handler once it is past this phase.
        responder.on_disconnect(lambda: _stop_on_disconnect(out, handler))
        result: RouteResult | None = None
        try:
            result = await self.route(ex, lambda frm, to, error: self.record.fallback(ex, frm, to, error))
            out.status = result.status
            if result.stream is None:
                await answer.send_result(responder, result, out)
            else:
                await answer.relay_stream(ex, responder, result, out)
        except GatewayError as error:  # the route refused or failed before answering
            out.error = error
            await answer.send_error(ex, responder, error)
        except ClientDisconnected:
            out.detail = "client_closed"
        except asyncio.CancelledError:
            if not responder.disconnected:  # shutdown past its drain timeout
                out.error = Unavailable("the gateway stopped before the answer was complete", code="shutdown")
                raise
            out.detail = "client_closed"
            if handler is not None:
                handler.uncancel()
        except Exception:
            out.error = GatewayError("internal error")
            raise
        finally:
            out.watching = False
            if out.detail == "client_closed" and not responder.started:
                out.status = _CLIENT_CLOSED
            # Recorded before aclose(): a cancellation landing there must not skip the record.
            self.record.outcome(ex, out, result)
            self.police.settle(ex, result)
            if result is not None:
                with contextlib.suppress(Exception):
                    await result.aclose()


def _stop_on_disconnect(out: Outcome, handler: asyncio.Task[Any] | None) -> None:
    if out.watching and handler is not None:
        handler.cancel()
