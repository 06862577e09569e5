"""Explain a policy decision without sending anything (``phi-gateway policy explain``).

Owns: ``explain_request``, which runs the gateway's own ``PolicyEngine.evaluate`` on request facts an
operator describes, and its ``Explanation``: the decision, the rule that made it (with its value), the
interventions, the fallbacks, and the role settings that shape requests, as lines for people
(``lines``, values worded by ``display``) and as a stable JSON document for scripts (``document``).

Must never: send a request, read anything but the policy it is handed, or decide on its own: every
outcome comes from the engine, so the explanation cannot drift from what the gateway does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from appliance.policy.client_certificates import Certificate
from appliance.policy.display import show
from appliance.policy.engine import PolicyEngine, RequestFacts, Verdict
from appliance.policy.schema import Organization, Policy, Role, scan_limit
from appliance.timestamps import rfc3339

_PATH_STEP = re.compile(r"\[(\d+)\]")
_MISSING = object()


@dataclass(frozen=True)
class Explanation:
    """One hypothetical request and the engine's verdict on it."""

    policy: Policy
    org: str
    role: str
    model: str
    """As the operator asked: ``provider/model`` or an alias."""
    declared: str | None
    """The data class the request declares, or None (the role's default applies)."""
    verdict: Verdict

    @property
    def role_spec(self) -> Role | None:
        organization = self.organization
        return None if organization is None else organization.roles.get(self.role)

    @property
    def organization(self) -> Organization | None:
        return self.policy.organizations.get(self.org)

    def rule_value(self) -> Any:
        """The policy's value at the deciding rule's path (``_MISSING`` when the path names none)."""
        return _MISSING if self.verdict.rule is None else _lookup(self.policy, self.verdict.rule)

    def lines(self) -> list[str]:
        """What the gateway would decide for this request, and why, in an operator's words."""
        verdict, policy = self.verdict, self.policy
        lines = [
            f"decision: {'allowed' if verdict.allowed else 'denied'} ({verdict.reason})",
            f"policy: v{policy.version}, expires {rfc3339(policy.expires_at, seconds=True)}",
            f"caller: {self.org}/{self.role}",
            f"model: {self.model}" + ("" if verdict.model == self.model else f" -> {verdict.model}"),
        ]
        if verdict.route is not None:
            route = verdict.route
            lines.append(
                f"route: {verdict.route_name} ({route.kind}, may receive {show(route.data_classes)}), "
                f"upstream model {verdict.upstream_model}"
            )
        source = "declared" if self.declared is not None else "the role's default"
        lines.append(f"data class: {verdict.data_class} ({source})")
        if verdict.rule is not None:
            value = self.rule_value()
            lines.append(f"rule: {verdict.rule}" + ("" if value is _MISSING else f" = {show(value)}"))
        lines.append(f"message to the caller: {verdict.message}")
        for item in verdict.interventions:
            lines.append(f"intervention: {item.reason} by {item.rule} ({item.detail})")
        if verdict.drop_tools:
            lines.append(f"tools dropped before forwarding: {show(verdict.drop_tools)}")
        if verdict.allowed:
            forwarded = "none (the request named none)" if verdict.max_tokens is None else verdict.max_tokens
            lines.append(f"max_tokens forwarded: {forwarded}")
            lines.append(f"fallbacks, in order: {show(verdict.fallbacks)}")
        role = self.role_spec
        if role is not None:
            lines += _role_lines(role)
            organization = self.organization
            assert organization is not None
            lines += _organization_lines(organization)
        return lines

    def document(self) -> dict[str, Any]:
        """The explanation as JSON for scripts; the keys are documented in the README (``--json``)."""
        verdict, route = self.verdict, self.verdict.route
        value = self.rule_value()
        organization = self.organization
        return {
            "decision": "allowed" if verdict.allowed else "denied",
            "reason": verdict.reason,
            "rule": verdict.rule,
            "rule_value": None if value is _MISSING else to_jsonable_python(value),
            "message": verdict.message,
            "policy": {
                "version": self.policy.version,
                "expires_at": rfc3339(self.policy.expires_at, seconds=True),
            },
            "caller": {"org": self.org, "role": self.role},
            "model": {"requested": self.model, "resolved": verdict.model},
            "route": None
            if route is None
            else {
                "name": verdict.route_name,
                "kind": route.kind,
                "data_classes": list(route.data_classes),
                "upstream_model": verdict.upstream_model,
            },
            "data_class": {
                "class": verdict.data_class,
                "source": "declared" if self.declared is not None else "role_default",
            },
            "interventions": [
                {"reason": i.reason, "rule": i.rule, "detail": i.detail} for i in verdict.interventions
            ],
            "tools_dropped": list(verdict.drop_tools),
            "max_tokens": verdict.max_tokens,
            "fallbacks": list(verdict.fallbacks),
            "role": to_jsonable_python(self.role_spec),
            "organization": None
            if organization is None
            else {
                "budgets": to_jsonable_python(organization.budgets),
                "client_certificate": to_jsonable_python(organization.client_certificate),
            },
        }


def explain_request(
    policy: Policy,
    *,
    org: str,
    role: str,
    model: str,
    data_class: str | None = None,
    tools: Sequence[str] = (),
    text: str = "",
    max_tokens: int | None = None,
    message_count: int | None = None,
    now: datetime | None = None,
    certificate: Certificate | None = None,
) -> Explanation:
    """The engine's verdict on a request with these facts (``text``: its message text, if any;
    ``certificate``: what the connection's handshake verified, default none presented)."""
    facts = RequestFacts(
        org=org,
        role=role,
        model=model,
        data_class=data_class,
        tools=list(tools),
        messages_text_len=len(text),
        message_count=(1 if text else 0) if message_count is None else message_count,
        text=text,
        max_tokens=max_tokens,
        certificate=certificate if certificate is not None else Certificate(presented=False),
    )
    verdict = PolicyEngine(policy).evaluate(facts, None if now is None else now.timestamp())
    return Explanation(policy, org, role, model, data_class, verdict)


def explain(policy: Policy, **request: Any) -> list[str]:
    """Human lines describing what the gateway would decide for this request (``explain_request``'s
    arguments), and why."""
    return explain_request(policy, **request).lines()


def _role_lines(role: Role) -> list[str]:
    lines = [f"role models: {show(role.models)}"]
    declarable = show(role.declarable_data_classes) if role.declarable_data_classes else "none less strict"
    lines.append(f"role data classes: default {role.default_data_class}; may also declare {declarable}")
    if role.priority:
        lines.append(f"role queue priority: {role.priority} (lower runs sooner on local models)")
    if role.force_model is not None:
        lines.append(f"role forced model: {role.force_model}")
    if role.tools is not None:
        action = "denied (403)" if role.tools.on_violation == "deny" else "dropped from the request"
        lines.append(f"role tools: {show(role.tools.allow)}; a request with others is {action}")
    prompt = role.prompt
    if prompt is not None:
        if prompt.deny_patterns:
            ids = show([p.id for p in prompt.deny_patterns])
            lines.append(f"role deny patterns: {ids} (screens up to {scan_limit(prompt)} characters)")
        caps = [
            f"max_messages {prompt.max_messages}" if prompt.max_messages else "",
            f"max_chars {prompt.max_chars}" if prompt.max_chars else "",
            f"max_tokens clamp {prompt.max_tokens}" if prompt.max_tokens else "",
        ]
        if any(caps):
            lines.append("role prompt caps: " + ", ".join(c for c in caps if c))
    for label, value in (
        ("role limits", role.limits),
        ("role budgets", role.budgets),
        ("role client certificate", role.client_certificate),
    ):
        if value is not None:
            lines.append(f"{label}: {show(value)}")
    return lines


def _organization_lines(organization: Organization) -> list[str]:
    lines = []
    if organization.budgets is not None:
        lines.append(f"organization budgets: {show(organization.budgets)}")
    if organization.client_certificate is not None:
        lines.append(f"organization client certificate: {show(organization.client_certificate)}")
    return lines


def _lookup(policy: Policy, path: str) -> Any:
    """The value at a rule path such as ``organizations.st.marys.roles.billing.models[1]``.

    Names may contain dots, so at each mapping the longest key that the path continues with wins.
    """
    node: Any = policy
    rest = path
    while rest:
        if isinstance(node, BaseModel):
            node = {name: getattr(node, name) for name in type(node).model_fields}
        if isinstance(node, dict):
            keys = [k for k in node if rest == k or rest.startswith((k + ".", k + "["))]
            if not keys:
                return _MISSING
            key = max(keys, key=len)
            node, rest = node[key], rest[len(key) :].removeprefix(".")
        elif isinstance(node, list) and (step := _PATH_STEP.match(rest)) is not None:
            index = int(step.group(1))
            if index >= len(node):
                return _MISSING
            node, rest = node[index], rest[step.end() :].removeprefix(".")
        else:
            return _MISSING
    return node
