"""What importing a policy changes, for the operator before and after ``policy import`` (and for scripts).

Owns: ``changes(old, new)``, the list of ``Change``s: version, expiry, sites, and each route, local
model, role, price, alias, fallback list, organization budget and organization client-certificate rule
added, removed or changed, and a trust rotation; each renders as a line (``Change.line``, what
``summarize_change`` returns and ``policy import`` prints) and as JSON (``Change.document``, what
``--json`` prints). Never: decides anything about a request (that is ``engine``), or prints a deny
pattern's text beyond what the policy file itself shows the operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from appliance.policy.display import show, show_field
from appliance.policy.schema import Policy

Action = Literal["added", "removed", "changed"]

_NOUNS = {
    "version": "version",
    "expires_at": "expires",
    "scope.sites": "sites",
    "routes": "route",
    "models": "local model",
    "roles": "role",
    "pricing": "price",
    "aliases": "alias",
    "fallbacks": "fallbacks",
    "organizations.budgets": "organization budgets",
    "organizations.client_certificate": "organization client certificate",
    "trust": "trust",
}
"""Each ``Change.section`` and the noun its line starts with (the sections, in the order of the lines)."""


@dataclass(frozen=True)
class Change:
    """One difference between the policy in force and the one imported."""

    section: str
    """A key of ``_NOUNS``: a policy field (``routes``), ``roles`` (named ``org/role``), or an
    organization's own field (``organizations.budgets``)."""
    name: str | None
    """The entry within the section (a route name, ``org/role``, …); None for a single value."""
    action: Action
    before: Any
    """The value in force (a section model, a list, a scalar), None when added."""
    after: Any
    """The value imported, None when removed."""

    @property
    def fields(self) -> list[str]:
        """For a changed section model: the names of the fields that differ."""
        if not isinstance(self.before, BaseModel) or not isinstance(self.after, BaseModel):
            return []
        return [name for name, value in self.before if value != getattr(self.after, name)]

    def line(self) -> str:
        """The operator's line, e.g. ``route changed: openai (base_url https://a -> https://b)``."""
        noun, name = _NOUNS[self.section], self.name
        if name is None:  # version, expiry, sites, trust: one value each
            if self.section == "version":
                if self.before is None:
                    return f"version: none -> v{self.after} (first policy)"
                return f"version: v{self.before} -> v{self.after}"
            if self.section == "trust":
                return f"trust: rotates to {show(self.after)}"
            if self.before is None:
                return f"{noun}: {show(self.after)}"
            return f"{noun}: {show(self.before)} -> {show(self.after)}"
        if self.action == "added":
            return f"{noun} added: {name} ({show(self.after)})"
        if self.action == "removed":
            return f"{noun} removed: {name}"
        if self.fields:
            parts = (_field_change(f, getattr(self.before, f), getattr(self.after, f)) for f in self.fields)
            return f"{noun} changed: {name} ({'; '.join(parts)})"
        return f"{noun} changed: {name} ({show(self.before)} -> {show(self.after)})"

    def document(self) -> dict[str, Any]:
        """The change as JSON for scripts: ``section``, ``name``, ``change``, ``before``, ``after``,
        ``fields`` (values in the policy document's own JSON shapes)."""
        return {
            "section": self.section,
            "name": self.name,
            "change": self.action,
            "before": to_jsonable_python(self.before),
            "after": to_jsonable_python(self.after),
            "fields": self.fields,
        }


def changes(old: Policy | None, new: Policy) -> list[Change]:
    """Every difference importing ``new`` over ``old`` (None: no policy in force) makes, in line order."""
    out = [Change("version", None, "added" if old is None else "changed", old and old.version, new.version)]
    if old is None:
        out.append(Change("expires_at", None, "added", None, new.expires_at))
        out.append(Change("scope.sites", None, "added", None, new.scope.sites))
    else:
        if old.expires_at != new.expires_at:
            out.append(Change("expires_at", None, "changed", old.expires_at, new.expires_at))
        if old.scope.sites != new.scope.sites:
            out.append(Change("scope.sites", None, "changed", old.scope.sites, new.scope.sites))
    for section in ("routes", "models", "roles", "pricing", "aliases", "fallbacks"):
        out += _entries(section, {} if old is None else _section(old, section), _section(new, section))
    for field in ("budgets", "client_certificate"):
        before = {} if old is None else _organization_field(old, field)
        out += _entries(f"organizations.{field}", before, _organization_field(new, field))
    if new.trust is not None and (old is None or old.trust != new.trust):
        out.append(Change("trust", None, "changed", None if old is None else old.trust, new.trust))
    return out


def _field_change(name: str, before: Any, after: Any) -> str:
    """``name old -> new``; two values that read alike (an empty list and none) are told apart."""
    old, new = show_field(name, before), show_field(name, after)
    if old == new:
        old, new = _exactly(before), _exactly(after)
    if (
        old == new
    ):  # a change inside (a deny pattern's regex) or below the words' precision (90 -> 90.0000001)
        inside = _changed_paths(to_jsonable_python(before), to_jsonable_python(after))
        if inside:
            return f"{name} {old} ({', '.join(inside[:4])} changed)"
        if isinstance(before, int | float) and isinstance(after, int | float):
            return f"{name} {before!r} -> {after!r}"  # the exact numbers
    return f"{name} {old} -> {new}"


def _changed_paths(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, as dotted paths (``deny_patterns[0].pattern``)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = [*before, *(k for k in after if k not in before)]
        return [
            p for k in keys for p in _changed_paths(before.get(k), after.get(k), f"{path}.{k}".lstrip("."))
        ]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [
            p
            for i, (b, a) in enumerate(zip(before, after, strict=True))
            for p in _changed_paths(b, a, f"{path}[{i}]")
        ]
    if before == after:
        return []
    if not path:  # two scalars that read alike: the exact values
        return []
    return [path]


def _exactly(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, list | tuple | dict) and not value:
        return "empty"
    return show(value)


def summarize_change(old: Policy | None, new: Policy) -> list[str]:
    """Human lines describing what importing ``new`` over ``old`` changes (printed by ``policy import``)."""
    return [change.line() for change in changes(old, new)]


def _section(policy: Policy, section: str) -> Mapping[str, Any]:
    if section == "roles":
        return {f"{o}/{r}": role for o, org in policy.organizations.items() for r, role in org.roles.items()}
    value: Mapping[str, Any] = getattr(policy, section)
    return value


def _organization_field(policy: Policy, field: str) -> dict[str, Any]:
    """Each organization's ``field``, where it is set."""
    values = {name: getattr(org, field) for name, org in policy.organizations.items()}
    return {name: value for name, value in values.items() if value is not None}


def _entries(section: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    out = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None:
            out.append(Change(section, name, "added", None, after))
        elif after is None:
            out.append(Change(section, name, "removed", before, None))
        elif before != after:
            out.append(Change(section, name, "changed", before, after))
    return out
