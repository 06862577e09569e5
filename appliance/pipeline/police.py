"""Phase 2, Police: everything that decides on a request before anything is recorded or forwarded.

In order: the policy in force (none: 503, fail closed), the client certificate the caller's organization or
role requires (mutual TLS: 403 ``client_certificate_required`` or ``client_certificate_not_allowed``; the
role's rule, else the organization's), the body read as a request of its endpoint
(``facts``), the role's verdict (``PolicyEngine.evaluate``: allowed, or refused with the rule behind it),
the verdict's edits written into the forwarded body (model, dropped tools, clamped ``max_tokens``), and
admission under the role's limits and budgets, which reserves the request's estimated use (``limits``).
An embeddings request generates nothing: it has no completion limit to clamp, report or reserve.
The ticket of an admitted request is settled here too, with what the answer used.

Never: records anything (Record does), keeps the text it reads, or lets a refused request count against
a limit.
"""

from __future__ import annotations

import json

from appliance.errors import ClientCertificateDenied, NoPolicy, PolicyDenied
from appliance.identity import Caller
from appliance.pipeline.exchange import Exchange
from appliance.pipeline.facts import BodyFacts, apply_edits, parse_request, read_facts
from appliance.pipeline.limits import DEFAULT_MAX_TOKENS, LimitKeeper, Subject, Ticket
from appliance.policy.client_certificates import Certificate
from appliance.policy.engine import RequestFacts, Verdict
from appliance.policy_state import PolicyKeeper, PolicyState
from routes.pricing import cost_usd
from routes.result import RouteResult


class Police:
    def __init__(self, keeper: PolicyKeeper, limits: LimitKeeper, *, client_ca: bool = False) -> None:
        """``client_ca``: the listener asks clients for a certificate (``server.tls.client_ca_file`` is
        set); without it no caller can present one, and a refusal says which setting is missing."""
        self._keeper = keeper
        self.limits = limits
        self._client_ca = client_ca

    def current(self) -> PolicyState | None:
        """The policy in force as the request arrives (it may be swapped while the request runs)."""
        return self._keeper.current

    @staticmethod
    def require_state(state: PolicyState | None) -> PolicyState:
        if state is None:
            raise NoPolicy("no valid policy is in force on this gateway; every request is refused")
        return state

    def before_body(self, ex: Exchange) -> None:
        """What can be decided before the body is read: a policy in force, and the caller's rate limits (a
        limited caller must not hold a request slot while it sends, or dribbles, a body)."""
        state = self.require_state(ex.state)
        caller = ex.caller
        assert caller is not None
        self._check_client_certificate(ex, state, caller)
        role = state.engine.role(caller.org, caller.role)
        if role is not None and role.limits is not None:
            self.limits.check_rate(Subject(caller.id, caller.org, caller.role), role.limits)

    def __call__(self, ex: Exchange, body: bytes) -> None:
        """Decide on a model request: fills payload, model, verdict, its actions and its ticket."""
        state = self.require_state(ex.state)
        ex.payload, ex.model = parse_request(body, ex.endpoint)
        ex.model_label = state.engine.ledger_name(ex.model)  # caller text never reaches a record
        facts = read_facts(ex.payload, ex.endpoint, ex.request.headers.get("x-phi-data-class"))
        assert ex.caller is not None
        ex.verdict = verdict = self._verdict(state, ex.caller, ex.model, facts)
        generates = ex.endpoint != "embeddings"
        clamped = verdict.max_tokens if generates and verdict.max_tokens != facts.max_tokens else None
        apply_edits(ex.payload, model=verdict.model, drop_tools=verdict.drop_tools, max_tokens=clamped)
        ex.interventions = [
            action for action in verdict.interventions if generates or action.reason != "max_tokens_clamped"
        ]
        ex.ticket = self._admit(ex, state, facts, generates)

    def models_listing(self, ex: Exchange) -> bytes:
        """``GET /v1/models``: the models and aliases the caller's role may use, as an OpenAI list."""
        state = self.require_state(ex.state)
        assert ex.caller is not None
        org, role = ex.caller.org, ex.caller.role
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": model.split("/", 1)[0]}
            for model in state.engine.allowed_models(org, role)
        ]
        data += [  # aliases the role may use: an app can ask for "clinical-summary" by name
            {"id": alias, "object": "model", "created": 0, "owned_by": "alias"}
            for alias in state.engine.allowed_aliases(org, role)
        ]
        return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()

    def _check_client_certificate(self, ex: Exchange, state: PolicyState, caller: Caller) -> None:
        """The role's ``client_certificate`` rule (else its organization's) against the certificate the
        TLS handshake verified on this connection (decided by the engine, as ``policy explain`` shows)."""
        peer = ex.request.peer
        certificate = Certificate(
            presented=peer.cert_fingerprint is not None, subject=peer.cert_subject, client_ca=self._client_ca
        )
        refusal = state.engine.check_client_certificate(caller.org, caller.role, certificate)
        if refusal is not None:
            code, rule, message = refusal
            raise ClientCertificateDenied(message, code=code, rule=rule)

    @staticmethod
    def _verdict(state: PolicyState, caller: Caller, model: str, facts: BodyFacts) -> Verdict:
        verdict = state.engine.evaluate(
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
            raise PolicyDenied(verdict.message, code=verdict.reason, rule=verdict.rule)
        return verdict

    def _admit(self, ex: Exchange, state: PolicyState, facts: BodyFacts, generates: bool) -> Ticket | None:
        """Count the request against the role's limits and budgets, reserving its estimated use."""
        caller, verdict = ex.caller, ex.verdict
        assert caller is not None and verdict is not None
        role = state.engine.role(caller.org, caller.role)
        org = state.policy.organizations.get(caller.org)
        limits, budgets = (role.limits, role.budgets) if role else (None, None)
        org_budget = org.budgets if org else None
        if limits is None and budgets is None and org_budget is None:
            return None
        prompt_tokens = -(-facts.text_len // 4)
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

    def release(self, ex: Exchange) -> None:
        """Nothing was forwarded after all (the request record failed): give the reservation back."""
        if ex.ticket is not None:
            self.limits.settle(ex.ticket, tokens=0, cost_usd=0.0)

    def settle(self, ex: Exchange, result: RouteResult | None) -> None:
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
