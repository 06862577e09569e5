"""The imported policies in the vault: the ``policies`` table, activation, and loading the one in force.

Owns: the table (one row per imported version, the signed envelope kept verbatim), the atomic activation
that re-checks rollback inside the write transaction, and ``load_active``, which re-verifies the stored
envelope against the trust store of the moment before the server may use it.

Must never: store a bundle that did not pass ``verify_bundle``, let two imports of one version both win,
or hand the server a policy that no longer verifies or has expired (the server then fails closed).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlite_utils

from appliance.errors import BundleRejected
from appliance.policy.importer import VerifiedBundle, verify_bundle
from appliance.policy.schema import Policy
from appliance.policy.trust import TrustStore
from appliance.timestamps import rfc3339
from appliance.vault.db import Database, Migration


def _create_policies(db: sqlite_utils.Database) -> None:
    db["policies"].create(  # type: ignore[union-attr]
        {
            "version": int,
            "sha256": str,
            "issued_at": str,
            "expires_at": str,
            "imported_at": str,
            "keyids": str,
            "envelope": bytes,
        },
        pk="version",
        not_null={"sha256", "issued_at", "expires_at", "imported_at", "keyids", "envelope"},
    )


MIGRATIONS: list[Migration] = [Migration("policy-0001-policies", _create_policies)]


@dataclass(frozen=True)
class ActivePolicy:
    version: int
    sha256: str
    imported_at: str
    envelope: bytes


class PolicyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def current(self) -> ActivePolicy | None:
        """The policy in force: the highest imported version."""
        row = (
            self.db.reader()
            .execute(
                "SELECT version, sha256, imported_at, CAST(envelope AS BLOB) FROM policies "
                "ORDER BY version DESC LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else ActivePolicy(row[0], row[1], row[2], bytes(row[3]))

    def current_version(self) -> int | None:
        row = self.db.reader().execute("SELECT MAX(version) FROM policies").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def activate(
        self, vb: VerifiedBundle, *, also: Callable[[sqlite3.Connection], object] | None = None
    ) -> None:
        """Make ``vb`` the policy in force, durably; a newer-or-equal version in force refuses it.

        ``also(conn)`` runs in the same transaction (the import's audit record: both or neither).
        """
        version = vb.policy.version

        def insert(conn: sqlite3.Connection) -> None:
            # Read inside the write transaction: another import (this process or the CLI's) may have won.
            current = conn.execute("SELECT MAX(version) FROM policies").fetchone()[0]
            if current is not None and version <= current:
                raise BundleRejected(
                    "rollback", f"policy v{version} is not newer than v{current}, imported meanwhile"
                )
            conn.execute(
                "INSERT INTO policies (version, sha256, issued_at, expires_at, imported_at, keyids, "
                "envelope) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    version,
                    vb.sha256,
                    rfc3339(vb.policy.issued_at, seconds=True),
                    rfc3339(vb.policy.expires_at, seconds=True),
                    rfc3339(datetime.now(UTC), seconds=True),
                    json.dumps(vb.keyids),
                    vb.envelope,
                ),
            )
            if also is not None:
                also(conn)

        self.db.write(insert)

    def history(self) -> list[dict[str, object]]:
        """Every imported version, newest first, without the envelope bytes."""
        rows = self.db.reader().execute(
            "SELECT version, sha256, issued_at, expires_at, imported_at, keyids FROM policies "
            "ORDER BY version DESC"
        )
        return [
            {
                "version": r[0],
                "sha256": r[1],
                "issued_at": r[2],
                "expires_at": r[3],
                "imported_at": r[4],
                "keyids": json.loads(r[5]),
            }
            for r in rows
        ]


def load_active(
    store: PolicyStore, trust: TrustStore, site: str, now: datetime | None = None
) -> tuple[Policy | None, str]:
    """The policy in force, re-verified against today's trust store; ``(None, reason)`` when there is none.

    Runs every import check but rollback, so a key removed from ``trust.json``, a raised threshold, an
    expiry or an altered row all leave the gateway with no policy (fail closed).
    """
    active = store.current()
    if active is None:
        return None, "no policy imported"
    if hashlib.sha256(active.envelope).hexdigest() != active.sha256:
        return None, f"policy v{active.version} is damaged in the vault (its SHA-256 does not match)"
    try:
        vb = verify_bundle(active.envelope, trust, site=site, current_version=None, now=now)
    except BundleRejected as exc:
        detail = str(exc).removeprefix(f"bundle rejected ({exc.check}): ")
        if exc.check == "expired":
            return None, detail
        return None, f"policy v{active.version} no longer passes the {exc.check} check: {detail}"
    if vb.policy.version != active.version:
        return (
            None,
            f"policy v{active.version} is damaged in the vault (its payload says v{vb.policy.version})",
        )
    return vb.policy, "ok"
