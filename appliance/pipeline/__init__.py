"""The four phases every model request passes, in order: Identify, Police, Route, Record.

    Identify   the bearer token -> Caller(id, org, role)                          401 / 403
    Police     the role's policy decides on the model                             403 (intervention)
    Record     the request record is durable in the ledger BEFORE anything leaves  503 if it cannot be
    Route      provider/model -> adapter; the caller's token is replaced by the sealed provider key
    Record     the outcome record (response or error) follows the answer

Each phase is a small object with one method; ``Pipeline.run`` is the only place that chains them, top to
bottom, and nothing reaches around it. Refusals are recorded too, durably, before the caller hears of them,
so every request that got an answer has its record; when the ledger cannot be written the answer is 503.
Never: records prompt or completion text (only SHA-256 of the bodies); lets a token or provider key reach a
record, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from appliance.errors import (
    BadRequest,
    ClientDisconnected,
    GatewayError,
    LedgerUnavailable,
    LimitReached,
    NoPolicy,
    OperatorError,
    PolicyDenied,
    RateLimited,
    StorageUnavailable,
    Unavailable,
    UpstreamError,
)
from appliance.http import Request, Responder
from appliance.identity import Caller, TokenStore
from appliance.ledger.store import Ledger
from appliance.limits import DEFAULT_MAX_TOKENS, LimitKeeper, Subject, Ticket
from appliance.pipeline.facts import BodyFacts, apply_edits, read_facts
from appliance.policy.engine import RequestFacts, Verdict
from appliance.policy.schema import split_model
from appliance.policy_state import PolicyKeeper, PolicyState
from appliance.vault.provider_keys import ProviderKeys
from routes.pricing import cost_usd
from routes.result import RouteResult

log = logging.getLogger("phi.pipeline")

Endpoint = Literal["chat", "messages", "completions", "embeddings"]
_METHODS: dict[str, str] = {
    "chat": "chat_completions",
    "messages": "messages",
    "completions": "completions",
    "embeddings": "embeddings",
}
ErrorRenderer = Callable[[GatewayError], bytes]

_SSE_HEADERS = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")]
_JSON = b"application/json"
_CLIENT_CLOSED = 499  # the client went away before any answer (nginx's convention; never sent)


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
    ticket: Ticket | None = None
    served: str | None = None  # the provider/model that answered (a fallback's, if one did)
    request_sha256: str | None = None

    def base_record(self, type_: str) -> dict[str, Any]:
        caller, verdict, state = self.caller, self.verdict, self.state
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
        }


# -- the phases ------------------------------------------------------------------------------------------


class Identify:
    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    def __call__(self, request: Request) -> Caller:
        headers = request.headers
        return self._tokens.authenticate(headers.get("authorization"), headers.get("x-api-key"))


class Police:
    def __call__(self, state: PolicyState | None, caller: Caller, model: str, facts: BodyFacts) -> Verdict:
        verdict = self.require_state(state).engine.evaluate(
            RequestFacts(
                org=caller.org,
                role=caller.role,
                model=model,
                data_class=facts.data_class,
                tools=facts.tools,
                messages_text_len=facts.text_len,
                message_count=facts.message_count,
                text=facts.text,
                max_tokens=facts.max_tokens,
            )
        )
        if not verdict.allowed:
            raise _Denied(verdict)
        return verdict

    @staticmethod
    def require_state(state: PolicyState | None) -> PolicyState:
        if state is None:
            raise NoPolicy("no valid policy is in force on this gateway; every request is refused")
        return state


class Route:
    def __init__(self, keys: ProviderKeys) -> None:
        self._keys = keys

    async def __call__(
        self, ex: Exchange, on_fallback: Callable[[str, str, GatewayError], None]
    ) -> RouteResult:
        """Serve the verdict's model; if its route is busy or down before answering, the next fallback."""
        assert ex.verdict is not None
        models = [ex.verdict.model, *ex.verdict.fallbacks]
        for index, model in enumerate(models):
            try:
                result = await self._serve(ex, model)
            except (RateLimited, UpstreamError, Unavailable) as error:
                if index + 1 == len(models):
                    raise
                on_fallback(model, models[index + 1], error)
                continue
            ex.served = model
            return result
        raise AssertionError("unreachable: the last model's error is raised")

    async def _serve(self, ex: Exchange, model: str) -> RouteResult:
        assert ex.state is not None and ex.payload is not None
        route, upstream_model = ex.state.routes.resolve(model)
        spec = ex.state.policy.routes.get(route.name)
        key = None if spec is None or spec.auth == "none" else self._sealed_key(route.name)
        role = ex.state.engine.role(ex.caller.org, ex.caller.role) if ex.caller else None
        serve = getattr(route, _METHODS[ex.endpoint])
        result: RouteResult = await serve(
            ex.payload, upstream_model=upstream_model, key=key, priority=role.priority if role else 0
        )
        return result

    def _sealed_key(self, name: str) -> str | None:
        try:
            return self._keys.get(name)
        except OperatorError as exc:  # wrong master key or an altered vault row: an operator must look
            log.error("the sealed provider key for route %s cannot be opened", name)
            message = f"the provider key for route {name} cannot be unsealed"
            raise GatewayError(message, code="vault_error") from exc


class Record:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def admitted(self, ex: Exchange) -> None:
        """The request record, and one record per policy action taken on it; durable before forwarding."""
        record = ex.base_record("request")
        record["decision"] = "allowed"
        record["intervention"] = None
        actions = [
            action
            for action in (ex.verdict.interventions if ex.verdict else [])
            if not (ex.endpoint == "embeddings" and action.reason == "max_tokens_clamped")
        ]
        if not actions:
            await self._durable(record)
            return
        records = [record]
        for action in actions:
            acted = ex.base_record("intervention")
            acted.update(
                decision="allowed", intervention=action.reason, rule=action.rule, detail=action.detail
            )
            records.append(acted)
        await self._durable_all(records)

    async def refused(self, ex: Exchange, error: GatewayError) -> None:
        """A refusal, durable before the caller is told."""
        denied = isinstance(error, _Denied | LimitReached)
        record = ex.base_record("intervention" if denied else "error")
        record["decision"] = "denied"
        record["status_code"] = error.status
        record["detail"] = error.code  # for a policy refusal, the verdict's reason
        record["intervention"] = None
        if isinstance(error, _Denied):
            record["intervention"] = _DENIALS.get(error.code, "policy_denied")
            record["rule"] = error.verdict.rule
        elif isinstance(error, LimitReached):
            record["intervention"] = error.code  # rate_limited or budget_exceeded
            record["rule"] = error.rule
        await self._durable(record)

    def fallback(self, ex: Exchange, frm: str, to: str, error: GatewayError) -> None:
        """A route failed before answering and the next allowed one is tried: recorded as it happens."""
        record = ex.base_record("intervention")
        primary = ex.verdict.model if ex.verdict else frm
        position = ex.verdict.fallbacks.index(to) if ex.verdict and to in ex.verdict.fallbacks else 0
        record.update(
            decision="allowed",
            intervention="fallback",
            rule=f"fallbacks.{primary}[{position}]",
            detail=f"{frm} -> {to} after {error.code}",
            status_code=error.status,
        )
        self._ledger.append(record, lazy=True).add_done_callback(_log_failed_outcome)

    async def listed(self, ex: Exchange, body: bytes) -> None:
        """A models listing: one record, durable before the answer."""
        record = ex.base_record("response")
        record["decision"] = "allowed"
        record["status_code"] = 200
        record["intervention"] = None
        record["response_sha256"] = hashlib.sha256(body).hexdigest()
        record["detail"] = "models_list"
        await self._durable(record)

    def outcome(self, ex: Exchange, out: _Outcome, result: RouteResult | None) -> None:
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
        self._ledger.append(record, lazy=True).add_done_callback(_log_failed_outcome)

    async def _durable(self, record: dict[str, Any]) -> None:
        await self._durable_all([record])

    async def _durable_all(self, records: list[dict[str, Any]]) -> None:
        try:
            await asyncio.gather(*(self._ledger.append(record) for record in records))
        except (StorageUnavailable, LedgerUnavailable) as exc:
            raise LedgerUnavailable(
                "the audit ledger cannot be written; the gateway refuses traffic until it can"
            ) from exc


class _Denied(PolicyDenied):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message, code=verdict.reason)
        self.verdict = verdict


# A refusal's intervention, from the verdict's reason (the rest are "policy_denied").
_DENIALS = {
    "data_class_denied": "data_class_denied",
    "data_class_downgrade": "data_class_denied",
    "tools_denied": "tool_denied",
    "prompt_denied": "prompt_denied",
    "too_many_messages": "prompt_denied",
    "prompt_too_long": "prompt_denied",
}


# -- the chain -------------------------------------------------------------------------------------------


class Pipeline:
    def __init__(
        self,
        tokens: TokenStore,
        keys: ProviderKeys,
        ledger: Ledger,
        keeper: PolicyKeeper,
        limits: LimitKeeper | None = None,
    ) -> None:
        self.identify = Identify(tokens)
        self.police = Police()
        self.limits = limits or LimitKeeper()
        self.route = Route(keys)
        self.record = Record(ledger)
        self._keeper = keeper

    async def run(
        self, request: Request, responder: Responder, endpoint: Endpoint, render: ErrorRenderer
    ) -> None:
        ex = Exchange(request, endpoint)
        try:
            ex.caller = self.identify(request)
            ex.state = self._keeper.current
            body = await request.body()
            ex.request_sha256 = hashlib.sha256(body).hexdigest()
            ex.payload, ex.model = _parse_request(body, endpoint)
            ex.model_label = _model_label(ex.model)
            facts = read_facts(ex.payload, request.headers.get("x-phi-data-class"))
            ex.verdict = verdict = self.police(ex.state, ex.caller, ex.model, facts)
            if ex.state is not None and ex.model in ex.state.policy.aliases:
                ex.model_label = ex.model  # a name the policy defines, not caller text
            clamped = verdict.max_tokens if verdict.max_tokens != facts.max_tokens else None
            if endpoint == "embeddings":  # nothing is generated: no completion limit to clamp or reserve
                clamped = None
            apply_edits(ex.payload, model=verdict.model, drop_tools=verdict.drop_tools, max_tokens=clamped)
            ex.ticket = self._admit(ex, facts)
        except GatewayError as error:
            await self.refuse(ex, responder, error, render)
            return
        try:
            await self.record.admitted(ex)
        except BaseException as error:  # nothing was forwarded: give the reservation back
            if ex.ticket is not None:
                self.limits.settle(ex.ticket, tokens=0, cost_usd=0.0)
            if not isinstance(error, LedgerUnavailable):
                raise
            await _send_error(ex, responder, error, render)
            return
        await self._forward(ex, responder, render)

    def _admit(self, ex: Exchange, facts: BodyFacts) -> Ticket | None:
        """Count the request against the role's limits and budgets, reserving its estimated use."""
        state, caller, verdict = ex.state, ex.caller, ex.verdict
        assert state is not None and caller is not None and verdict is not None
        role = state.engine.role(caller.org, caller.role)
        org = state.policy.organizations.get(caller.org)
        limits, budgets = (role.limits, role.budgets) if role else (None, None)
        org_budget = org.budgets if org else None
        if limits is None and budgets is None and org_budget is None:
            return None
        prompt_tokens = -(-facts.text_len // 4)
        generates = ex.endpoint != "embeddings"
        completion = (
            (verdict.max_tokens if verdict.max_tokens is not None else DEFAULT_MAX_TOKENS) if generates else 0
        )
        # Reserve what the dearest model that may answer would cost: a fallback must not escape the budget.
        cost = max(
            cost_usd(state.engine.price(model), prompt_tokens, completion)
            for model in (verdict.model, *verdict.fallbacks)
        )
        return self.limits.admit(
            Subject(caller.id, caller.org, caller.role),
            limits,
            budgets,
            org_budget,
            estimated_tokens=prompt_tokens + completion,
            estimated_cost_usd=cost,
        )

    async def refuse(
        self, ex: Exchange, responder: Responder, error: GatewayError, render: ErrorRenderer
    ) -> None:
        try:
            await self.record.refused(ex, error)
        except LedgerUnavailable as ledger_error:
            error = ledger_error
        await _send_error(ex, responder, error, render)

    async def _forward(self, ex: Exchange, responder: Responder, render: ErrorRenderer) -> None:
        """Route and answer. Whatever happens here, exactly one outcome record follows."""
        out = _Outcome()
        handler = asyncio.current_task()
        # The client left: stop the upstream work. Only while forwarding: a late call must not cancel the
        # handler once it is past this phase.
        responder.on_disconnect(lambda: _stop_on_disconnect(out, handler))
        result: RouteResult | None = None
        try:
            result = await self.route(ex, lambda frm, to, error: self.record.fallback(ex, frm, to, error))
            out.status = result.status
            if result.stream is None:
                await self._answer(ex, responder, result, out)
            else:
                await self._stream(ex, responder, result, render, out)
        except GatewayError as error:  # the route refused or failed before answering
            out.error = error
            await _send_error(ex, responder, error, render)
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
            self._settle(ex, result)
            if result is not None:
                with contextlib.suppress(Exception):
                    await result.aclose()

    def _settle(self, ex: Exchange, result: RouteResult | None) -> None:
        """Replace the request's reservation with what it used (a stream: what it used until now)."""
        if ex.ticket is None:
            return
        if result is not None and not result.usage.reported:  # an answer whose usage is unknown: the estimate
            self.limits.settle(ex.ticket, tokens=ex.ticket.tokens, cost_usd=ex.ticket.cost_usd)
            return
        tokens_in, tokens_out = (result.usage.tokens_in, result.usage.tokens_out) if result else (0, 0)
        served = ex.served or (ex.verdict.model if ex.verdict else None)
        price = ex.state.engine.price(served) if ex.state and served else None
        self.limits.settle(
            ex.ticket, tokens=tokens_in + tokens_out, cost_usd=cost_usd(price, tokens_in, tokens_out)
        )

    async def _answer(self, ex: Exchange, responder: Responder, result: RouteResult, out: _Outcome) -> None:
        body = result.body or b""
        out.digest = hashlib.sha256(body).hexdigest()
        headers = [(b"Content-Type", result.content_type or _JSON), _request_id(ex), *result.extra_headers]
        await responder.send(result.status, headers, body)

    async def _stream(
        self, ex: Exchange, responder: Responder, result: RouteResult, render: ErrorRenderer, out: _Outcome
    ) -> None:
        assert result.stream is not None
        digest = hashlib.sha256()
        try:
            await responder.start(result.status, [*_SSE_HEADERS, _request_id(ex), *result.extra_headers])
            async for chunk in result.stream:
                digest.update(chunk)
                await responder.write(chunk)
            await responder.end()
        except GatewayError as exc:  # the upstream failed mid-stream: tell the caller in-band, then end
            out.error = exc
            frame = b"event: error\ndata: " if ex.endpoint == "messages" else b"data: "
            with contextlib.suppress(ClientDisconnected):
                await responder.write(frame + render(exc) + b"\n\n")
                await responder.end()
        finally:
            out.digest = digest.hexdigest()


@dataclass(slots=True)
class _Outcome:
    """What the forwarding phase learnt, for the one outcome record."""

    status: int = 0
    digest: str | None = None
    error: GatewayError | None = None
    detail: str | None = None
    watching: bool = True


def _stop_on_disconnect(out: _Outcome, handler: asyncio.Task[Any] | None) -> None:
    if out.watching and handler is not None:
        handler.cancel()


# -- helpers ---------------------------------------------------------------------------------------------


def _parse_request(body: bytes, endpoint: Endpoint) -> tuple[dict[str, Any], str]:
    if not body:
        raise BadRequest("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "'model' is required: a string 'provider/model'", param="model", code="missing_model"
        )
    if endpoint in ("chat", "messages"):
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "'messages' must be a non-empty array", param="messages", code="invalid_messages"
            )
    elif endpoint == "completions":
        if not _text_or_texts(payload.get("prompt")):
            raise BadRequest("'prompt' must be a string or an array of strings", param="prompt")
    elif not _text_or_texts(payload.get("input")):
        raise BadRequest("'input' must be a non-empty string or array of strings", param="input")
    if not isinstance(payload.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    return payload, model


def _text_or_texts(value: object) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _model_label(model: str) -> str:
    # The caller writes this field: anything that is not a provider/model name may be pasted text (PHI),
    # so the ledger gets its length and digest instead.
    if split_model(model) is not None:
        return model
    return (
        f"[invalid model name: {len(model)} chars, sha256:{hashlib.sha256(model.encode()).hexdigest()[:16]}]"
    )


def _role_data_class(state: PolicyState | None, caller: Caller | None) -> str | None:
    if state is None or caller is None:
        return None
    role = state.engine.role(caller.org, caller.role)
    return role.default_data_class if role else None


def _request_id(ex: Exchange) -> tuple[bytes, bytes]:
    return (b"X-Request-Id", ex.request.request_id.encode())


async def _send_error(ex: Exchange, responder: Responder, error: GatewayError, render: ErrorRenderer) -> None:
    if responder.started or responder.disconnected:
        return
    headers = [(b"Content-Type", _JSON), _request_id(ex), *error.headers]
    with contextlib.suppress(ClientDisconnected):
        await responder.send(error.status, headers, render(error))


def _log_failed_outcome(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("an outcome record could not be written: %s", fut.exception())
