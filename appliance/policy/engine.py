"""The decision engine: what may this (organization, role) send, where, and with which changes?

Owns: ``PolicyEngine``, built once per imported policy with every role's rules precompiled (model globs:
exact names in a dict, ``prefix*`` as ``startswith``, the rest as case-sensitive regexes; tool globs as one
regex; deny patterns compiled once; data classes as sets), so ``evaluate`` costs a few microseconds.
``evaluate(RequestFacts) -> Verdict`` applies the rules in a fixed order, one step each:

    policy expired -> role exists -> alias -> force_model -> model name -> route exists -> model allowed
    -> data class (declared or role default; downgrade; the route may receive it) -> tools (deny or drop)
    -> prompt (message count, length, deny patterns) -> max_tokens clamp -> fallbacks

The first step that refuses decides; every outcome names the rule behind it, and actions that still allow
the request are ``Intervention``s. Also: the listing for ``GET /v1/models`` and prices.

Must never: allow anything once the policy has expired, allow a model whose provider is not a defined
route, send a data class to a route that may not receive it, put another role's allow-list or a deny
pattern into a message a caller can see, or put prompt text into a message or an intervention.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from appliance.policy import client_certificates
from appliance.policy.client_certificates import Certificate
from appliance.policy.schema import (
    DATA_CLASS_RANK,
    Policy,
    Price,
    Role,
    RouteSpec,
    has_wildcard,
    scan_limit,
    split_model,
)
from appliance.timestamps import rfc3339

_MAX_ECHO = 80


REASONS = frozenset(
    {
        "allowed",
        "unknown_role",
        "model_not_allowed",
        "unknown_route",
        "bad_model_name",
        "policy_expired",
        "data_class_denied",
        "data_class_downgrade",
        "tools_denied",
        "prompt_denied",
        "too_many_messages",
        "prompt_too_long",
        "client_certificate_required",
        "client_certificate_not_allowed",
    }
)
"""Every ``Verdict.reason``."""
INTERVENTIONS = frozenset({"model_aliased", "model_forced", "tool_dropped", "max_tokens_clamped"})
"""Every ``Intervention.reason`` the engine emits (actions taken on a request that is still allowed)."""


@dataclass(frozen=True, slots=True)
class Intervention:
    reason: str
    """One of ``INTERVENTIONS``."""
    rule: str
    """Path of the rule that acted, e.g. ``organizations.stmarys.roles.billing.tools.allow``."""
    detail: str
    """What changed, safe for the audit record (names and numbers, never prompt text)."""


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the pipeline knows about a request before it is forwarded."""

    org: str
    role: str
    model: str
    """As requested: ``provider/model`` or an alias."""
    data_class: str | None = None
    """The ``X-Phi-Data-Class`` header as sent, or None (the role's default applies)."""
    tools: Sequence[str] = ()
    """Tool/function names the request carries."""
    messages_text_len: int = 0
    """Characters of message text, all messages together (checked against ``max_chars``)."""
    message_count: int = 0
    text: str = ""
    """The concatenated message text, complete (never pre-truncated): deny patterns search it, and text
    longer than the role's scan limit is denied."""
    max_tokens: int | None = None
    """The completion-token limit the request asks for, or None."""
    certificate: Certificate | None = None
    """The connection's client certificate, when the decision should include the ``client_certificate``
    rule (the pipeline checks that rule before the body, with ``check_client_certificate``)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str
    """One of ``REASONS``."""
    rule: str | None
    """Path of the rule that decided, e.g. ``organizations.stmarys.roles.billing.tools.allow``."""
    message: str
    """Safe to show the caller."""
    model: str
    """The ``provider/model`` to use, after alias and force (as requested when refused before those)."""
    route_name: str | None
    route: RouteSpec | None
    upstream_model: str | None
    """The model part after ``provider/``, as the route should receive it."""
    data_class: str
    """The effective class: declared, or the role's default."""
    drop_tools: list[str] = field(default_factory=list)
    """Tools to remove from the request before forwarding (``on_violation: drop``)."""
    max_tokens: int | None = None
    """The limit to forward, after the role's clamp."""
    interventions: list[Intervention] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    """Ordered alternatives this role may use whose route may receive ``data_class``."""


def _matcher(glob: str) -> Callable[[str], object]:
    body = glob[:-1]
    if glob.endswith("*") and not has_wildcard(body):
        return lambda model: model.startswith(body)
    return re.compile(fnmatch.translate(glob)).match  # translate anchors at the end; match anchors the start


class _RoleRules:
    """One role's rules, compiled once per policy."""

    __slots__ = (
        "allowed_classes",
        "default_class",
        "deny",
        "downgrade_rule",
        "exact",
        "fallback_cache",
        "force",
        "force_rule",
        "max_chars",
        "max_messages",
        "max_tokens",
        "name",
        "path",
        "patterns",
        "role",
        "rules",
        "scan_limit",
        "tool_drop",
        "tool_exact",
        "tool_match",
    )

    def __init__(self, role: Role, path: str, name: str) -> None:
        self.role = role
        self.path = path
        self.name = name
        exact: dict[str, int] = {}
        patterns = []
        for i, glob in enumerate(role.models):
            if has_wildcard(glob):
                patterns.append((i, _matcher(glob)))
            else:
                exact.setdefault(glob, i)
        self.rules = tuple(f"{path}.models[{i}]" for i in range(len(role.models)))
        """``organizations.<org>.roles.<role>.models[i]`` for each glob, built once."""
        self.exact = exact
        self.patterns: tuple[tuple[int, Callable[[str], object]], ...] = tuple(patterns)

        self.default_class = role.default_data_class
        floor = DATA_CLASS_RANK[role.default_data_class]
        self.allowed_classes = frozenset(
            {c for c, rank in DATA_CLASS_RANK.items() if rank >= floor}
            | set(role.declarable_data_classes or ())
        )
        self.downgrade_rule = (
            f"{path}.declarable_data_classes"
            if role.declarable_data_classes is not None
            else f"{path}.default_data_class"
        )
        self.force = role.force_model
        self.force_rule = f"{path}.force_model"

        tools = role.tools
        self.tool_exact: frozenset[str] | None = None
        self.tool_match: Callable[[str], object] | None = None
        self.tool_drop = tools is not None and tools.on_violation == "drop"
        if tools is not None:
            self.tool_exact = frozenset(g for g in tools.allow if not has_wildcard(g))
            wild = [fnmatch.translate(g) for g in tools.allow if has_wildcard(g)]
            if wild:
                self.tool_match = re.compile("|".join(f"(?:{w})" for w in wild)).match

        prompt = role.prompt
        self.max_messages = prompt.max_messages if prompt else None
        self.max_chars = prompt.max_chars if prompt else None
        self.max_tokens = prompt.max_tokens if prompt else None
        self.scan_limit = scan_limit(prompt) if prompt else 0
        self.deny: tuple[tuple[str, str, Callable[[str], object]], ...] = tuple(
            (f"{path}.prompt.deny_patterns[{i}]", dp.id, re.compile(dp.pattern).search)
            for i, dp in enumerate(prompt.deny_patterns if prompt else ())
        )
        self.fallback_cache: dict[tuple[str, str], tuple[str, ...]] = {}

    def first_match(self, model: str) -> int | None:
        """Index of the first glob (in policy order) matching ``model``."""
        best = self.exact.get(model)
        for i, match in self.patterns:
            if best is not None and i > best:
                break
            if match(model):
                return i
        return best

    def tool_allowed(self, tool: str) -> bool:
        assert self.tool_exact is not None
        return tool in self.tool_exact or (self.tool_match is not None and bool(self.tool_match(tool)))


_Refusal = tuple[str, str | None, str]
"""A step's refusal: ``(reason, rule, message)``, as the refused ``Verdict`` carries them."""
_UNKNOWN_ROLE: _Refusal = ("unknown_role", None, "this token's organization and role are not in the policy")


class _Draft:
    """The verdict one ``evaluate`` is building: each step reads the request and fills in its rule's part.

    ``rules`` is set once the role is known, ``provider`` and ``upstream`` once the model name parses;
    only the steps after those read them.
    """

    __slots__ = (
        "data_class",
        "drop_tools",
        "facts",
        "fallbacks",
        "interventions",
        "max_tokens",
        "model",
        "provider",
        "route",
        "route_name",
        "rule",
        "rules",
        "upstream",
        "upstream_model",
    )
    rules: _RoleRules
    provider: str
    upstream: str
    """The model name's two parts; ``route_name``, ``route`` and ``upstream_model`` stay None until the
    provider is found to be a route."""

    def __init__(self, facts: RequestFacts) -> None:
        self.facts = facts
        self.model = facts.model
        declared = facts.data_class
        # The strictest class until the role (and so its default) is known.
        self.data_class = declared if declared is not None and declared in DATA_CLASS_RANK else "phi"
        self.route_name: str | None = None
        self.route: RouteSpec | None = None
        self.upstream_model: str | None = None
        self.rule = ""
        self.interventions: list[Intervention] = []
        self.drop_tools: list[str] = []
        self.max_tokens = facts.max_tokens
        self.fallbacks: tuple[str, ...] = ()

    def refused(self, refusal: _Refusal) -> Verdict:
        """Refused: what was resolved so far; nothing dropped, clamped or offered instead."""
        reason, rule, message = refusal
        return Verdict(
            allowed=False,
            reason=reason,
            rule=rule,
            message=message,
            model=self.model,
            route_name=self.route_name,
            route=self.route,
            upstream_model=self.upstream_model,
            data_class=self.data_class,
            drop_tools=[],
            max_tokens=self.facts.max_tokens,
            interventions=self.interventions,
            fallbacks=[],
        )

    def allowed(self) -> Verdict:
        return Verdict(
            allowed=True,
            reason="allowed",
            rule=self.rule,
            message=f"allowed by {self.rule}",
            model=self.model,
            route_name=self.route_name,
            route=self.route,
            upstream_model=self.upstream_model,
            data_class=self.data_class,
            drop_tools=self.drop_tools,
            max_tokens=self.max_tokens,
            interventions=self.interventions,
            fallbacks=list(self.fallbacks),
        )


class PolicyEngine:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.version = policy.version
        self.expires_at = policy.expires_at
        self._expires_ts = policy.expires_at.timestamp()
        self._routes = dict(policy.routes)
        self._route_classes = {name: frozenset(r.data_classes) for name, r in policy.routes.items()}
        self._roles: dict[tuple[str, str], _RoleRules] = {
            (org_name, role_name): _RoleRules(role, f"organizations.{org_name}.roles.{role_name}", role_name)
            for org_name, org in policy.organizations.items()
            for role_name, role in org.roles.items()
        }
        self._aliases = {alias: (target, f"aliases.{alias}") for alias, target in policy.aliases.items()}
        self._fallbacks = {model: tuple(alts) for model, alts in policy.fallbacks.items()}
        self._named = frozenset(
            {*policy.pricing, *policy.models, *policy.aliases, *policy.aliases.values(), *policy.fallbacks}
            | {alt for alts in policy.fallbacks.values() for alt in alts}
            | {name for rules in self._roles.values() for name in (*rules.exact, rules.force) if name}
        )
        self._expired: _Refusal = (
            "policy_expired",
            "expires_at",
            f"the policy in force (v{policy.version}) expired at {rfc3339(policy.expires_at, seconds=True)}",
        )

    def ledger_name(self, model: str) -> str:
        """What a record may say of a requested model: the name if the policy itself names it (a price, a
        local model, an alias, a fallback, a literal role entry), else its length and digest. A name that
        only matches a glob (``openai/*``) is caller text, and caller text may be PHI: append-only rows
        cannot be purged of it."""
        return model if model in self._named else unnamed(model)

    def role(self, org: str, role: str) -> Role | None:
        rules = self._roles.get((org, role))
        return None if rules is None else rules.role

    def evaluate(self, facts: RequestFacts, now: float | None = None) -> Verdict:
        """The whole Police decision for one request: the module docstring's rules, in its order.

        Each step applies one rule to the draft; the first that returns a refusal decides.
        """
        draft = _Draft(facts)
        refusal = self._check_expiry(now) or self._check_role(draft)
        if refusal is None and facts.certificate is not None:
            refusal = self.check_client_certificate(facts.org, facts.role, facts.certificate)
        if refusal is None:
            self._resolve_alias(draft)
            self._force_model(draft)
            refusal = (
                self._check_model_name(draft)
                or self._check_route(draft)
                or self._check_model_allowed(draft)
                or self._check_data_class(draft)
                or self._screen_tools(draft)
                or self._screen_prompt(draft)
            )
        if refusal is not None:
            return draft.refused(refusal)
        self._clamp_max_tokens(draft)
        self._choose_fallbacks(draft)
        return draft.allowed()

    def check_client_certificate(self, org: str, role: str, certificate: Certificate) -> _Refusal | None:
        """The role's ``client_certificate`` rule (else its organization's) against the certificate the
        connection's TLS handshake verified: None when it passes (or neither has a rule)."""
        return client_certificates.check(self.policy, org, role, certificate)

    def _check_expiry(self, now: float | None) -> _Refusal | None:
        if (time.time() if now is None else now) >= self._expires_ts:
            return self._expired
        return None

    def _check_role(self, draft: _Draft) -> _Refusal | None:
        """The caller's role must exist; an undeclared (or unknown) data class becomes its default."""
        facts = draft.facts
        rules = self._roles.get((facts.org, facts.role))
        if rules is None:
            return _UNKNOWN_ROLE
        draft.rules = rules
        if facts.data_class not in DATA_CLASS_RANK:
            draft.data_class = rules.default_class
        return None

    def _resolve_alias(self, draft: _Draft) -> None:
        alias = self._aliases.get(draft.model)
        if alias is not None:
            draft.model, rule = alias
            draft.interventions.append(
                Intervention("model_aliased", rule, f"{draft.facts.model} -> {draft.model}")
            )

    def _force_model(self, draft: _Draft) -> None:
        rules, model = draft.rules, draft.model
        force = rules.force
        if force is not None and model != force:
            # The requested text may be anything the caller typed: name it only if it is a model name.
            asked = self.ledger_name(model)
            draft.interventions.append(Intervention("model_forced", rules.force_rule, f"{asked} -> {force}"))
            draft.model = force

    def _check_model_name(self, draft: _Draft) -> _Refusal | None:
        """The model must be a ``provider/model`` name."""
        parts = split_model(draft.model)
        if parts is None:
            message = f"model {_echo(draft.model)} is not a 'provider/model' name (e.g. 'local/demo')"
            return "bad_model_name", None, message
        draft.provider, draft.upstream = parts
        return None

    def _check_route(self, draft: _Draft) -> _Refusal | None:
        """The provider must be a route the policy defines."""
        route = self._routes.get(draft.provider)
        if route is None:
            return "unknown_route", None, f"no route named {_echo(draft.provider)} in the policy"
        draft.route_name, draft.route, draft.upstream_model = draft.provider, route, draft.upstream
        return None

    def _check_model_allowed(self, draft: _Draft) -> _Refusal | None:
        """The role must allow the model: the first of its globs, in policy order, to match is the rule."""
        rules = draft.rules
        index = rules.first_match(draft.model)
        if index is None:
            message = f"model {_echo(draft.model)} is not allowed for role {rules.name!r}"
            return "model_not_allowed", f"{rules.path}.models", message
        draft.rule = rules.rules[index]
        return None

    def _check_data_class(self, draft: _Draft) -> _Refusal | None:
        """A declared class must be one the role may declare; the route must be able to receive the class."""
        rules, declared = draft.rules, draft.facts.data_class
        if declared is not None and declared not in rules.allowed_classes:
            if declared not in DATA_CLASS_RANK:
                message = f"data class {_echo(declared)} is not one of phi, deidentified, public"
                return "data_class_denied", None, message
            message = (
                f"role {rules.name!r} may not declare data class {declared!r} "
                f"(its default is {rules.default_class!r})"
            )
            return "data_class_downgrade", rules.downgrade_rule, message
        provider = draft.provider
        if draft.data_class not in self._route_classes[provider]:
            message = f"route {provider!r} may not receive {draft.data_class} data"
            return "data_class_denied", f"routes.{provider}.data_classes", message
        return None

    def _screen_tools(self, draft: _Draft) -> _Refusal | None:
        """Tools outside the role's list deny the request, or are dropped from it (``on_violation: drop``)."""
        rules, tools = draft.rules, draft.facts.tools
        if not tools or rules.tool_exact is None:
            return None
        outside = [t for t in tools if not rules.tool_allowed(t)]
        if not outside:
            return None
        rule = f"{rules.path}.tools.allow"
        if not rules.tool_drop:
            return "tools_denied", rule, f"tool {_echo(outside[0])} is not allowed for role {rules.name!r}"
        draft.drop_tools = outside
        # Tool names are caller text (the record must not carry them): the count and the rule say enough.
        draft.interventions.append(Intervention("tool_dropped", rule, f"dropped {len(outside)} tool(s)"))
        return None

    def _screen_prompt(self, draft: _Draft) -> _Refusal | None:
        """Message count, then length, then the deny patterns over text no longer than the scan limit."""
        rules, facts = draft.rules, draft.facts
        if rules.max_messages is not None and facts.message_count > rules.max_messages:
            message = (
                f"the request has {facts.message_count} messages; role {rules.name!r} allows "
                f"{rules.max_messages}"
            )
            return "too_many_messages", f"{rules.path}.prompt.max_messages", message
        if rules.max_chars is not None and facts.messages_text_len > rules.max_chars:
            message = (
                f"the request has {facts.messages_text_len} characters of message text; role "
                f"{rules.name!r} allows {rules.max_chars}"
            )
            return "prompt_too_long", f"{rules.path}.prompt.max_chars", message
        if not rules.deny:
            return None
        text = facts.text
        if len(text) > rules.scan_limit:
            message = (
                f"the request has {len(text)} characters of message text; role {rules.name!r} "
                f"screens at most {rules.scan_limit}"
            )
            return "prompt_too_long", f"{rules.path}.prompt.deny_patterns", message
        for rule, pattern_id, search in rules.deny:
            if search(text):
                return (
                    "prompt_denied",
                    rule,
                    f"the request matches deny pattern {pattern_id!r} of role {rules.name!r}",
                )
        return None

    def _clamp_max_tokens(self, draft: _Draft) -> None:
        rules, asked = draft.rules, draft.max_tokens
        cap = rules.max_tokens
        if cap is not None and (asked is None or asked > cap):
            detail = f"{'unset' if asked is None else asked} -> {cap}"
            draft.interventions.append(
                Intervention("max_tokens_clamped", f"{rules.path}.prompt.max_tokens", detail)
            )
            draft.max_tokens = cap

    def _choose_fallbacks(self, draft: _Draft) -> None:
        """The model's fallbacks that the role may use and whose route may receive the data class."""
        model = draft.model
        if model not in self._fallbacks:
            return
        rules, key = draft.rules, (model, draft.data_class)
        cached = rules.fallback_cache.get(key)
        if cached is None:
            cached = tuple(
                alt
                for alt in self._fallbacks[model]
                if rules.first_match(alt) is not None
                and draft.data_class in self._route_classes[alt.partition("/")[0]]
            )
            rules.fallback_cache[key] = cached  # bounded: keys come from the policy's fallbacks
        draft.fallbacks = cached

    def allowed_aliases(self, org: str, role: str, *, now: float | None = None) -> list[str]:
        """Alias names whose target the role may use (for ``GET /v1/models``)."""
        rules = self._roles.get((org, role))
        if rules is None or (time.time() if now is None else now) >= self._expires_ts:
            return []
        return sorted(a for a, (target, _) in self._aliases.items() if rules.first_match(target) is not None)

    def allowed_models(self, org: str, role: str, *, now: float | None = None) -> list[str]:
        """Concrete ``provider/model`` names the role may use: local models, literal globs, priced models."""
        rules = self._roles.get((org, role))
        if rules is None or (time.time() if now is None else now) >= self._expires_ts:
            return []
        literals = (g for g in rules.role.models if not has_wildcard(g))
        candidates = {*self.policy.models, *self.policy.pricing, *literals}
        return sorted(
            m
            for m in candidates
            if (parts := split_model(m)) is not None
            and parts[0] in self._routes
            and rules.first_match(m) is not None
        )

    def price(self, model: str) -> Price | None:
        return self.policy.pricing.get(model)


def unnamed(model: str) -> str:
    """A requested model name the policy does not define, as a record may show it: length and digest."""
    digest = hashlib.sha256(model.encode("utf-8", "replace")).hexdigest()[:16]
    return f"[model not named by the policy: {len(model)} chars, sha256:{digest}]"


def _echo(text: str) -> str:
    return repr(text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "...")
