"""The decision engine: may this (organization, role) use this ``provider/model`` under the policy in force?

Owns: ``PolicyEngine``, built once per imported policy with every role's globs precompiled (exact names
in a dict, ``prefix*`` globs as ``startswith``, the rest as case-sensitive regexes), so ``decide`` costs a
few microseconds; the listing for ``GET /v1/models``; prices; and ``summarize_change`` for the import CLI.

Must never: allow anything once the policy has expired, allow a model whose provider is not a defined
route, or put another role's allow-list into a message a caller can see.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from appliance.policy.importer import iso_utc
from appliance.policy.schema import (
    LocalModelSpec,
    Policy,
    Price,
    Role,
    RouteSpec,
    has_wildcard,
    split_model,
)

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


def _matcher(glob: str) -> Callable[[str], object]:
    body = glob[:-1]
    if glob.endswith("*") and not has_wildcard(body):
        return lambda model: model.startswith(body)
    return re.compile(fnmatch.translate(glob)).match  # translate anchors at the end; match anchors the start


@dataclass(frozen=True, slots=True)
class _RoleRules:
    role: Role
    rules: tuple[str, ...]
    """``organizations.<org>.roles.<role>.models[i]`` for each glob, built once."""
    exact: dict[str, int]
    patterns: tuple[tuple[int, Callable[[str], object]], ...]

    @classmethod
    def compile(cls, role: Role, path: str) -> _RoleRules:
        exact: dict[str, int] = {}
        patterns = []
        for i, glob in enumerate(role.models):
            if has_wildcard(glob):
                patterns.append((i, _matcher(glob)))
            else:
                exact.setdefault(glob, i)
        rules = tuple(f"{path}.models[{i}]" for i in range(len(role.models)))
        return cls(role, rules, exact, tuple(patterns))

    def first_match(self, model: str) -> int | None:
        """Index of the first glob (in policy order) matching ``model``."""
        best = self.exact.get(model)
        for i, match in self.patterns:
            if best is not None and i > best:
                break
            if match(model):
                return i
        return best


class PolicyEngine:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.version = policy.version
        self.expires_at = policy.expires_at
        self._expires_ts = policy.expires_at.timestamp()
        self._routes = dict(policy.routes)
        self._roles: dict[tuple[str, str], _RoleRules] = {
            (org_name, role_name): _RoleRules.compile(role, f"organizations.{org_name}.roles.{role_name}")
            for org_name, org in policy.organizations.items()
            for role_name, role in org.roles.items()
        }
        self._expired = _deny(
            "policy_expired",
            f"the policy in force (v{policy.version}) expired at {iso_utc(policy.expires_at)}",
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


def _echo(text: str) -> str:
    return repr(text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "...")


def summarize_change(old: Policy | None, new: Policy) -> list[str]:
    """Human lines describing what importing ``new`` over ``old`` changes (printed by ``policy import``)."""
    if old is None:
        lines = [f"version: none -> v{new.version} (first policy)", f"expires: {iso_utc(new.expires_at)}"]
        lines.append(f"sites: {', '.join(new.scope.sites)}")
    else:
        lines = [f"version: v{old.version} -> v{new.version}"]
        if old.expires_at != new.expires_at:
            lines.append(f"expires: {iso_utc(old.expires_at)} -> {iso_utc(new.expires_at)}")
        if old.scope.sites != new.scope.sites:
            lines.append(f"sites: {', '.join(old.scope.sites)} -> {', '.join(new.scope.sites)}")
    lines += _diff("route", {} if old is None else old.routes, new.routes, _describe_route)
    lines += _diff("local model", {} if old is None else old.models, new.models, _describe_model)
    lines += _diff("role", {} if old is None else _roles(old), _roles(new), _describe_role)
    lines += _diff("price", {} if old is None else old.pricing, new.pricing, _describe_price)
    return lines


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
    return f"models {', '.join(role.models) or '(none)'}; default data class {role.default_data_class}"


def _describe_price(price: Price) -> str:
    return f"${price.input_per_mtok:g} in / ${price.output_per_mtok:g} out per Mtok"
