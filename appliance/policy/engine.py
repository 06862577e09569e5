"""The decision engine: what may this (organization, role) send, where, and with which changes?

Owns: ``PolicyEngine``, built once per imported policy with every role's rules precompiled (model globs:
exact names in a dict, ``prefix*`` as ``startswith``, the rest as case-sensitive regexes; tool globs as one
regex; deny patterns compiled once; data classes as sets), so ``evaluate`` costs a few microseconds.
``evaluate(RequestFacts) -> Verdict`` runs the checks in a fixed order:

    policy expired -> role exists -> alias -> force_model -> model name -> route exists -> model allowed
    -> data class (declared or role default; downgrade; the route may receive it) -> tools (deny or drop)
    -> prompt (message count, length, deny patterns) -> max_tokens clamp -> fallbacks

and names the rule behind each outcome; actions that still allow the request are ``Intervention``s.
Also: ``decide`` (the model allow-list alone, kept for callers of the spine), the listing for
``GET /v1/models`` and prices.

Must never: allow anything once the policy has expired, allow a model whose provider is not a defined
route, send a data class to a route that may not receive it, put another role's allow-list or a deny
pattern into a message a caller can see, or put prompt text into a message or an intervention.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel

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
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    """One of: allowed, unknown_role, model_not_allowed, unknown_route, bad_model_name, policy_expired."""
    rule: str | None
    """Path of the glob that matched, e.g. ``organizations.stmarys.roles.radiology.models[1]``."""
    route_name: str | None
    route: RouteSpec | None
    upstream_model: str | None
    """The model part after ``provider/``, as the route should receive it."""
    message: str
    """Safe to show the caller."""


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
        self._expired = _deny(
            "policy_expired",
            f"the policy in force (v{policy.version}) expired at {rfc3339(policy.expires_at, seconds=True)}",
        )
        self._unknown_role = _deny("unknown_role", "this token's organization and role are not in the policy")

    def role(self, org: str, role: str) -> Role | None:
        rules = self._roles.get((org, role))
        return None if rules is None else rules.role

    def decide(self, org: str, role: str, model: str, *, now: float | None = None) -> Decision:
        if (time.time() if now is None else now) >= self._expires_ts:
            return self._expired
        rules = self._roles.get((org, role))
        if rules is None:
            return self._unknown_role
        parts = split_model(model)
        if parts is None:
            return _deny(
                "bad_model_name", f"model {_echo(model)} is not a 'provider/model' name (e.g. 'local/demo')"
            )
        provider, upstream = parts
        route = self._routes.get(provider)
        if route is None:
            return _deny("unknown_route", f"no route named {_echo(provider)} in the policy")
        index = rules.first_match(model)
        if index is None:
            message = f"model {_echo(model)} is not allowed for role {role!r}"
            return Decision(False, "model_not_allowed", None, provider, route, upstream, message)
        rule = rules.rules[index]
        return Decision(True, "allowed", rule, provider, route, upstream, f"allowed by {rule}")

    def evaluate(self, facts: RequestFacts, now: float | None = None) -> Verdict:
        """The whole Police decision for one request; see the module docstring for the order."""
        if (time.time() if now is None else now) >= self._expires_ts:
            return _refuse(facts, "policy_expired", "expires_at", self._expired.message)
        rules = self._roles.get((facts.org, facts.role))
        if rules is None:
            return _refuse(facts, "unknown_role", None, self._unknown_role.message)
        interventions: list[Intervention] = []
        model = facts.model
        alias = self._aliases.get(model)
        if alias is not None:
            model, rule = alias
            interventions.append(Intervention("model_aliased", rule, f"{facts.model} -> {model}"))
        if rules.force is not None and model != rules.force:
            # The requested text may be anything the caller typed: name it only if it is a model name.
            asked = model if split_model(model) is not None else f"a {len(model)}-character model name"
            interventions.append(Intervention("model_forced", rules.force_rule, f"{asked} -> {rules.force}"))
            model = rules.force
        data_class = facts.data_class if facts.data_class in DATA_CLASS_RANK else rules.default_class

        def refuse(
            reason: str, rule: str | None, message: str, at: tuple[str, RouteSpec, str] | None = None
        ) -> Verdict:
            name, spec, upstream = at if at is not None else (None, None, None)
            return Verdict(
                False,
                reason,
                rule,
                message,
                model,
                name,
                spec,
                upstream,
                data_class,
                [],
                facts.max_tokens,
                interventions,
                [],
            )

        parts = split_model(model)
        if parts is None:
            return refuse(
                "bad_model_name",
                None,
                f"model {_echo(model)} is not a 'provider/model' name (e.g. 'local/demo')",
            )
        provider, upstream = parts
        route = self._routes.get(provider)
        if route is None:
            return refuse("unknown_route", None, f"no route named {_echo(provider)} in the policy")
        at = (provider, route, upstream)
        index = rules.first_match(model)
        if index is None:
            return refuse(
                "model_not_allowed",
                f"{rules.path}.models",
                f"model {_echo(model)} is not allowed for role {rules.name!r}",
                at,
            )

        declared = facts.data_class
        if declared is not None and declared not in rules.allowed_classes:
            if declared not in DATA_CLASS_RANK:
                return refuse(
                    "data_class_denied",
                    None,
                    f"data class {_echo(declared)} is not one of phi, deidentified, public",
                    at,
                )
            return refuse(
                "data_class_downgrade",
                rules.downgrade_rule,
                f"role {rules.name!r} may not declare data class {declared!r} "
                f"(its default is {rules.default_class!r})",
                at,
            )
        if data_class not in self._route_classes[provider]:
            return refuse(
                "data_class_denied",
                f"routes.{provider}.data_classes",
                f"route {provider!r} may not receive {data_class} data",
                at,
            )

        drop: list[str] = []
        if facts.tools and rules.tool_exact is not None:
            outside = [t for t in facts.tools if not rules.tool_allowed(t)]
            if outside:
                tools_rule = f"{rules.path}.tools.allow"
                if not rules.tool_drop:
                    return refuse(
                        "tools_denied",
                        tools_rule,
                        f"tool {_echo(outside[0])} is not allowed for role {rules.name!r}",
                        at,
                    )
                drop = outside
                names = ", ".join(_echo(t) for t in outside[:8]) + (", ..." if len(outside) > 8 else "")
                interventions.append(
                    Intervention("tool_dropped", tools_rule, f"dropped {len(outside)} tool(s): {names}")
                )

        if rules.max_messages is not None and facts.message_count > rules.max_messages:
            return refuse(
                "too_many_messages",
                f"{rules.path}.prompt.max_messages",
                f"the request has {facts.message_count} messages; role {rules.name!r} allows "
                f"{rules.max_messages}",
                at,
            )
        if rules.max_chars is not None and facts.messages_text_len > rules.max_chars:
            return refuse(
                "prompt_too_long",
                f"{rules.path}.prompt.max_chars",
                f"the request has {facts.messages_text_len} characters of message text; role "
                f"{rules.name!r} allows {rules.max_chars}",
                at,
            )
        if rules.deny:
            text = facts.text
            if len(text) > rules.scan_limit:
                return refuse(
                    "prompt_too_long",
                    f"{rules.path}.prompt.deny_patterns",
                    f"the request has {len(text)} characters of message text; role {rules.name!r} "
                    f"screens at most {rules.scan_limit}",
                    at,
                )
            for rule, pattern_id, search in rules.deny:
                if search(text):
                    return refuse(
                        "prompt_denied",
                        rule,
                        f"the request matches deny pattern {pattern_id!r} of role {rules.name!r}",
                        at,
                    )

        max_tokens = facts.max_tokens
        if rules.max_tokens is not None and (max_tokens is None or max_tokens > rules.max_tokens):
            interventions.append(
                Intervention(
                    "max_tokens_clamped",
                    f"{rules.path}.prompt.max_tokens",
                    f"{'unset' if max_tokens is None else max_tokens} -> {rules.max_tokens}",
                )
            )
            max_tokens = rules.max_tokens

        fallbacks = self._fallbacks_for(rules, model, data_class) if model in self._fallbacks else ()
        rule = rules.rules[index]
        return Verdict(
            True,
            "allowed",
            rule,
            f"allowed by {rule}",
            model,
            provider,
            route,
            upstream,
            data_class,
            drop,
            max_tokens,
            interventions,
            list(fallbacks),
        )

    def _fallbacks_for(self, rules: _RoleRules, model: str, data_class: str) -> tuple[str, ...]:
        key = (model, data_class)
        cached = rules.fallback_cache.get(key)
        if cached is None:
            cached = tuple(
                alt
                for alt in self._fallbacks[model]
                if rules.first_match(alt) is not None
                and data_class in self._route_classes[alt.partition("/")[0]]
            )
            rules.fallback_cache[key] = cached  # bounded: keys come from the policy's fallbacks
        return cached

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


def _deny(reason: str, message: str) -> Decision:
    return Decision(False, reason, None, None, None, None, message)


def _refuse(facts: RequestFacts, reason: str, rule: str | None, message: str) -> Verdict:
    """A refusal before the role is known: nothing resolved, the declared (or strictest) class."""
    data_class = facts.data_class if facts.data_class in DATA_CLASS_RANK else "phi"
    assert data_class is not None
    return Verdict(
        False, reason, rule, message, facts.model, None, None, None, data_class, [], facts.max_tokens
    )


def _echo(text: str) -> str:
    return repr(text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "...")
