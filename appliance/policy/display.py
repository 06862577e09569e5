"""How policy values read to people: the words ``policy explain`` and the import summary print.

Owns: ``show(value)``, one rendering of any value of a ``Policy`` (a section, a list, a scalar) in an
operator's terms: ``none`` for an absent rule, lists joined with commas, money as ``$12.50``, durations
as ``2 min``, and each section in a sentence of its own (``allow: web_search, calc (on violation:
deny)``); and ``show_field(name, value)`` for one field of a section, with its unit.

Never: prints a Python repr (``None``, ``{'allow': …}``, ``[…]``), decides anything, or reads anything
but the value it is handed. Scripts read ``--json`` output instead; these words may change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from appliance.policy.limits_schema import Rate, RoleBudgets, RoleLimits, Spend
from appliance.policy.schema import (
    ClientCertificate,
    DenyPattern,
    LocalModelSpec,
    Organization,
    Price,
    PromptRules,
    Role,
    RouteSpec,
    Scope,
    ToolRules,
    TrustKey,
    TrustSpec,
)
from appliance.timestamps import rfc3339

NONE = "none"


def show(value: object) -> str:
    """``value`` in an operator's words (see the module docstring)."""
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, datetime):
        return rfc3339(value, seconds=True)
    if isinstance(value, BaseModel):
        render = _SECTIONS.get(type(value))
        return render(value) if render is not None else _fields(value)
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {show(v)}" for k, v in value.items()) or NONE
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(show(v) for v in value) or NONE
    return str(value)


def show_field(name: str, value: object) -> str:
    """One field's value with its unit where its name says it (``timeout_s``, ``usd_per_day``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if name.endswith("_s"):
            return duration(value)
        if name.startswith("usd_") or name.endswith("_per_mtok"):
            return money(value)
    return show(value)


def money(usd: float) -> str:
    """``$12.50``, ``$2,000.00``; sub-cent amounts keep their digits, never an exponent (``$0.075``,
    ``$0.0000015``)."""
    if round(usd, 2) == usd:
        return f"${usd:,.2f}"
    return f"${Decimal(repr(usd)):,f}"


def duration(seconds: float) -> str:
    """``45 s``, ``2 min``, ``1 h``, ``90 s``: the largest unit that divides it."""
    if seconds and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _fields(model: BaseModel) -> str:
    """Fallback for a section without its own sentence: each field that is set, with its value."""
    parts = [f"{name} {show_field(name, v)}" for name, v in model if v is not None]
    return ", ".join(parts) or NONE


def _route(route: RouteSpec) -> str:
    where = route.base_url or "in-process"
    classes = ", ".join(route.data_classes)
    return f"{route.kind} {where}; auth {route.auth}; receives {classes}; timeout {duration(route.timeout_s)}"


def _local_model(model: LocalModelSpec) -> str:
    return f"{model.file}; sha256 {model.sha256[:12]}…; n_ctx {model.n_ctx}"


def _tools(tools: ToolRules) -> str:
    return f"allow: {', '.join(tools.allow) or 'no tools'} (on violation: {tools.on_violation})"


def _deny_pattern(pattern: DenyPattern) -> str:
    return f"{pattern.id} ({pattern.pattern})"


def _prompt(prompt: PromptRules) -> str:
    parts = [
        f"deny patterns: {', '.join(p.id for p in prompt.deny_patterns)}" if prompt.deny_patterns else "",
        f"max {prompt.max_messages} messages" if prompt.max_messages else "",
        f"max {prompt.max_chars} chars" if prompt.max_chars else "",
        f"max_tokens clamp {prompt.max_tokens}" if prompt.max_tokens else "",
    ]
    return ", ".join(p for p in parts if p) or "no rules"


def _rate(rate: Rate) -> str:
    parts = [
        f"{rate.requests_per_min} requests/min" if rate.requests_per_min is not None else "",
        f"{rate.tokens_per_min} tokens/min" if rate.tokens_per_min is not None else "",
    ]
    return ", ".join(p for p in parts if p) or "no limit"


def _spend(spend: Spend) -> str:
    parts = [
        f"{money(spend.usd_per_day)}/day" if spend.usd_per_day is not None else "",
        f"{money(spend.usd_per_month)}/month" if spend.usd_per_month is not None else "",
    ]
    return ", ".join(p for p in parts if p) or "no cap"


def _per(caps: RoleLimits | RoleBudgets) -> str:
    parts = [
        f"per caller {show(caps.per_caller)}" if caps.per_caller is not None else "",
        f"per role {show(caps.per_role)}" if caps.per_role is not None else "",
    ]
    return " and ".join(p for p in parts if p) or NONE


def _client_certificate(rule: ClientCertificate) -> str:
    subjects = "; ".join(rule.subjects) if rule.subjects else "any certificate the site's client CA signed"
    return f"{'required' if rule.required else 'optional'}, {subjects}"


def _role(role: Role) -> str:
    parts = [f"models {', '.join(role.models) or NONE}", f"default data class {role.default_data_class}"]
    if role.declarable_data_classes:
        parts.append(f"may declare {', '.join(role.declarable_data_classes)}")
    if role.priority:
        parts.append(f"priority {role.priority}")
    if role.force_model is not None:
        parts.append(f"forced to {role.force_model}")
    for name, value in (
        ("tools", role.tools),
        ("prompt", role.prompt),
        ("limits", role.limits),
        ("budgets", role.budgets),
        ("client certificate", role.client_certificate),
    ):
        if value is not None:
            parts.append(f"{name} {show(value)}")
    return "; ".join(parts)


def _organization(org: Organization) -> str:
    parts = [f"roles {', '.join(org.roles)}"]
    if org.budgets is not None:
        parts.append(f"budgets {show(org.budgets)}")
    if org.client_certificate is not None:
        parts.append(f"client certificate {show(org.client_certificate)}")
    return "; ".join(parts)


def _price(price: Price) -> str:
    return f"{money(price.input_per_mtok)} in / {money(price.output_per_mtok)} out per Mtok"


def _trust(trust: TrustSpec) -> str:
    keyids = ", ".join(k[:8] + "…" for k in sorted(trust.keys))
    return f"{len(trust.keys)} key(s) ({keyids}), threshold {trust.threshold}"


def _trust_key(key: TrustKey) -> str:
    return f"{key.keytype} {key.public[:16]}…"


_SECTIONS: dict[type[Any], Callable[[Any], str]] = {
    RouteSpec: _route,
    LocalModelSpec: _local_model,
    ToolRules: _tools,
    DenyPattern: _deny_pattern,
    PromptRules: _prompt,
    Rate: _rate,
    Spend: _spend,
    RoleLimits: _per,
    RoleBudgets: _per,
    ClientCertificate: _client_certificate,
    Role: _role,
    Organization: _organization,
    Price: _price,
    Scope: lambda scope: ", ".join(scope.sites),
    TrustSpec: _trust,
    TrustKey: _trust_key,
}
