"""Caller identity: API tokens ``<caller-id>:<48 hex>``, issued, revoked, imported, and checked per request.

Owns: the ``tokens`` table (SHA-256 of each token, never the token), token issue/revoke/list, export and
import between the nodes of a site (hashes only), import from a cllama context directory
(``<agent-id>/metadata.json`` with a ``token`` field, read into ``CllamaAgent`` first so the caller can
check and record the org and role each token gets), and ``authenticate``: the IDENTIFY phase, which turns the
request's ``Authorization: Bearer`` (or ``x-api-key``) header into a ``Caller(id, org, role)``.

Must never: store, log, list or echo a token in clear (``issue`` returns it once; that is the only time it
exists outside the caller's hands); tell a client which part of a well-formed token was wrong (unknown,
wrong secret, revoked and expired all give the one 403 message); compare secrets except in constant time;
answer from memory after a change: every issue, revoke and import bumps the vault's change mark
(``change_mark``), which the per-request check reads, so a revocation by another process (the operator
CLI) takes effect on the next request. Checks found valid are cached (hash -> caller, at most
``MAX_AGE_S``): measured, the per-request SQLite read cost the gateway about a fifth of its throughput.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance.errors import Forbidden, OperatorError, Unauthorized
from appliance.timestamps import rfc3339
from appliance.vault.change_mark import MAX_AGE_S, ChangeMark, Mark
from appliance.vault.db import Database, Migration

CALLER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63}):[0-9a-f]{48}")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr][ \t]+(\S+)")
_SECRET_BYTES = 24
_HASH = re.compile(r"[0-9a-f]{64}")
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
_EXPORTED = ("caller", "org", "role", "token_sha256", "created_at", "expires_at", "revoked_at", "note")
"""The columns ``token export`` writes and ``token import`` reads, in this order."""

Also = Callable[[sqlite3.Connection, int], object]
"""Runs inside an operator change's transaction with the rows it changed (its ``admin`` record)."""

_REVOKE = "UPDATE tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE revoked_at IS NULL AND "

MALFORMED = "missing or malformed API token; expected 'Authorization: Bearer <caller-id>:<48 hex>'"
INVALID = "the API token is not valid"

# Expired tokens are filtered in SQL: timestamps are all written as "YYYY-MM-DDTHH:MM:SS.mmmZ", which
# sorts as time does, and strftime('%f') yields the same shape.
_CACHE_MAX = 100_000
_LOOKUP = (
    "SELECT id, org, role, token_sha256, expires_at FROM tokens"
    " WHERE caller = ? AND revoked_at IS NULL"
    " AND (expires_at IS NULL OR expires_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
)


def _create_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE tokens ("
        " id INTEGER PRIMARY KEY,"
        " caller TEXT NOT NULL,"
        " org TEXT NOT NULL,"
        " role TEXT NOT NULL,"
        " token_sha256 TEXT NOT NULL UNIQUE,"
        " created_at TEXT NOT NULL,"
        " expires_at TEXT,"
        " revoked_at TEXT,"
        " note TEXT)"
    )
    db.execute("CREATE INDEX tokens_caller ON tokens (caller)")


MIGRATIONS = [Migration("tokens-0001-create", _create_table)]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the token's caller id, and the organisation and role the policy knows them by."""

    id: str
    org: str
    role: str
    token_id: int


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def format_ts(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, the one timestamp shape stored in the vault."""
    if moment.tzinfo is None:
        raise OperatorError("an expiry time must carry a time zone (e.g. 2027-01-01T00:00:00Z)")
    return rfc3339(moment)


def _check_name(kind: str, value: str) -> None:
    if not isinstance(value, str) or not CALLER_ID.fullmatch(value):
        raise OperatorError(
            f"invalid {kind} {value!r}: 1-64 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


class TokenStore:
    """The token table and the per-request check. Writes go through the vault writer; reads are direct."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Token hash -> (caller, expiry as epoch seconds, when cached). Answered from memory only while the
        # change mark is as it was when the entry was cached, and for at most MAX_AGE_S: a revocation by
        # the CLI bumps the mark, so the next request sees it.
        self._mark = ChangeMark(db.path)
        self._seen: Mark = None
        self._cache: dict[str, tuple[Caller, float, float]] = {}

    # -- operator verbs -----------------------------------------------------------------------------------

    def issue(
        self,
        caller: str,
        org: str,
        role: str,
        *,
        expires_at: datetime | None = None,
        note: str | None = None,
        also: Also | None = None,
    ) -> str:
        """Create a token for ``caller``; return it. It is never stored or shown again: hand it over now.
        ``also(conn, 1)`` runs in the same transaction (the admin socket's record of the issue)."""
        _check_name("caller id", caller)
        _check_name("organization", org)
        _check_name("role", role)
        expires = format_ts(expires_at) if expires_at is not None else None
        token = f"{caller}:{secrets.token_hex(_SECRET_BYTES)}"
        digest = _token_hash(token)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tokens (caller, org, role, token_sha256, created_at, expires_at, note)"
                " VALUES (?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?, ?)",
                (caller, org, role, digest, expires, note),
            )
            if also is not None:
                also(conn, 1)

        self._db.write(write)
        self._mark.bump()
        return token

    def list(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        """Tokens by id (expired ones included, revoked ones on request); never hashes or secrets."""
        sql = "SELECT id, caller, org, role, created_at, expires_at, revoked_at, note FROM tokens"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        cur = self._db.reader().execute(sql + " ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def revoke(self, caller: str, also: Also | None = None) -> int:
        """Revoke every not-yet-revoked token of ``caller``; return how many. ``also(conn, count)`` runs in
        the same transaction (here and in the other changes below: the admin socket's record of it)."""
        return self._change(_REVOKE + "caller = ?", (caller,), also)

    def revoke_id(self, token_id: int, also: Also | None = None) -> bool:
        """Revoke one token by id; False when there is no such active token."""
        return self._change(_REVOKE + "id = ?", (token_id,), also) > 0

    def set_expiry(self, token_id: int, expires_at: datetime | None, also: Also | None = None) -> bool:
        """Give an active token a new expiry (``None``: none); False when there is no such active token."""
        expires = format_ts(expires_at) if expires_at is not None else None
        sql = "UPDATE tokens SET expires_at = ? WHERE id = ? AND revoked_at IS NULL"
        return self._change(sql, (expires, token_id), also) > 0

    def _change(self, sql: str, args: tuple[Any, ...], also: Also | None) -> int:
        def write(conn: sqlite3.Connection) -> int:
            count: int = conn.execute(sql, args).rowcount  # sql is one of the literals above
            if also is not None:
                also(conn, count)
            return count

        count: int = self._db.write(write)
        self._mark.bump()
        return count

    def import_cllama(self, directory: Path, *, org: str, role: str) -> builtins.list[tuple[str, str]]:
        """Import the tokens of a cllama context directory (``<agent-id>/metadata.json`` ``token``):
        ``import_agents(read_cllama(...))``. Returns ``(agent-id, outcome)`` for every agent directory."""
        return self.import_agents(self.read_cllama(directory, org=org, role=role))

    def read_cllama(self, directory: Path, *, org: str, role: str) -> builtins.list[CllamaAgent]:
        """Read a cllama context directory: every agent directory, what its token would be granted, or why
        it is skipped. Nothing is written.

        ``org``/``role`` fields in a metadata file win over the defaults given here (cllama itself
        defines ``token``, ``pod``, ``service``, ``type``; none of those is a policy organisation or
        role), and each ``CllamaAgent`` says which it took from there.
        """
        _check_name("organization", org)
        _check_name("role", role)
        if not directory.is_dir():
            raise OperatorError(f"{directory} is not a directory (expected a cllama context root)")
        return [
            _read_cllama_agent(entry, org, role) for entry in sorted(directory.iterdir()) if entry.is_dir()
        ]

    def import_agents(self, agents: builtins.list[CllamaAgent]) -> builtins.list[tuple[str, str]]:
        """Store the token hash of every agent without a ``problem``, with the org and role it names.

        Returns ``(agent-id, outcome)`` for each: ``imported``, or why it was skipped (a malformed entry
        is reported and skipped, never imported; a token already present is kept as it was).
        """
        importable = [agent for agent in agents if not agent.problem]

        def write(conn: sqlite3.Connection) -> dict[str, str]:
            done: dict[str, str] = {}
            for agent in importable:
                cur = conn.execute(
                    "INSERT INTO tokens (caller, org, role, token_sha256, created_at, note)"
                    " VALUES (?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'imported from cllama')"
                    " ON CONFLICT (token_sha256) DO NOTHING",
                    (agent.caller, agent.org, agent.role, agent.token_sha256),
                )
                done[agent.caller] = (
                    "imported" if cur.rowcount else "skipped: token already present (kept as it was)"
                )
            return done

        outcomes = self._db.write(write) if importable else {}
        self._mark.bump()
        return [(agent.caller, agent.problem or outcomes[agent.caller]) for agent in agents]

    def export_rows(self) -> builtins.list[dict[str, Any]]:
        """Every token with its hash (not its secret: the hash cannot be turned back into a token), for
        ``import_rows`` on another node of the same site; revoked ones too, so revocations travel."""
        sql = (
            "SELECT caller, org, role, token_sha256, created_at, expires_at, revoked_at, note FROM tokens"
            " ORDER BY id"
        )  # the columns of _EXPORTED, in its order
        cur = self._db.reader().execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def import_rows(
        self,
        rows: builtins.list[dict[str, Any]],
        record: Callable[[sqlite3.Connection, str, str], object] | None = None,
    ) -> builtins.list[tuple[str, str]]:
        """Make this node's tokens match another node's export: new hashes are added, a token revoked
        there is revoked here, an active token's expiry follows; nothing is ever un-revoked, and a token
        whose expiry has passed here stays expired. ``record(conn, caller, detail)`` runs in the same
        transaction for every change (its ``admin`` record). Returns ``(caller, outcome)`` for each row."""
        checked = [_import_row(row, number) for number, row in enumerate(rows, 1)]
        now = format_ts(datetime.now(UTC))

        def write(conn: sqlite3.Connection) -> builtins.list[tuple[str, str]]:
            done = []
            for row in checked:
                digest = row["token_sha256"]
                found = conn.execute(
                    "SELECT caller, revoked_at, expires_at FROM tokens WHERE token_sha256 = ?", (digest,)
                ).fetchone()
                facts = f"org={row['org']} role={row['role']} sha256={digest[:16]}"
                if found is None:
                    conn.execute(
                        "INSERT INTO tokens (caller, org, role, token_sha256, created_at, expires_at,"
                        " revoked_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        tuple(row[k] for k in _EXPORTED),
                    )
                    state = " revoked" if row["revoked_at"] else ""
                    outcome, detail = f"imported{state}", f"action=add{state.replace(' ', '_')}"
                    detail += f" expires_at={row['expires_at'] or 'none'}"
                elif found[0] != row["caller"]:
                    done.append((row["caller"], f"skipped: that token belongs to {found[0]} here"))
                    continue
                elif row["revoked_at"] and found[1] is None:
                    conn.execute(_REVOKE + "token_sha256 = ?", (digest,))
                    outcome, detail = "revoked", "action=revoke"
                elif found[1] is not None or found[2] == row["expires_at"]:
                    done.append((row["caller"], "unchanged"))
                    continue
                elif found[2] is not None and found[2] <= now:
                    done.append((row["caller"], "skipped: expired here, and an import never revives a token"))
                    continue
                else:
                    conn.execute(
                        "UPDATE tokens SET expires_at = ? WHERE token_sha256 = ?", (row["expires_at"], digest)
                    )
                    outcome = f"expiry set to {row['expires_at'] or 'none'}"
                    detail = f"action=expiry expires_at={row['expires_at'] or 'none'}"
                if record is not None:
                    record(conn, row["caller"], f"token_import {detail} {facts}")
                done.append((row["caller"], outcome))
            return done

        outcomes: builtins.list[tuple[str, str]] = self._db.write(write)
        self._mark.bump()
        return outcomes

    # -- per request --------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None, x_api_key: str | None) -> Caller:
        """IDENTIFY: the Caller behind the request's token.

        401 when the token is absent or malformed; 403, with one message, when it is not valid.
        """
        token: str | None = None
        if authorization:
            match = _BEARER.fullmatch(authorization.strip())
            if match is not None:
                token = match.group(1)
        if token is None and x_api_key:
            token = x_api_key.strip()
        shape = _TOKEN.fullmatch(token) if token else None
        if shape is None or token is None:
            raise Unauthorized(MALFORMED)
        digest = _token_hash(token)
        now = time.monotonic()
        mark = self._mark.read()
        if mark != self._seen or len(self._cache) > _CACHE_MAX:
            self._cache.clear()
            self._seen = mark
        cached = self._cache.get(digest)
        if cached is not None and now - cached[2] < MAX_AGE_S and time.time() < cached[1]:
            return cached[0]
        found: Caller | None = None
        expires_at: str | None = None
        for token_id, org, role, stored, expires in self._db.reader().execute(_LOOKUP, (shape.group(1),)):
            # Every row is compared, match or not, so timing does not depend on which one matches.
            if hmac.compare_digest(stored, digest):
                found, expires_at = Caller(shape.group(1), org, role, token_id), expires
        if found is None:
            raise Forbidden(INVALID)
        expiry = math.inf if expires_at is None else datetime.fromisoformat(expires_at).timestamp()
        self._cache[digest] = (found, expiry, now)
        return found


def _import_row(row: Any, number: int) -> dict[str, Any]:
    """One row of a ``token export`` file, checked and normalised (times parsed and written again in the
    vault's one shape), or an ``OperatorError`` naming the row."""
    where = f"token row {number}"
    if not isinstance(row, dict) or set(row) - set(_EXPORTED):
        raise OperatorError(f"{where}: not a `token export` row (fields: {', '.join(_EXPORTED)})")
    for key, kind in (("caller", "caller id"), ("org", "organization"), ("role", "role")):
        _check_name(kind, row.get(key, ""))
    if not isinstance(row.get("token_sha256"), str) or not _HASH.fullmatch(row["token_sha256"]):
        raise OperatorError(f"{where} ({row['caller']}): token_sha256 must be 64 lowercase hex")
    if row.get("note") is not None and not isinstance(row["note"], str):
        raise OperatorError(f"{where} ({row['caller']}): note must be text")
    clean = {**row, "note": row.get("note")}
    for key in ("created_at", "expires_at", "revoked_at"):
        value = row.get(key)
        if value is None:
            if key == "created_at":
                raise OperatorError(f"{where} ({row['caller']}): created_at is missing")
            clean[key] = None
            continue
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if (
            moment is None
            or moment.tzinfo is None
            or not _STAMP.fullmatch(str(value))
            or moment >= _LATEST_EXPIRY
        ):
            raise OperatorError(f"{where} ({row['caller']}): {key} is not an RFC 3339 UTC time")
        clean[key] = format_ts(moment)
    return clean


@dataclass(frozen=True)
class CllamaAgent:
    """One agent directory of a cllama context as read: the organization and role its token is granted
    (and which of them its ``metadata.json`` named), or why it is skipped (``problem``)."""

    caller: str
    problem: str = ""
    org: str = ""
    role: str = ""
    from_metadata: tuple[str, ...] = ()
    """``"org"`` and/or ``"role"``: the fields metadata.json named, which won over the defaults."""
    token_sha256: str = field(default="", repr=False)

    def skipped(self, why: str) -> CllamaAgent:
        """This agent, not to be imported, for ``why`` (which starts ``skipped:``)."""
        return replace(self, problem=why)


def _read_cllama_agent(entry: Path, org: str, role: str) -> CllamaAgent:
    """One agent directory, with what its token would be granted, or why it is skipped."""
    name = entry.name
    if not CALLER_ID.fullmatch(name):
        return CllamaAgent(name, "skipped: directory name is not a valid caller id")
    try:
        meta = json.loads((entry / "metadata.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return CllamaAgent(name, "skipped: no metadata.json")
    except (OSError, UnicodeDecodeError, ValueError):
        return CllamaAgent(name, "skipped: metadata.json is not readable JSON")
    if not isinstance(meta, dict):
        return CllamaAgent(name, "skipped: metadata.json is not a JSON object")
    token = meta.get("token")
    if not isinstance(token, str) or not token:
        return CllamaAgent(name, "skipped: metadata.json has no token")
    shape = _TOKEN.fullmatch(token.strip())
    if shape is None:
        return CllamaAgent(name, "skipped: token is not <agent-id>:<48 lowercase hex>")
    if shape.group(1) != name:
        return CllamaAgent(name, "skipped: token caller does not match the directory name")
    chosen = {"org": org, "role": role}
    named: list[str] = []
    for key in chosen:
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not CALLER_ID.fullmatch(value):
            return CllamaAgent(name, f"skipped: metadata.json {key} is not a valid name")
        chosen[key] = value
        named.append(key)
    return CllamaAgent(name, "", chosen["org"], chosen["role"], tuple(named), _token_hash(token.strip()))


_DURATION = re.compile(r"^(\d+)([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
_LATEST_EXPIRY = datetime(9000, 1, 1, tzinfo=UTC)
"""Far enough for any token, and far from datetime's year 9999, so no later arithmetic overflows."""
_USAGE = "use 30d, 12h, 45m or an ISO 8601 time"
_OUT_OF_RANGE = f"out of range (a token expires before {_LATEST_EXPIRY.year})"


def parse_expiry(value: str | None, what: str = "expires") -> datetime | None:
    """A token's expiry as an operator writes it (``30d``, ``12h``, ``45m`` or an ISO 8601 moment): a
    duration from now or a moment; ``None`` is no expiry. Out-of-range values are a message, not a crash."""
    if value is None:
        return None
    match = _DURATION.match(value)
    try:
        if match:
            amount, unit = int(match.group(1)), _UNITS[match.group(2)]
            moment = datetime.now(UTC) + timedelta(**{unit: amount})
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        raise OperatorError(f"{what} {value!r}: {_OUT_OF_RANGE}") from None
    except ValueError as exc:
        raise OperatorError(f"{what} {value!r}: {_USAGE}") from exc
    if moment >= _LATEST_EXPIRY:
        raise OperatorError(f"{what} {value!r}: {_OUT_OF_RANGE}")
    return moment
