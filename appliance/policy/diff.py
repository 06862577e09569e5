"""What importing a policy changes, in lines an operator reads before and after ``policy import``.

Owns: ``summarize_change(old, new)``: version, expiry, sites, and each route, local model, role, alias,
fallback, budget and price added, removed or changed. Never: decides anything about a request (that is
``engine``), or prints a deny pattern's text beyond what the policy file itself shows the operator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from pydantic import BaseModel

from appliance.policy.schema import LocalModelSpec, Policy, Price, Role, RouteSpec
from appliance.timestamps import rfc3339

M = TypeVar("M", bound=BaseModel)


def summarize_change(old: Policy | None, new: Policy) -> list[str]:
    """Human lines describing what importing ``new`` over ``old`` changes (printed by ``policy import``)."""
    if old is None:
        lines = [
            f"version: none -> v{new.version} (first policy)",
            f"expires: {rfc3339(new.expires_at, seconds=True)}",
        ]
        lines.append(f"sites: {', '.join(new.scope.sites)}")
    else:
        lines = [f"version: v{old.version} -> v{new.version}"]
        if old.expires_at != new.expires_at:
            lines.append(
                f"expires: {rfc3339(old.expires_at, seconds=True)} -> {rfc3339(new.expires_at, seconds=True)}"
            )
        if old.scope.sites != new.scope.sites:
            lines.append(f"sites: {', '.join(old.scope.sites)} -> {', '.join(new.scope.sites)}")
    lines += _diff("route", {} if old is None else old.routes, new.routes, _describe_route)
    lines += _diff("local model", {} if old is None else old.models, new.models, _describe_model)
    lines += _diff("role", {} if old is None else _roles(old), _roles(new), _describe_role)
    lines += _diff("price", {} if old is None else old.pricing, new.pricing, _describe_price)
    lines += _diff_plain("alias", {} if old is None else old.aliases, new.aliases)
    old_fallbacks = {} if old is None else {k: ", ".join(v) for k, v in old.fallbacks.items()}
    lines += _diff_plain("fallbacks", old_fallbacks, {k: ", ".join(v) for k, v in new.fallbacks.items()})
    old_budgets = (
        {} if old is None else {o: _show_budget(org.budgets) for o, org in old.organizations.items()}
    )
    new_budgets = {o: _show_budget(org.budgets) for o, org in new.organizations.items()}
    lines += _diff_plain(
        "organization budgets",
        {k: v for k, v in old_budgets.items() if v},
        {k: v for k, v in new_budgets.items() if v},
    )
    if new.trust is not None and (old is None or old.trust != new.trust):
        keyids = ", ".join(k[:8] + "…" for k in sorted(new.trust.keys))
        lines.append(
            f"trust: rotates to {len(new.trust.keys)} key(s) ({keyids}), threshold {new.trust.threshold}"
        )
    return lines


def _diff_plain(noun: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None:
            lines.append(f"{noun} added: {name} ({after})")
        elif after is None:
            lines.append(f"{noun} removed: {name}")
        elif before != after:
            lines.append(f"{noun} changed: {name} ({before} -> {after})")
    return lines


def _show_budget(budget: BaseModel | None) -> str:
    if budget is None:
        return ""
    return ", ".join(f"{k} {_show(v)}" for k, v in budget.model_dump().items() if v is not None)


def _diff(noun: str, old: Mapping[str, M], new: Mapping[str, M], describe: Callable[[M], str]) -> list[str]:
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None and after is not None:
            lines.append(f"{noun} added: {name} ({describe(after)})")
        elif after is None:
            lines.append(f"{noun} removed: {name}")
        elif before is not None and before != after:
            lines.append(f"{noun} changed: {name} ({_changed_fields(before, after)})")
    return lines


def _changed_fields(before: BaseModel, after: BaseModel) -> str:
    old, new = before.model_dump(), after.model_dump()
    return "; ".join(f"{k} {_show(old[k])} -> {_show(new[k])}" for k in old if old[k] != new[k])


def _show(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _roles(policy: Policy) -> dict[str, Role]:
    return {f"{o}/{r}": role for o, org in policy.organizations.items() for r, role in org.roles.items()}


def _describe_route(route: RouteSpec) -> str:
    where = route.base_url or "in-process"
    classes = "/".join(route.data_classes)
    return f"{route.kind} {where}, auth {route.auth}, data {classes}, timeout {route.timeout_s:g}s"


def _describe_model(model: LocalModelSpec) -> str:
    return f"{model.file} sha256 {model.sha256[:12]}..., n_ctx {model.n_ctx}"


def _describe_role(role: Role) -> str:
    parts = [f"models {', '.join(role.models) or '(none)'}", f"default data class {role.default_data_class}"]
    if role.declarable_data_classes:
        parts.append(f"may declare {', '.join(role.declarable_data_classes)}")
    if role.force_model is not None:
        parts.append(f"forced to {role.force_model}")
    if role.tools is not None:
        parts.append(f"tools {', '.join(role.tools.allow) or '(none)'} ({role.tools.on_violation} others)")
    if role.prompt is not None:
        prompt = role.prompt
        limits = [
            f"{len(prompt.deny_patterns)} deny pattern(s)" if prompt.deny_patterns else "",
            f"max {prompt.max_messages} messages" if prompt.max_messages else "",
            f"max {prompt.max_chars} chars" if prompt.max_chars else "",
            f"max_tokens clamp {prompt.max_tokens}" if prompt.max_tokens else "",
        ]
        parts.append("prompt " + ", ".join(x for x in limits if x) if any(limits) else "prompt rules")
    return "; ".join(parts)


def _describe_price(price: Price) -> str:
    return f"${price.input_per_mtok:g} in / ${price.output_per_mtok:g} out per Mtok"
