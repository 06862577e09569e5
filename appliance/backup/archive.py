"""What a backup holds and how it comes back: a consistent copy of a home, sealed, and its restore.

A backup is a tar stream inside the sealed stream (``seal``): every regular file of the home (settings,
``master.key``, ``appliance.key``, ``trust.json``, ``tls/``, the continuous export file if it lives
there), the vault as one consistent SQLite snapshot taken through SQLite's backup API (safe while the
gateway serves: it reads, it never writes the vault), the model files only when asked (they are pinned by
SHA-256 in the policy and can be copied again), and last ``backup.json``: every member with its size and
SHA-256. A restore unpacks into a folder inside the (absent or empty) target, checks every chunk and every
member, opens the restored vault (migrations of a newer version run there), verifies the whole ledger,
records the restore in it, and only then moves the files into the target, the vault last.

Owns: ``make_backup``, ``restore_backup``, ``BackupSummary``, ``RestoreSummary``. Never: writes the vault
of the running gateway (the ``backup`` ledger record goes through the vault's writer like any CLI
change); leaves a half-restored home where the home should be; extracts a member outside the new home,
a link, or anything but a regular file or a folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from appliance import __version__, bundle_import
from appliance.backup.seal import SealReader, SealWriter
from appliance.errors import OperatorError
from appliance.home import Home, Vault
from appliance.os_user import this_os_user
from appliance.timestamps import rfc3339

MANIFEST = "backup.json"
VAULT = "vault.db"
# SQLite's companions of the vault: the snapshot replaces them; the socket is the running gateway's.
_SKIP = {"vault.db", "vault.db-wal", "vault.db-shm", "vault.db-journal", "admin.sock"}
_READ = 1 << 20
_SCRATCH = (".backup-", ".restore-")
_REQUIRED = {"vault.db", "master.key", "appliance.key", "gateway.toml"}


@dataclass
class BackupSummary:
    files: int
    bytes: int
    ledger_records: int
    models_skipped: list[str] = field(default_factory=list)


@dataclass
class RestoreSummary:
    header: dict[str, Any]
    files: int
    ledger_message: str
    models_missing: list[str]


def _members(home: Home, with_models: bool) -> Iterator[tuple[str, Path]]:
    """(name in the backup, path) of every regular file to copy, folders in a stable order. Symbolic
    links are followed (the gateway reads keys and certificates through them, so a backup must hold
    what they point at); anything else that is not a regular file is refused."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, names in os.walk(home.root, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(_SCRATCH))  # a backup's or restore's own
        base = Path(folder)
        for name in sorted(names):
            path = base / name
            rel = path.relative_to(home.root).as_posix()
            if rel in _SKIP or name.endswith((".phibak", ".phibak.partial")):  # earlier backups kept there
                continue
            if rel.startswith("models/") and not with_models:
                continue
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                raise OperatorError(
                    f"cannot back up {path}: {exc.strerror or exc} (a dangling link?)"
                ) from None
            if not stat.S_ISREG(mode):
                raise OperatorError(f"cannot back up {path}: not a regular file; move it out of the home")
            yield rel, path


def _snapshot(home: Home, into: Path) -> int:
    """A consistent copy of the vault (SQLite's online backup, a reader of the live file); its records."""
    source = sqlite3.connect(f"file:{home.vault_path}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(into)
    try:
        # One step, under one read transaction: copied in steps, the copy restarts whenever the gateway
        # writes between two of them, and a busy gateway writes on every request (it would never end).
        source.backup(target, pages=-1)
        (records,) = target.execute("SELECT COUNT(*) FROM ledger").fetchone()
    except sqlite3.Error as exc:
        raise OperatorError(f"cannot copy the vault {home.vault_path}: {exc}") from None
    finally:
        target.close()
        source.close()
    return int(records)


def _add(tar: tarfile.TarFile, name: str, path: Path, mode: int, listing: dict[str, Any]) -> int:
    """Add one file, hashing it as it is read; its size and hash go into the manifest."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # a link is followed (see _members)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OperatorError(f"{path} is not a regular file; nothing was written")
        member = tarfile.TarInfo(name)
        member.size = info.st_size
        member.mode = mode
        member.mtime = int(info.st_mtime)
        hasher = _HashingReader(handle)
        tar.addfile(member, hasher)
        if hasher.count != info.st_size:
            raise OperatorError(f"{path} changed size while it was copied; run the backup again")
    listing[name] = {"size": info.st_size, "sha256": hasher.digest.hexdigest()}
    return info.st_size


class _HashingReader:
    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data


def make_backup(home: Home, out: IO[bytes], passphrase: bytes, *, with_models: bool) -> BackupSummary:
    """Write the sealed backup of ``home`` to ``out`` (the gateway may be serving meanwhile)."""
    settings = home.settings()
    about = {
        "created": rfc3339(datetime.now(UTC)),
        "site": settings.site,
        "node": settings.audit.node,
        "gateway_version": __version__,
        "models_included": with_models,
    }
    listing: dict[str, Any] = {}
    total = 0
    scratch = Path(tempfile.mkdtemp(prefix=".backup-", dir=home.root))  # inside the 0700 home
    try:
        snapshot = scratch / VAULT
        records = _snapshot(home, snapshot)
        sealed = SealWriter(out, passphrase, about)
        with tarfile.open(fileobj=sealed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            total += _add(tar, VAULT, snapshot, 0o600, listing)
            for name, path in _members(home, with_models):
                total += _add(tar, name, path, 0o600, listing)
            missing = sorted(_REQUIRED - set(listing))
            if missing:
                raise OperatorError(f"the home lacks {', '.join(missing)}: no backup was written")
            manifest = json.dumps({**about, "ledger_records": records, "files": listing}, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(manifest), 0o600
            tar.addfile(info, io.BytesIO(manifest))
        sealed.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    skipped = [] if with_models else sorted(p.name for p in home.models_dir.glob("*") if p.is_file())
    return BackupSummary(files=len(listing), bytes=total, ledger_records=records, models_skipped=skipped)


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts) or "\\" in name:
        raise OperatorError(f"damaged backup: member {name!r} would land outside the home")
    return path


def _extract(reader: SealReader, into: Path) -> dict[str, dict[str, Any]]:
    """Unpack into ``into`` (regular files only, 0600 in 0700 folders); what was written, with hashes."""
    written: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            rel = _safe_name(member.name)
            if not member.isfile():
                raise OperatorError(f"damaged backup: member {member.name!r} is not a regular file")
            if member.name in written:
                raise OperatorError(f"damaged backup: member {member.name!r} appears twice")
            target = into.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            source = tar.extractfile(member)
            assert source is not None  # a regular file's member always has its data
            digest = hashlib.sha256()
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            with os.fdopen(fd, "wb") as handle:
                while chunk := source.read(_READ):
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            written[member.name] = {"size": member.size, "sha256": digest.hexdigest()}
    return written


def _check_manifest(into: Path, written: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if MANIFEST not in written:
        raise OperatorError("damaged backup: it has no manifest (backup.json)")
    manifest = json.loads((into / MANIFEST).read_bytes())
    listed = manifest.get("files", {})
    actual = {name: facts for name, facts in written.items() if name != MANIFEST}
    if listed != actual:
        differ = sorted(set(listed) ^ set(actual)) or sorted(n for n in listed if listed[n] != actual.get(n))
        named = ", ".join(differ[:5])
        raise OperatorError(f"damaged backup: its members do not match its manifest ({named})")
    (into / MANIFEST).unlink()
    return dict(manifest)


def restore_backup(source: IO[bytes], passphrase: bytes, target: Path) -> RestoreSummary:
    """Restore a backup into ``target`` (absent or an empty folder); checked before it is put in place."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OperatorError(
            f"{target} exists and is not empty: restore makes a new home; move the old one aside first "
            "(stop the gateway that uses it)"
        )
    reader = SealReader(source, passphrase)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Staged inside the target: a mount point (a container's volume, the OVA's state directory) cannot be
    # renamed, and its parent may not be writable by the user the gateway runs as.
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=target))
    try:
        written = _extract(reader, staging)
        reader.finish()  # the last chunk opened, nothing after it: the whole file was checked
        manifest = _check_manifest(staging, written)
        missing = sorted(_REQUIRED - set(written))
        if missing:
            raise OperatorError(f"this backup lacks {', '.join(missing)}: nothing was restored into {target}")
        restored = Home(staging)
        with restored.open_vault() as vault:
            report = vault.ledger.verify()
            if not report.ok:
                problem = report.message
                raise OperatorError(f"the restored ledger does not verify: {problem}; nothing restored")
            detail = (
                f"restore backup_created={manifest.get('created')} "
                f"from_version={manifest.get('gateway_version')}"
            )
            vault.ledger.append_sync({"type": "admin", "detail": detail, "os_user": this_os_user()})
            policy_models = _policy_model_files(vault)
        missing = sorted(name for name in policy_models if not (restored.models_dir / name).is_file())
        # Everything is checked: the moves below are renames within one file system, the vault last.
        for child in sorted(staging.iterdir(), key=lambda p: p.name.startswith("vault.db")):
            child.rename(target / child.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return RestoreSummary(
        header=reader.header, files=len(written) - 1, ledger_message=report.message, models_missing=missing
    )


def _policy_model_files(vault: Vault) -> list[str]:
    """The model files the policy in force names (those a restore without models leaves to copy)."""
    policy = bundle_import.policy_in_force(vault)
    if policy is None:
        return []
    return sorted({model.file for model in policy.models.values()})
