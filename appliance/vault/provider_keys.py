"""Upstream provider API keys, sealed in the vault under the master key.

Owns: the ``provider_keys`` table (one sealed key per route name, as set by ``keys set <route>``), and the
fingerprint that lets an operator tell keys apart without seeing them (``sha256:`` + 12 hex).

Must never: store, list, log or ``repr`` a key in clear; return anything but the fingerprint from a
listing. A sealed value is bound to its route name (AES-GCM associated data), so a row copied onto another
name does not open.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import sqlite_utils

from appliance.errors import OperatorError
from appliance.vault.change_mark import MAX_AGE_S, ChangeMark, Mark
from appliance.vault.db import Database, Migration
from appliance.vault.sealing import MasterKey

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A key travels in an HTTP header: anything outside printable ASCII (spaces, control characters, CR/LF)
# is either a paste accident or a header injection, never a real key.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


def _create_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE provider_keys ("
        " name TEXT PRIMARY KEY,"
        " sealed BLOB NOT NULL,"
        " fingerprint TEXT NOT NULL,"
        " created_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)"
    )


MIGRATIONS = [Migration("provider_keys-0001-create", _create_table)]


def fingerprint(secret: str) -> str:
    """``sha256:`` + the first 12 hex digits of the key's SHA-256: names a key without revealing it."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def _aad(name: str) -> bytes:
    return b"provider_key:" + name.encode()


Also = Callable[[sqlite3.Connection, int], object]
"""Runs inside a key change's transaction with the rows it replaced or removed (its ``admin`` record)."""


class ProviderKeys:
    """Sealed provider keys: ``set`` and ``remove`` go through the writer, ``get`` is one indexed read."""

    def __init__(self, db: Database, master: MasterKey) -> None:
        self._db = db
        self._master = master
        # Route name -> (key, when opened): answered from memory while the vault's change mark is unchanged
        # (keys set/remove bump it, in any process) and for at most MAX_AGE_S.
        self._mark = ChangeMark(db.path)
        self._seen: Mark = None
        self._cache: dict[str, tuple[str | None, float]] = {}

    def set(
        self, name: str, secret: str, also: Callable[[sqlite3.Connection, int], object] | None = None
    ) -> str:
        """Seal ``secret`` as route ``name``'s key (replacing any previous one); return its fingerprint.
        ``also(conn, replaced)`` runs in the same transaction (1 when a key was replaced: a rotation)."""
        if not _NAME.fullmatch(name):
            raise OperatorError(f"invalid route name {name!r}: use letters, digits, '.', '_' or '-'")
        secret = secret.strip()
        if not secret:
            raise OperatorError(f"the key for {name} is empty")
        if not _KEY_CHARS.fullmatch(secret):
            raise OperatorError(f"the key for {name} contains spaces or control characters; check the paste")
        fp = fingerprint(secret)
        sealed = self._master.seal(secret.encode(), _aad(name))

        def write(conn: sqlite3.Connection) -> None:
            replaced = conn.execute("SELECT count(*) FROM provider_keys WHERE name = ?", (name,)).fetchone()[
                0
            ]
            conn.execute(
                "INSERT INTO provider_keys (name, sealed, fingerprint, created_at, updated_at)"
                " VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),"
                " strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
                " ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed,"
                " fingerprint = excluded.fingerprint, updated_at = excluded.updated_at",
                (name, sealed, fp),
            )
            if also is not None:
                also(conn, int(replaced))

        self._db.write(write)
        self._mark.bump()
        return fp

    def get(self, name: str) -> str | None:
        """Route ``name``'s key in clear, or None when none is set (hot path: usually from memory)."""
        now = time.monotonic()
        mark = self._mark.read()
        if mark != self._seen:
            self._cache.clear()
            self._seen = mark
        cached = self._cache.get(name)
        if cached is not None and now - cached[1] < MAX_AGE_S:
            return cached[0]
        row = self._db.reader().execute("SELECT sealed FROM provider_keys WHERE name = ?", (name,)).fetchone()
        key = None if row is None else self._master.open(row[0], _aad(name)).decode()
        self._cache[name] = (key, now)
        return key

    def list(self) -> list[dict[str, Any]]:
        """Every key's name, fingerprint and timestamps, by name; never the key."""
        cur = self._db.reader().execute(
            "SELECT name, fingerprint, created_at, updated_at FROM provider_keys ORDER BY name"
        )
        return [
            {"name": n, "fingerprint": fp, "created_at": c, "updated_at": u} for n, fp, c, u in cur.fetchall()
        ]

    def remove(self, name: str, also: Also | None = None) -> bool:
        """Delete the key of route ``name``; False when there was none. ``also(conn, removed)`` runs in the
        same transaction."""

        def write(conn: sqlite3.Connection) -> bool:
            removed = conn.execute("DELETE FROM provider_keys WHERE name = ?", (name,)).rowcount
            if also is not None:
                also(conn, removed)
            return removed > 0

        removed: bool = self._db.write(write)
        self._mark.bump()
        return removed

    def __repr__(self) -> str:
        return f"ProviderKeys(db={str(self._db.path)!r})"
