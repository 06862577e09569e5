"""Explain a policy decision without sending anything (``phi-gateway policy explain``).

Owns: ``explain``, which runs the gateway's own ``PolicyEngine.evaluate`` on request facts an operator
describes and turns the verdict into lines: the decision, the rules that made it (with their values),
the interventions, the fallbacks, and the role settings that shape requests.

Must never: send a request, read anything but the policy it is handed, or decide on its own: every
outcome comes from the engine, so the explanation cannot drift from what the gateway does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from appliance.policy.engine import PolicyEngine, RequestFacts, Verdict
from appliance.policy.schema import Policy, Role, scan_limit
from appliance.timestamps import rfc3339

_PATH_STEP = re.compile(r"\[(\d+)\]")


def explain(
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
) -> list[str]:
    """Human lines describing what the gateway would decide for this request, and why."""
    engine = PolicyEngine(policy)
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
    )
    verdict = engine.evaluate(facts, None if now is None else now.timestamp())
    lines = [
        f"decision: {'allowed' if verdict.allowed else 'denied'} ({verdict.reason})",
        f"policy: v{policy.version}, expires {rfc3339(policy.expires_at, seconds=True)}",
        f"caller: {org}/{role}",
    ]
    lines += _request_lines(policy, verdict, model, data_class)
    if verdict.rule is not None:
        value = _lookup(policy.model_dump(), verdict.rule)
        lines.append(f"rule: {verdict.rule}" + ("" if value is None else f" = {_show(value)}"))
    lines.append(f"message to the caller: {verdict.message}")
    for item in verdict.interventions:
        lines.append(f"intervention: {item.reason} by {item.rule} ({item.detail})")
    if verdict.drop_tools:
        lines.append(f"tools dropped before forwarding: {', '.join(verdict.drop_tools)}")
    if verdict.allowed:
        forwarded = "none (the request named none)" if verdict.max_tokens is None else verdict.max_tokens
        lines.append(f"max_tokens forwarded: {forwarded}")
        lines.append(
            "fallbacks, in order: " + (", ".join(verdict.fallbacks) if verdict.fallbacks else "none")
        )
    role_spec = engine.role(org, role)
    if role_spec is not None:
        lines += _role_lines(role_spec)
    return lines


def _request_lines(policy: Policy, verdict: Verdict, requested: str, declared: str | None) -> list[str]:
    lines = [f"model: {requested}" + ("" if verdict.model == requested else f" -> {verdict.model}")]
    if verdict.route is not None:
        route = verdict.route
        lines.append(
            f"route: {verdict.route_name} ({route.kind}, may receive {', '.join(route.data_classes)}), "
            f"upstream model {verdict.upstream_model}"
        )
    source = "declared" if declared is not None else "the role's default"
    lines.append(f"data class: {verdict.data_class} ({source})")
    return lines


def _role_lines(role: Role) -> list[str]:
    lines = [f"role models: {', '.join(role.models) or '(none)'}"]
    declarable = ", ".join(role.declarable_data_classes or []) or "none less strict"
    lines.append(f"role data classes: default {role.default_data_class}; may also declare {declarable}")
    if role.force_model is not None:
        lines.append(f"role forced model: {role.force_model}")
    if role.tools is not None:
        allow = ", ".join(role.tools.allow) or "(none)"
        action = "denied (403)" if role.tools.on_violation == "deny" else "dropped from the request"
        lines.append(f"role tools: {allow}; a request with others is {action}")
    prompt = role.prompt
    if prompt is not None:
        if prompt.deny_patterns:
            ids = ", ".join(p.id for p in prompt.deny_patterns)
            lines.append(f"role deny patterns: {ids} (screens up to {scan_limit(prompt)} characters)")
        caps = [
            f"max_messages {prompt.max_messages}" if prompt.max_messages else "",
            f"max_chars {prompt.max_chars}" if prompt.max_chars else "",
            f"max_tokens clamp {prompt.max_tokens}" if prompt.max_tokens else "",
        ]
        if any(caps):
            lines.append("role prompt caps: " + ", ".join(c for c in caps if c))
    return lines


def _lookup(doc: Any, path: str) -> Any:
    """The value at a rule path such as ``organizations.st.marys.roles.billing.models[1]``.

    Names may contain dots, so at each mapping the longest key that the path continues with wins.
    """
    node, rest = doc, path
    while rest:
        if isinstance(node, dict):
            keys = [k for k in node if rest == k or rest.startswith((k + ".", k + "["))]
            if not keys:
                return None
            key = max(keys, key=len)
            node, rest = node[key], rest[len(key) :].removeprefix(".")
        elif isinstance(node, list) and (step := _PATH_STEP.match(rest)) is not None:
            index = int(step.group(1))
            if index >= len(node):
                return None
            node, rest = node[index], rest[step.end() :].removeprefix(".")
        else:
            return None
    return node


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items() if v is not None) + "}"
    return str(value)
