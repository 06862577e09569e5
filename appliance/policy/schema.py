"""The policy document v1: what a valid policy is, field by field and across references.

Owns: the pydantic models of the bundle payload, their name rules, the cross-reference checks (every
role glob, local model and price names a defined route) and ``parse_policy``, the one strict way to turn
verified payload bytes into a ``Policy``.

Must never: accept unknown fields (a typo must not pass silently), accept a JSON object with duplicate
keys (the signer's tool and this parser could read different values), or be handed bytes whose
signatures have not been checked (``importer.verify_bundle`` calls ``parse_policy`` only after that).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.errors import BundleRejected

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# The model part of "provider/model"; one extra "/" segment admits OpenRouter-style "vendor/model" ids.
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._:-]{0,127})?$"
_MODEL_RE = re.compile(MODEL_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_GLOB_BODY_RE = re.compile(r"^[A-Za-z0-9._:/*?-]{1,256}$")
_WILDCARDS = frozenset("*?")
_MAX_ERRORS_SHOWN = 8


def _name(value: str) -> str:
    if _NAME_RE.match(value) is None:
        raise ValueError(f"{value[:70]!r} is not a name (1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric)")
    return value


Name = Annotated[str, AfterValidator(_name)]
DataClass = Literal["phi", "deidentified", "public"]
RouteKind = Literal["local", "openai", "anthropic"]
Auth = Literal["bearer", "x-api-key", "none"]

_DEFAULT_AUTH: dict[str, str] = {"openai": "bearer", "anthropic": "x-api-key", "local": "none"}


def split_model(model: str) -> tuple[str, str] | None:
    """``"provider/model"`` -> ``(provider, model)``; None when either part is not a valid name."""
    provider, sep, rest = model.partition("/")
    if not sep or _NAME_RE.match(provider) is None or _MODEL_RE.match(rest) is None:
        return None
    return provider, rest


def has_wildcard(glob: str) -> bool:
    return not _WILDCARDS.isdisjoint(glob)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Scope(_Frozen):
    sites: list[Name] = Field(min_length=1)
    """Site ids this policy may be imported on."""


class RouteSpec(_Frozen):
    kind: RouteKind
    base_url: str | None = None
    """http(s) URL of the upstream API; required for openai/anthropic, forbidden for local."""
    auth: Auth = "bearer"
    """How the sealed key is sent; defaults by kind (openai: bearer, anthropic: x-api-key, local: none)."""
    data_classes: list[DataClass] = Field(default=["deidentified", "public"], min_length=1)
    """Data classes this route may receive."""
    timeout_s: float = Field(default=120.0, gt=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _default_auth(cls, data: Any) -> Any:
        if isinstance(data, dict) and "auth" not in data and data.get("kind") in _DEFAULT_AUTH:
            data = {**data, "auth": _DEFAULT_AUTH[data["kind"]]}
        return data

    @model_validator(mode="after")
    def _check_url(self) -> RouteSpec:
        if self.kind == "local":
            if self.base_url is not None:
                raise ValueError("a local route takes no base_url")
            if self.auth != "none":
                raise ValueError("a local route takes no auth (use 'none')")
            return self
        if self.base_url is None:
            raise ValueError(f"a route of kind {self.kind} needs a base_url")
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("base_url must be an http:// or https:// URL with a host")
        if url.username is not None or url.password is not None:
            raise ValueError("base_url must not carry credentials (keys belong in the vault)")
        if url.query or url.fragment or any(c.isspace() for c in self.base_url):
            raise ValueError("base_url must not carry a query, fragment or whitespace")
        return self


class LocalModelSpec(_Frozen):
    file: str
    """A bare file name under ``<home>/models/``."""
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    """SHA-256 of the file, 64 lowercase hex characters."""
    n_ctx: int = Field(default=2048, ge=16, le=1 << 20)

    @field_validator("file")
    @classmethod
    def _bare_name(cls, value: str) -> str:
        if _FILE_RE.match(value) is None or ".." in value:
            raise ValueError("file must be a bare file name (no folders, no '..') under <home>/models/")
        return value


class Role(_Frozen):
    models: list[str]
    """Globs over ``provider/model`` (``*`` and ``?``); provider is a route name or ``*``."""
    default_data_class: DataClass = "phi"
    priority: int = Field(0, ge=-1000, le=1000)
    """Place in a local model's queue: lower runs sooner (a radiology assistant before a batch job)."""

    @field_validator("models")
    @classmethod
    def _check_globs(cls, globs: list[str]) -> list[str]:
        for glob in globs:
            provider, sep, rest = glob.partition("/")
            if not sep or not rest or _GLOB_BODY_RE.match(rest) is None:
                raise ValueError(f"{glob!r} is not a 'provider/model' glob")
            if provider != "*" and _NAME_RE.match(provider) is None:
                raise ValueError(f"{glob!r}: the provider must be a route name or '*'")
        return globs


class Organization(_Frozen):
    roles: dict[Name, Role]


class Price(_Frozen):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class Policy(_Frozen):
    version: int = Field(ge=1, le=2**62)
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    scope: Scope
    routes: dict[Name, RouteSpec]
    models: dict[str, LocalModelSpec] = {}
    organizations: dict[Name, Organization]
    pricing: dict[str, Price] = {}

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _check_references(self) -> Policy:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be later than issued_at")
        for key in self.models:
            parts = split_model(key)
            if parts is None:
                raise ValueError(f"models: {key!r} is not a valid 'route/model' name")
            route = self.routes.get(parts[0])
            if route is None or route.kind != "local":
                raise ValueError(f"models: {key!r} must name a route of kind local")
        for org_name, org in self.organizations.items():
            for role_name, role in org.roles.items():
                for i, glob in enumerate(role.models):
                    where = f"organizations.{org_name}.roles.{role_name}.models[{i}]"
                    provider = glob.partition("/")[0]
                    if provider == "*":
                        continue
                    route = self.routes.get(provider)
                    if route is None:
                        raise ValueError(f"{where}: {glob!r} names undefined route {provider!r}")
                    if route.kind == "local" and not has_wildcard(glob) and glob not in self.models:
                        raise ValueError(f"{where}: {glob!r} names a local model not listed in models")
        for key in self.pricing:
            parts = split_model(key)
            if parts is None:
                raise ValueError(f"pricing: {key!r} is not a valid 'provider/model' name")
            if parts[0] not in self.routes:
                raise ValueError(f"pricing: {key!r} names undefined route {parts[0]!r}")
        return self


def parse_policy(payload: bytes) -> Policy:
    """Strictly parse verified payload bytes; raise ``BundleRejected("schema", ...)`` naming each field."""
    try:
        json.loads(payload, object_pairs_hook=no_duplicate_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleRejected("schema", f"the payload is not valid JSON: {exc}") from exc
    try:
        return Policy.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        raise BundleRejected("schema", describe_errors(exc)) from exc


def describe_errors(exc: ValidationError) -> str:
    """One line per error, ``field.path: reason``, at most a handful."""
    errors = exc.errors(include_url=False, include_input=False)
    lines = []
    for err in errors[:_MAX_ERRORS_SHOWN]:
        loc = [p for p in err["loc"] if p != "[key]"]  # a bad dict key: its path already names it
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        reason = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{path}: {reason}" if path else reason)
    if len(errors) > _MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more")
    return "the policy document is invalid: " + "; ".join(lines)


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice is an error (signer and verifier must read the same value)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
