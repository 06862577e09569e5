"""Settings: one validated object built from ``<home>/gateway.toml`` and ``PHI_`` environment overrides.

Owns: the settings schema (nested pydantic models, a docstring under each field), the TOML file, the
override rules, and the masked rendering that ``phi-gateway config show`` prints.
Never: holds a secret in clear (provider keys live sealed in the vault, tokens only as hashes); reads
settings anywhere else (every other module receives the object).

Environment overrides name the dotted path with ``__`` between levels, upper case, prefixed ``PHI_``:
``PHI_SERVER__PORT=9090``, ``PHI_SERVER__LIMITS__MAX_BODY_BYTES=1048576``. ``PHI_HOME`` selects the home.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.errors import OperatorError
from appliance.http.limits import HttpLimits

ENV_PREFIX = "PHI_"
SETTINGS_FILE = "gateway.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TlsSettings(_Strict):
    """TLS on the public port. It is in force whenever the home holds a certificate (``<home>/tls/cert.pem``
    and ``key.pem``, made by ``phi-gateway tls self-signed`` or ``tls import``); these settings tune it."""

    min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version accepted; 1.3 is preferred whenever the client offers it."""
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    """OpenSSL cipher list for TLS 1.2 (forward secrecy and AEAD only); TLS 1.3's suites are all AEAD and
    are not changed by it."""
    client_ca_file: Path | None = None
    """PEM bundle of the CA(s) that issue client certificates (mutual TLS); relative: under the home. When
    set, a client may present a certificate, which must verify against it, and a policy may require one
    per organization or role (``client_certificate``). Read when the gateway starts."""
    reload_interval_s: float = Field(1.0, gt=0)
    """How often a running gateway looks for a new certificate in the home; a new one serves new
    connections without a restart, and open connections keep the one they began with."""


class ServerSettings(_Strict):
    host: str = "0.0.0.0"  # noqa: S104 - an appliance listens on its ward-facing interface by design
    """Address the API listens on. Plain HTTP is refused on any address but loopback unless
    ``insecure_http`` says otherwise; with a certificate in the home the port speaks TLS."""
    port: int = Field(8080, ge=0, le=65535)
    """TCP port of the OpenAI-compatible API (8080 is the cllama contract)."""
    limits: HttpLimits = Field(default_factory=HttpLimits)
    """HTTP limits: header and body sizes, timeouts, concurrency cap."""
    max_in_flight_per_caller: int = Field(64, ge=1)
    """Requests one caller (one token) may have in progress at once, counted from the moment its token is
    known, before its body is read; more are answered 429 at once, so one caller cannot take every slot."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    """TLS on the public port: protocol versions, ciphers, the client CA of mutual TLS."""
    public_metrics: bool = False
    """Also answer ``GET /metrics`` on this port, without identity and unrecorded (like ``/health``), for a
    Prometheus that cannot reach the admin socket. The metrics hold no secret and no caller's text, but
    anyone who reaches the port can read them; leave off unless the site's monitoring needs it."""
    insecure_http: bool = False
    """Serve plain HTTP on a non-loopback address when the home holds no certificate (tokens then cross
    the network in clear); without it ``serve`` refuses to start. ``serve --insecure-http`` sets it."""


class UpstreamSettings(_Strict):
    max_connections_per_origin: int = Field(64, ge=1)
    """Pooled keep-alive connections kept to each upstream provider."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Time allowed to open a connection to an upstream provider."""
    ca_file: Path | None = None
    """PEM bundle of the site's private CA, for upstreams behind an inspecting proxy."""


class LocalSettings(_Strict):
    queue_size: int = Field(16, ge=1)
    """Requests waiting for one local model before more are refused with 429."""
    idle_unload_s: float = Field(600.0, ge=0)
    """A local model unused this long is unloaded (0: never)."""
    memory_budget_mb: int | None = Field(None, ge=1)
    """Memory all loaded local models may take together, estimated from their file sizes; none: no limit."""
    preload: list[str] = Field(default_factory=list)
    """``local/<name>`` models loaded (and their pins verified) when the gateway starts."""
    request_timeout_s: float = Field(300.0, gt=0)
    """A local generation still running after this long is stopped."""
    n_threads: int | None = Field(None, ge=1)
    """CPU threads per local model (default: llama.cpp's choice)."""


class PolicySettings(_Strict):
    reload_interval_s: float = Field(1.0, gt=0)
    """How often the server looks for a newly imported policy or a changed trust file."""


class AuditSettings(_Strict):
    node: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """This appliance's name in its ledger's checkpoints, ``phi-gateway.<site>/<node>`` (give each node
    behind a load balancer its own); default: the first 12 hex digits of the appliance key id. A ledger
    keeps the name of its first checkpoint."""
    checkpoint_interval_s: float = Field(300.0, gt=0)
    """How often a signed checkpoint is stored while records flow (the head is signed every second)."""
    flood_window_s: float = Field(1.0, gt=0)
    """Refusals of requests with no valid token (401, 403 for a revoked one, and the HTTP server's own
    400/408/413/431/503): only the first of each window is recorded in full, the rest are counted in one
    record at the window's end, so an outsider cannot fill the disk with ledger rows."""
    export_file: Path | None = None
    """Continuous export: every durable audit line is appended to this file for log shippers to tail;
    rotation-safe (a renamed or truncated file is noticed and a new one started)."""


class Settings(_Strict):
    site: str = Field("unset", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """This appliance's site id; a policy bundle is accepted only if its scope names it."""
    server: ServerSettings = Field(default_factory=ServerSettings)
    """The API listener."""
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    """Connections to upstream providers."""
    policy: PolicySettings = Field(default_factory=PolicySettings)
    """Policy reloading."""
    local: LocalSettings = Field(default_factory=LocalSettings)
    """In-process local models."""
    audit: AuditSettings = Field(default_factory=AuditSettings)
    """Ledger checkpoints and continuous export."""

    def masked(self) -> str:
        """The settings as TOML-like text for operators; this model holds no secrets to mask."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def load_settings(home: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``<home>/gateway.toml`` (absent: defaults), apply ``PHI_`` overrides, validate."""
    env = os.environ if environ is None else environ
    path = home / SETTINGS_FILE
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise OperatorError(f"{path}: not valid TOML: {exc}") from exc
    for name, value in env.items():
        # Only names of this schema's sections: an unrelated PHI_ variable must not stop the gateway.
        if (
            not name.startswith(ENV_PREFIX)
            or name[len(ENV_PREFIX) :].lower().split("__")[0] not in _TOP_LEVEL
        ):
            continue
        _set_path(data, name[len(ENV_PREFIX) :].lower().split("__"), value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise OperatorError(f"invalid settings ({path} and PHI_ variables): {problems}") from exc


_TOP_LEVEL = frozenset(Settings.model_fields)


def write_settings(home: Path, settings: Settings) -> None:
    """Write the settings file that ``init`` creates (only values that differ from the defaults)."""
    lines = ["# Phi Gateway settings. Every key is optional; PHI_ variables override them.", ""]
    lines.append(f'site = "{settings.site}"')
    if settings.audit.node is not None:
        lines += ["", "[audit]", f'node = "{settings.audit.node}"']
    server = settings.server
    if server.host != ServerSettings().host or server.port != ServerSettings().port:
        lines += ["", "[server]", f'host = "{server.host}"', f"port = {server.port}"]
    (home / SETTINGS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _set_path(data: dict[str, Any], keys: list[str], value: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise OperatorError(f"PHI_{'__'.join(keys).upper()}: {key} is not a section")
        node = child
    node[keys[-1]] = value
