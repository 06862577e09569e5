"""The policy document v1: what a valid policy is, field by field and across references.

Owns: the pydantic models of the bundle payload, their name rules, the cross-reference checks (every
role glob, forced model, alias, fallback, local model and price names a defined route), the safety rules
for prompt deny patterns (``check_deny_pattern``), and ``parse_policy``, the one strict way to turn
verified payload bytes into a ``Policy``.

Deny patterns run on Python's backtracking ``re`` on every request, and bounding the input alone is not
enough (``\\d+\\s`` over 64 KiB of digits was measured at 25 s), so a pattern is admitted only when its
work per start position is bounded by construction: no backreferences or conditionals, no unbounded
repeats (``*``, ``+``, ``{n,}``: write ``{0,64}``), no repeat above 256, and a backtracking cost
(``check_deny_pattern``) of at most 1024 per role, which refuses nested and alternated repeats. Search
time is then about text length x cost x (1-15 ns), so a role scans at most ``SCAN_BUDGET // cost``
characters of message text (never more than 64 KiB) and longer text is denied, fail closed: the worst
case is about 4 M steps (~60 ms) per request whatever the input; typical patterns (cost below 64)
scan the full 64 KiB within a few milliseconds (``bench/policy.py`` measures both).

Must never: accept unknown fields (a typo must not pass silently), accept a JSON object with duplicate
keys (the signer's tool and this parser could read different values), or be handed bytes whose
signatures have not been checked (``importer.verify_bundle`` calls ``parse_policy`` only after that).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from appliance.errors import BundleRejected
from appliance.policy.deny_patterns import (
    MAX_DENY_PATTERNS,
    MAX_PATTERN_COST,
    MAX_PATTERN_LENGTH,
    SCAN_BUDGET,
    SCAN_LIMIT,
    check_deny_pattern,
)
from appliance.policy.limits_schema import RoleBudgets, RoleLimits, Spend
from appliance.x509_names import canonical

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# The model part of "provider/model"; one extra "/" segment admits OpenRouter-style "vendor/model" ids.
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._:-]{0,127})?$"
_MODEL_RE = re.compile(MODEL_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_GLOB_BODY_RE = re.compile(r"^[A-Za-z0-9._:/*?-]{1,256}$")
_TOOL_GLOB_RE = re.compile(r"^[A-Za-z0-9_.:*?-]{1,128}$")
_WILDCARDS = frozenset("*?")
_MAX_ERRORS_SHOWN = 8

DataClass = Literal["phi", "deidentified", "public"]
"""The data-class vocabulary: what a request declares and what a route may receive."""
DATA_CLASSES: tuple[DataClass, ...] = get_args(DataClass)
DATA_CLASS_RANK: dict[str, int] = {name: len(DATA_CLASSES) - 1 - i for i, name in enumerate(DATA_CLASSES)}
"""Strictness (phi 2, deidentified 1, public 0): declaring a stricter class than the role's is allowed."""


def _name(value: str) -> str:
    if _NAME_RE.fullmatch(value) is None:
        raise ValueError(f"{value[:70]!r} is not a name (1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric)")
    return value


Name = Annotated[str, AfterValidator(_name), WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})]
RouteKind = Literal["local", "openai", "anthropic"]
Auth = Literal["bearer", "x-api-key", "none"]

DEFAULT_AUTH: dict[str, Auth] = {"local": "none", "openai": "bearer", "anthropic": "x-api-key"}
"""A route's ``auth`` when the policy leaves it out, by ``kind``."""
DEFAULT_DATA_CLASSES: dict[str, list[DataClass]] = {
    "local": list(DATA_CLASSES),
    "openai": ["deidentified", "public"],
    "anthropic": ["deidentified", "public"],
}
"""A route's ``data_classes`` when the policy leaves them out, by ``kind`` (the design's rule: a local
route takes every class; a cloud route takes PHI only when the policy says so, for a provider under a BAA)."""
SCHEMA_HINT = "`phi-gateway policy schema` prints every field"


def split_model(model: str) -> tuple[str, str] | None:
    """``"provider/model"`` -> ``(provider, model)``; None when either part is not a valid name."""
    provider, sep, rest = model.partition("/")
    if not sep or _NAME_RE.fullmatch(provider) is None or _MODEL_RE.fullmatch(rest) is None:
        return None
    return provider, rest


def has_wildcard(glob: str) -> bool:
    return not _WILDCARDS.isdisjoint(glob)


class _Frozen(BaseModel):
    # use_attribute_docstrings: the docstring under each field is its JSON Schema description, so
    # ``policy schema`` and the README's reference say what the code says.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


def _by_kind(defaults: dict[str, Any], **constraints: Any) -> Any:
    """A route field whose default depends on the route's ``kind`` (a field validated before it): its
    JSON Schema has no single ``default`` but ``x-default-by-kind`` (what the reference prints)."""

    def default(fields: dict[str, Any]) -> Any:
        return copy.deepcopy(defaults.get(fields.get("kind", "")))  # None: the kind itself is refused

    def schema(json_schema: dict[str, Any]) -> None:
        json_schema.pop("default", None)
        json_schema["x-default-by-kind"] = copy.deepcopy(defaults)

    return Field(default_factory=default, json_schema_extra=schema, **constraints)


class Scope(_Frozen):
    """Where the policy may be imported: an appliance refuses a bundle that does not name its site."""

    sites: list[Name] = Field(min_length=1)
    """Site ids this policy may be imported on: each appliance's ``site`` (``init --site``)."""


class RouteSpec(_Frozen):
    """Where ``provider/model`` requests go: the key under ``routes`` is the provider part of the name."""

    kind: RouteKind
    """``local`` (llama.cpp in process), ``openai`` (any OpenAI-compatible server: OpenAI, vLLM, Ollama,
    llama-server, OpenRouter) or ``anthropic``."""
    base_url: str | None = None
    """http(s) URL of the upstream API; required for openai/anthropic, forbidden for local."""
    auth: Auth = _by_kind(DEFAULT_AUTH)
    """How the key set with ``keys set <route>`` is sent. Absent: by kind (local: none, openai: bearer,
    anthropic: x-api-key)."""
    data_classes: list[DataClass] = _by_kind(DEFAULT_DATA_CLASSES, min_length=1)
    """Data classes this route may receive. Absent: by kind (local: all three; openai and anthropic:
    deidentified and public), so a cloud route under a BAA must list ``phi`` itself."""
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """Seconds an upstream may take to answer (504 ``upstream_timeout`` after); not used by local."""

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
    """A GGUF file served in process by llama.cpp, pinned by its hash (the air gap's supply-chain check)."""

    file: str
    """A bare file name under ``<home>/models/``."""
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    """SHA-256 of the file, 64 lowercase hex characters."""
    n_ctx: int = Field(default=2048, ge=16, le=1 << 20)
    """Context window in tokens (prompt plus completion); a request that cannot fit is refused (400)."""
    slots: int | None = Field(default=None, ge=1, le=64)
    """Requests the model decodes together (continuous batching), each with the whole ``n_ctx``; the
    cache holds ``slots x n_ctx`` tokens. Unset: 16,384 tokens of cache in all, 1 to 8 slots."""

    @field_validator("file")
    @classmethod
    def _bare_name(cls, value: str) -> str:
        if _FILE_RE.fullmatch(value) is None or ".." in value:
            raise ValueError("file must be a bare file name (no folders, no '..') under <home>/models/")
        return value


class ToolRules(_Frozen):
    """Which tools (functions) a request of the role may carry."""

    allow: list[str] = Field(default=[], max_length=256)
    """Globs over tool/function names a request of the role may carry (``*`` and ``?``)."""
    on_violation: Literal["deny", "drop"] = "deny"
    """A tool outside ``allow``: deny the request (403), or drop the tool and go on (an intervention)."""

    @field_validator("allow")
    @classmethod
    def _check_globs(cls, globs: list[str]) -> list[str]:
        for glob in globs:
            if _TOOL_GLOB_RE.fullmatch(glob) is None:
                raise ValueError(f"{glob[:70]!r} is not a tool name glob (1-128 of A-Z a-z 0-9 _ . : - * ?)")
        return globs


class DenyPattern(_Frozen):
    """A regular expression that refuses a request whose message text matches it."""

    id: Name
    """Named in the 403 message and the audit record (the pattern itself is never shown)."""
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_LENGTH)
    """A Python ``re`` pattern searched over the request's message text. Checked at import: no
    backreferences, no unbounded repeats (``*``, ``+``, ``{n,}``: write ``{0,64}``), a bounded
    backtracking cost (``check_deny_pattern``)."""

    @field_validator("pattern")
    @classmethod
    def _safe(cls, pattern: str) -> str:
        check_deny_pattern(pattern)
        return pattern


class PromptRules(_Frozen):
    """What a request's messages may contain, and how many completion tokens it may ask for."""

    deny_patterns: list[DenyPattern] = Field(default=[], max_length=MAX_DENY_PATTERNS)
    """A request whose message text matches any of these is denied (``prompt_denied``)."""
    max_messages: int | None = Field(None, ge=1, le=100_000)
    """Most messages one request may carry."""
    max_chars: int | None = Field(None, ge=1, le=1 << 30)
    """Most characters of message text, all messages together."""
    max_tokens: int | None = Field(None, ge=1, le=1 << 24)
    """Clamp: a request asking for more completion tokens, or naming none, gets this many."""

    @model_validator(mode="after")
    def _check_patterns(self) -> PromptRules:
        ids = [p.id for p in self.deny_patterns]
        if len(set(ids)) != len(ids):
            raise ValueError("deny_patterns: each id must be unique within the role")
        cost = sum(check_deny_pattern(p.pattern) for p in self.deny_patterns)
        if cost > MAX_PATTERN_COST:
            raise ValueError(
                f"deny_patterns: backtracking cost {cost} is above {MAX_PATTERN_COST}; narrow the {{m,n}} "
                "ranges (each variable repeat multiplies the cost by its range)"
            )
        return self


class ClientCertificate(_Frozen):
    """A client certificate (mutual TLS) the caller's connection must present, verified against the CA
    file of the ``server.tls.client_ca_file`` setting; its subject is recorded with the caller."""

    required: bool = True
    """Refuse (403 ``client_certificate_required``) a request whose connection presented none. With
    ``false``, a connection without a certificate passes, and one with a certificate must still match
    ``subjects``."""
    subjects: list[str] = Field(default=[], max_length=256)
    """Accepted subjects, as RFC 4514 strings (``CN=radiology-bot,O=St Example``, most specific first, as
    ``openssl x509 -noout -subject -nameopt RFC2253`` prints them; compared in one canonical form, so
    escaping may differ); empty: any certificate the site's client CA signed."""

    @field_validator("subjects")
    @classmethod
    def _canonical_subjects(cls, subjects: list[str]) -> list[str]:
        return [canonical(subject) for subject in subjects]


class Role(_Frozen):
    """What callers with tokens of this role may do (``token issue --org O --role R``)."""

    models: list[str]
    """Globs over ``provider/model`` (``*`` and ``?``); provider is a route name or ``*``. The first glob
    that matches, in this order, is the rule an allowed request's record names."""
    default_data_class: DataClass = "phi"
    """The class of a request that sends no ``X-Phi-Data-Class`` header."""
    priority: int = Field(0, ge=-1000, le=1000)
    """Place in a local model's queue: lower runs sooner (a radiology assistant before a batch job)."""
    declarable_data_classes: list[DataClass] | None = None
    """Classes less strict than the default that a caller may declare with ``X-Phi-Data-Class``."""
    tools: ToolRules | None = None
    """Which tools a request may carry; absent: any."""
    prompt: PromptRules | None = None
    """Deny patterns, message and size caps, the ``max_tokens`` clamp."""
    force_model: str | None = None
    """Every request of the role goes to this ``provider/model`` (the cllama primary slot)."""
    limits: RoleLimits | None = None
    """Request and token rates; absent: none. A request counts when it is admitted."""
    budgets: RoleBudgets | None = None
    """Spend caps in USD, from ``pricing``; absent: none (the organization's budgets still apply)."""
    client_certificate: ClientCertificate | None = None
    """Mutual TLS for this role's callers; absent: the organization's rule, if any."""

    @field_validator("models")
    @classmethod
    def _check_globs(cls, globs: list[str]) -> list[str]:
        for glob in globs:
            provider, sep, rest = glob.partition("/")
            if not sep or not rest or _GLOB_BODY_RE.fullmatch(rest) is None:
                raise ValueError(f"{glob!r} is not a 'provider/model' glob")
            if provider != "*" and _NAME_RE.fullmatch(provider) is None:
                raise ValueError(f"{glob!r}: the provider must be a route name or '*'")
        return globs


class Organization(_Frozen):
    """A tenant of the appliance: its roles, and caps shared by all of them."""

    roles: dict[Name, Role]
    """Role name -> its rules; a token names one organization and one of its roles."""
    budgets: Spend | None = None
    """Spend caps for the whole organization, all its roles together; absent: none."""
    client_certificate: ClientCertificate | None = None
    """Mutual TLS for every caller of the organization (a role's own rule takes precedence)."""


class TrustKey(_Frozen):
    """One public key of a new trust set (the fields of a ``policy keygen`` ``.pub`` file)."""

    keytype: Literal["ed25519"]
    """Always ``ed25519``."""
    scheme: Literal["ed25519"]
    """Always ``ed25519`` (the signature algorithm is pinned per key, never chosen by a signature)."""
    public: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    """The raw Ed25519 public key, 64 lowercase hex characters."""
    keyid: str | None = None
    """Optional, as a ``.pub`` file states it: the key's id, which must then be the SHA-256 of ``public``
    (the id the key is filed under)."""


class TrustSpec(_Frozen):
    """A new trust set carried by a bundle: installed only if a threshold of the current keys AND of
    these keys signed it (checked by ``importer``); never trusted on its own."""

    threshold: int = Field(ge=1, le=32)
    """Distinct signatures of these keys every later bundle needs (at most the number of keys)."""
    keys: dict[str, TrustKey] = Field(min_length=1, max_length=32)
    """Keyed by keyid: the hex SHA-256 of the raw public key."""

    @model_validator(mode="after")
    def _check_keys(self) -> TrustSpec:
        if self.threshold > len(self.keys):
            raise ValueError(f"threshold {self.threshold} is above the number of keys ({len(self.keys)})")
        for keyid, key in self.keys.items():
            raw = bytes.fromhex(key.public)
            actual = hashlib.sha256(raw).hexdigest()
            if key.keyid is not None and key.keyid != actual:
                raise ValueError(
                    f"keys.{keyid[:8]}: the stated keyid does not match the key: it states {key.keyid[:80]}, "
                    f"and the key's id is {actual}"
                )
            if actual != keyid:
                raise ValueError(f"keys.{keyid[:8]}: the keyid is not the SHA-256 of the key")
            try:
                Ed25519PublicKey.from_public_bytes(raw)
            except ValueError as exc:
                raise ValueError(f"keys.{keyid[:8]}: not an Ed25519 public key") from exc
        return self


class Price(_Frozen):
    """What one model costs, in USD per million tokens; budgets and ``cost_usd`` are computed from it."""

    input_per_mtok: float = Field(ge=0)
    """USD per million prompt tokens."""
    output_per_mtok: float = Field(ge=0)
    """USD per million completion tokens."""


_EARLIEST_DATE = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST_DATE = datetime(9000, 1, 1, tzinfo=UTC)
_DATES_ALLOWED = f"a date from {_EARLIEST_DATE.year} to {_LATEST_DATE.year - 1}, in UTC"


class Policy(_Frozen):
    """The policy document: the payload of a signed bundle (``policy sign``, ``policy import``)."""

    version: int = Field(ge=1, le=2**62)
    """Each import must carry a higher version than the policy in force (a rollback is refused)."""
    issued_at: AwareDatetime
    """RFC 3339 time with an offset (``2026-11-25T00:00:00Z``); refused while more than 5 minutes ahead
    of the appliance's clock."""
    expires_at: AwareDatetime
    """RFC 3339 time, later than ``issued_at``; from then on every request is refused (503) until a newer
    policy is imported."""
    scope: Scope
    """The sites this policy may be imported on."""
    routes: dict[Name, RouteSpec]
    """Route name -> where its requests go; a model is named ``<route>/<model>``."""
    models: dict[str, LocalModelSpec] = {}
    """``local/<name>`` -> the GGUF file it serves; every model of a ``local`` route must be listed here
    (upstream models need no entry). Listed in ``GET /v1/models`` for roles whose globs allow them."""
    organizations: dict[Name, Organization]
    """Organization name -> its roles and shared budgets."""
    pricing: dict[str, Price] = {}
    """``provider/model`` -> its price; an unpriced model costs 0 and its record says ``unpriced_model``.
    Priced models are listed in ``GET /v1/models`` for roles whose globs allow them."""
    aliases: dict[Name, str] = {}
    """Alias name (no ``/``) -> ``provider/model``: a request for the alias goes to the target. An alias is
    listed in ``GET /v1/models`` for roles whose globs allow its target."""
    fallbacks: dict[str, list[str]] = {}
    """``provider/model`` -> ordered alternatives, tried when it is busy or down before answering; only
    those the role allows and whose route may receive the request's data class are tried."""
    trust: TrustSpec | None = None
    """A new trust set (key rotation), installed by the import that carries it."""

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        # A valid date with an offset can leave datetime's range in UTC (9999-12-31T23:59-23:59); and
        # expiry checks add durations to these: keep them well inside the range, as a schema error.
        try:
            moment = value.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"out of range: {_DATES_ALLOWED}") from None
        if not _EARLIEST_DATE <= moment < _LATEST_DATE:
            raise ValueError(f"out of range: {_DATES_ALLOWED}")
        return moment

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
                path = f"organizations.{org_name}.roles.{role_name}"
                for i, glob in enumerate(role.models):
                    where = f"{path}.models[{i}]"
                    provider = glob.partition("/")[0]
                    if provider == "*":
                        continue
                    route = self.routes.get(provider)
                    if route is None:
                        raise ValueError(f"{where}: {glob!r} names undefined route {provider!r}")
                    if route.kind == "local" and not has_wildcard(glob) and glob not in self.models:
                        raise ValueError(f"{where}: {glob!r} names a local model not listed in models")
                if role.force_model is not None:
                    self._check_model_ref(f"{path}.force_model", role.force_model)
                    if not any(fnmatch.fnmatchcase(role.force_model, g) for g in role.models):
                        raise ValueError(
                            f"{path}.force_model: {role.force_model!r} is not allowed by the role's models"
                        )
        for alias, target in self.aliases.items():
            self._check_model_ref(f"aliases.{alias}", target)
        for key, alternatives in self.fallbacks.items():
            self._check_model_ref("fallbacks", key)
            if len(set(alternatives)) != len(alternatives) or key in alternatives:
                raise ValueError(f"fallbacks.{key}: alternatives must be distinct and differ from the key")
            for i, alternative in enumerate(alternatives):
                self._check_model_ref(f"fallbacks.{key}[{i}]", alternative)
        for key in self.pricing:
            parts = split_model(key)
            if parts is None:
                raise ValueError(f"pricing: {key!r} is not a valid 'provider/model' name")
            if parts[0] not in self.routes:
                raise ValueError(f"pricing: {key!r} names undefined route {parts[0]!r}")
        return self

    def _check_model_ref(self, where: str, model: str) -> None:
        """A concrete ``provider/model`` named by the policy: a defined route, a listed local model."""
        parts = split_model(model)
        if parts is None:
            raise ValueError(f"{where}: {model[:70]!r} is not a valid 'provider/model' name")
        route = self.routes.get(parts[0])
        if route is None:
            raise ValueError(f"{where}: {model!r} names undefined route {parts[0]!r}")
        if route.kind == "local" and model not in self.models:
            raise ValueError(f"{where}: {model!r} names a local model not listed in models")


def scan_limit(prompt: PromptRules) -> int:
    """Characters of message text a role's deny patterns scan; longer text is denied (fail closed)."""
    cost = sum(check_deny_pattern(p.pattern) for p in prompt.deny_patterns)
    return SCAN_LIMIT if cost == 0 else min(SCAN_LIMIT, SCAN_BUDGET // cost)


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
    """One line per error, ``field.path: reason``, at most a handful; a missing or unknown field names
    the fields its place takes and points to ``policy schema``."""
    errors = exc.errors(include_url=False, include_input=False)
    # A default that depends on a field that failed (a route's kind) adds nothing to that field's error.
    errors = [err for err in errors if err["type"] != "default_factory_not_called"]
    lines, hint = [], False
    for err in errors[:_MAX_ERRORS_SHOWN]:
        loc = [p for p in err["loc"] if p != "[key]"]  # a bad dict key: its path already names it
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        reason = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            reason, hint = "a required field is missing", True
        elif err["type"] == "extra_forbidden":
            fields = ", ".join(_fields_at(Policy, loc[:-1]))
            reason, hint = "unknown field" + (f" (the fields here: {fields})" if fields else ""), True
        lines.append(f"{path}: {reason}" if path else reason)
    if len(errors) > _MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more")
    return "the policy document is invalid: " + "; ".join(lines) + (f" ({SCHEMA_HINT})" if hint else "")


def _fields_at(model: Any, loc: list[Any]) -> list[str]:
    """The field names of the object at ``loc`` (a path into a ``Policy``), or none if it is no model."""
    node: Any = model
    for step in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(step))
            node = None if field is None else field.annotation
        else:  # a dict's value or a list's item, under Optional
            inner = [a for a in get_args(node) if a is not type(None)]
            node = inner[-1] if inner else None
        while node is not None and not isinstance(node, type) and type(None) in get_args(node):
            node = next(a for a in get_args(node) if a is not type(None))
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


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
