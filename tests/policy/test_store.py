"""The policies table: activation, history, the concurrent-import race, and load-time re-verification."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.errors import BundleRejected
from appliance.policy.importer import VerifiedBundle, verify_bundle
from appliance.policy.store import MIGRATIONS, PolicyStore, load_active
from appliance.policy.trust import TrustStore
from appliance.signing_keys import SigningKey
from appliance.vault.db import Database
from tests.policy.test_fixtures import NOW, SITE, bundle, doc, new_key, trust_of


@pytest.fixture
def signer(tmp_path: Path) -> SigningKey:
    return new_key(tmp_path, "a")


@pytest.fixture
def trust(tmp_path: Path, signer: SigningKey) -> TrustStore:
    return trust_of(tmp_path, signer)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PolicyStore]:
    with Database(tmp_path / "vault.db", MIGRATIONS) as db:
        yield PolicyStore(db)


def _verified(
    signer: SigningKey, trust: TrustStore, version: int, current: int | None = None
) -> VerifiedBundle:
    return verify_bundle(
        bundle(doc(version=version), signer), trust, site=SITE, current_version=current, now=NOW
    )


def test_empty_store(store: PolicyStore) -> None:
    assert store.current() is None and store.current_version() is None and store.history() == []


def test_activation_and_history(store: PolicyStore, signer: SigningKey, trust: TrustStore) -> None:
    first = _verified(signer, trust, 3)
    store.activate(first)
    second = _verified(signer, trust, 5, current=store.current_version())
    store.activate(second)
    current = store.current()
    assert current is not None
    assert (current.version, current.sha256, current.envelope) == (5, second.sha256, second.envelope)
    assert current.imported_at.endswith("Z") and store.current_version() == 5
    history = store.history()
    assert [h["version"] for h in history] == [5, 3]
    assert history[1] == {
        "version": 3,
        "sha256": first.sha256,
        "issued_at": "2026-11-25T00:00:00Z",
        "expires_at": "2027-02-25T00:00:00Z",
        "imported_at": history[1]["imported_at"],
        "keyids": [signer.keyid],
    }


def test_activation_rechecks_rollback_inside_the_transaction(
    store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    stale = _verified(signer, trust, 4, current=None)  # verified before v5 landed
    store.activate(_verified(signer, trust, 5))
    with pytest.raises(BundleRejected, match="v4 is not newer than v5") as info:
        store.activate(stale)
    assert info.value.check == "rollback" and store.current_version() == 5


def test_concurrent_imports_of_one_version_have_one_winner(
    store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    bundles = [_verified(signer, trust, 8) for _ in range(8)]
    barrier = threading.Barrier(len(bundles))
    outcomes: list[str] = []

    def run(vb: VerifiedBundle) -> None:
        barrier.wait()
        try:
            store.activate(vb)
            outcomes.append("won")
        except BundleRejected as exc:
            outcomes.append(exc.check)

    threads = [threading.Thread(target=run, args=(vb,)) for vb in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["rollback"] * 7 + ["won"]
    assert [h["version"] for h in store.history()] == [8]


def test_two_processes_sharing_the_vault_cannot_both_win(
    tmp_path: Path, signer: SigningKey, trust: TrustStore
) -> None:
    # The server and an operator's CLI each have their own writer on the same file.
    vb = _verified(signer, trust, 9)
    with (
        Database(tmp_path / "vault.db", MIGRATIONS) as one,
        Database(tmp_path / "vault.db", MIGRATIONS) as two,
    ):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def run(db: Database) -> None:
            barrier.wait()
            try:
                PolicyStore(db).activate(vb)
                outcomes.append("won")
            except BundleRejected as exc:
                outcomes.append(exc.check)

        threads = [threading.Thread(target=run, args=(db,)) for db in (one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["rollback", "won"]
        assert PolicyStore(two).current_version() == PolicyStore(one).current_version() == 9


# -- load_active ------------------------------------------------------------------------------------------


def test_load_active_without_a_policy(store: PolicyStore, trust: TrustStore) -> None:
    assert load_active(store, trust, SITE, NOW) == (None, "no policy imported")


def test_load_active_returns_the_verified_policy(
    store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    store.activate(_verified(signer, trust, 7))
    policy, reason = load_active(store, trust, SITE, NOW)
    assert reason == "ok" and policy is not None and policy.version == 7


def test_load_active_fails_closed_once_the_key_is_no_longer_trusted(
    tmp_path: Path, store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    store.activate(_verified(signer, trust, 7))
    trust.remove(signer.keyid)
    assert load_active(store, trust, SITE, NOW)[0] is None
    other = new_key(tmp_path, "other")
    policy, reason = load_active(store, trust_of(tmp_path, other), SITE, NOW)
    assert policy is None
    assert reason.startswith("policy v7 no longer passes the unknown_key check: ")


def test_load_active_fails_closed_when_the_threshold_rises(
    tmp_path: Path, store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    store.activate(_verified(signer, trust, 7))
    stricter = trust_of(tmp_path, signer, new_key(tmp_path, "b"), threshold=2)
    policy, reason = load_active(store, stricter, SITE, NOW)
    assert policy is None and "threshold" in reason


def test_load_active_fails_closed_after_expiry(
    store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    store.activate(_verified(signer, trust, 7))
    later = NOW + timedelta(days=120)
    policy, reason = load_active(store, trust, SITE, later)
    assert policy is None and reason.startswith("policy v7 expired at 2027-02-25T00:00:00Z")


def test_load_active_checks_the_site(store: PolicyStore, signer: SigningKey, trust: TrustStore) -> None:
    store.activate(_verified(signer, trust, 7))
    policy, reason = load_active(store, trust, "northside", NOW)
    assert policy is None and "scope" in reason


def test_load_active_detects_a_damaged_row(
    tmp_path: Path, store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    store.activate(_verified(signer, trust, 7))
    with closing(sqlite3.connect(tmp_path / "vault.db")) as conn, conn:
        conn.execute("UPDATE policies SET envelope = envelope || X'20'")
    policy, reason = load_active(store, trust, SITE, NOW)
    assert policy is None and "SHA-256 does not match" in reason


def test_load_active_detects_an_older_bundle_relabelled(
    tmp_path: Path, store: PolicyStore, signer: SigningKey, trust: TrustStore
) -> None:
    store.activate(_verified(signer, trust, 7))
    old = bundle(doc(version=2), signer)
    with closing(sqlite3.connect(tmp_path / "vault.db")) as conn, conn:
        conn.execute(
            "UPDATE policies SET envelope = ?, sha256 = ? WHERE version = 7",
            (old, hashlib.sha256(old).hexdigest()),
        )
    policy, reason = load_active(store, trust, SITE, NOW)
    assert policy is None and "payload says v2" in reason
