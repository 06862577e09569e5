"""The appliance home directory: where every file of one gateway lives, and how it is created and opened.

Owns: the layout below, ``init`` (creating the home, the master key, the appliance signing key, the
settings file and the vault schema), and opening the vault with every migration applied.
Never: overwrites an existing key; loosens a file mode; keeps anything secret outside the files below.

    <home>/                 0700
      gateway.toml          settings (site id, listener, limits); optional PHI_ overrides
      master.key            0600  AES-256 key that seals provider keys in the vault
      appliance.key/.pub    0600  Ed25519 key of this appliance (signs ledger checkpoints)
      trust.json            the policy-authoring keys this appliance trusts, and the threshold
      vault.db              0600  SQLite: hashed tokens, sealed provider keys, policies, the audit ledger
      vault.db.changes      bumped when tokens or provider keys change, so a running gateway may cache them
      models/               local GGUF files, pinned by SHA-256 in the policy
      admin.sock            0600  the running gateway's operator API (unix socket; never on the network)
      tls/                  0700  cert.pem (certificate, then its chain) and key.pem (0600): TLS on the public
                            port when present (``phi-gateway tls``)
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from appliance import files, identity, signing_keys
from appliance.config import AuditSettings, Settings, load_settings, write_settings
from appliance.errors import GatewayError, OperatorError
from appliance.identity import TokenStore
from appliance.ledger import store
from appliance.ledger.checkpoints import CheckpointSigner, default_origin
from appliance.ledger.store import Ledger
from appliance.os_user import this_os_user
from appliance.policy import store as policy_store
from appliance.policy.store import PolicyStore
from appliance.policy.trust import TrustStore
from appliance.vault import provider_keys
from appliance.vault.db import Database, Migration
from appliance.vault.provider_keys import ProviderKeys
from appliance.vault.sealing import MasterKey

log = logging.getLogger("phi.home")

DEFAULT_HOME = Path("/var/lib/phi-gateway")

MIGRATIONS: list[Migration] = [
    *identity.MIGRATIONS,
    *provider_keys.MIGRATIONS,
    *policy_store.MIGRATIONS,
    *store.MIGRATIONS,
]


def resolve_home(option: str | Path | None) -> Path:
    """``--home`` wins, then ``PHI_HOME``, then /var/lib/phi-gateway."""
    if option:
        return Path(option).expanduser().resolve()
    env = os.environ.get("PHI_HOME")
    return Path(env).expanduser().resolve() if env else DEFAULT_HOME


@dataclass
class Vault:
    """The opened vault: one database, the stores that live in it. Close it when done."""

    db: Database
    tokens: TokenStore
    keys: ProviderKeys
    policies: PolicyStore
    ledger: Ledger

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.ledger.seal_head()  # sign the head: a later cut from the end shows in verify
        except (sqlite3.Error, GatewayError) as exc:  # a damaged or full ledger: verify says more
            log.warning("the ledger head could not be signed at close: %s", exc)
        self.db.close()  # the writer commits everything queued first
        self.ledger.close()


class Home:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.settings_path = root / "gateway.toml"
        self.master_key_path = root / "master.key"
        self.appliance_key_prefix = root / "appliance"
        self.appliance_key = root / "appliance.key"
        self.trust_path = root / "trust.json"
        self.vault_path = root / "vault.db"
        self.models_dir = root / "models"
        self.admin_socket = root / "admin.sock"

    @property
    def initialized(self) -> bool:
        return self.master_key_path.exists() and self.vault_path.exists()

    def require_initialized(self) -> None:
        if not self.initialized:
            raise OperatorError(
                f"{self.root} is not an initialized gateway home; "
                f"run: phi-gateway init --home {self.root} --site ID"
            )

    def init(self, site: str, node: str | None = None) -> list[str]:
        """Create a new home; refuses one that is already initialized. Returns what was created.

        An init that was interrupted (a master key but no vault yet) can be run again: what exists is
        kept, never overwritten, and the rest is created.
        """
        if self.initialized:
            raise OperatorError(f"{self.root} is already initialized; nothing was changed")
        try:
            settings = Settings(site=site, audit=AuditSettings(node=node))
        except ValidationError:
            raise OperatorError(
                f"invalid site {site!r} or node {node!r}: 1-64 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit"
            ) from None
        existing = load_settings(self.root) if self.settings_path.exists() else None
        if existing is not None and existing.site != site:
            raise OperatorError(
                f"{self.settings_path} already names site {existing.site!r}; run init with --site "
                f"{existing.site} or remove that file"
            )
        if node is not None and existing is not None and existing.audit.node != node:
            raise OperatorError(
                f"{self.settings_path} exists and does not name node {node!r}; set [audit] node there "
                "or remove that file"
            )
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if sys.platform != "win32":
            self.root.chmod(0o700)
        self.models_dir.mkdir(exist_ok=True)
        created = [str(self.root) + "/ (0700)"]
        if not self.settings_path.exists():
            write_settings(self.root, settings)
            created.append(f"{self.settings_path} (site {site})")
        if self.master_key_path.exists():
            MasterKey.load(self.master_key_path)  # left by an interrupted init: keep it if it is sound
        else:
            MasterKey.create(self.master_key_path)
            created.append(f"{self.master_key_path} (0600)")
        if not Path(str(self.appliance_key_prefix) + ".key").exists():
            keyid = signing_keys.generate(self.appliance_key_prefix)
            created.append(f"{self.appliance_key_prefix}.key (0600), appliance key id {keyid[:16]}")
        if not self.trust_path.exists():
            TrustStore.load(self.trust_path).save()
            created.append(f"{self.trust_path} (no trusted authoring keys yet)")
        _create_private(self.vault_path)  # SQLite gives its -wal and -shm files the mode of this one
        with self.open_vault() as vault:
            vault.ledger.append_sync(
                {"type": "admin", "detail": f"init site={site}", "os_user": this_os_user()}
            )
        created.append(f"{self.vault_path}")
        return created

    def settings(self) -> Settings:
        _require_regular_if_present(self.settings_path, files.SETTINGS_FILE)
        return load_settings(self.root)

    def trust(self) -> TrustStore:
        _require_regular_if_present(self.trust_path, files.SETTINGS_FILE)
        return TrustStore.load(self.trust_path)

    def _checkpoint_signer(self) -> CheckpointSigner:
        _require_regular_if_present(self.appliance_key, files.KEY_FILE)
        key = signing_keys.load_signing_key(self.appliance_key)
        settings = self.settings()
        origin = default_origin(settings.site, settings.audit.node or key.keyid[:12])
        return CheckpointSigner(key, origin, checkpoint_interval_s=settings.audit.checkpoint_interval_s)

    def open_vault(self, *, audit_out: TextIO | None = None) -> Vault:
        """Open the vault with every migration applied; ``audit_out`` receives each durable audit line."""
        master = MasterKey.load(self.master_key_path)
        db = Database(self.vault_path, MIGRATIONS).start()
        ledger = Ledger(db, out=audit_out, signer=self._checkpoint_signer())
        ledger.sign_upgraded()  # a ledger from before checkpoints gets its first head when upgraded
        return Vault(
            db=db,
            tokens=TokenStore(db),
            keys=ProviderKeys(db, master),
            policies=PolicyStore(db),
            ledger=ledger,
        )


def _require_regular_if_present(path: Path, kind: files.Input) -> None:
    """The loaders below open these files themselves; a FIFO or a device put there must not block them
    (a missing file is theirs to judge: a missing trust file means no trusted keys)."""
    if path.exists() or path.is_symlink():
        files.require_regular(path, kind)


def _create_private(path: Path) -> None:
    """Create an empty ``path`` with mode 0600, whatever the umask; an existing file is left as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise OperatorError(f"cannot create {path}: {exc.strerror or exc}") from None
    os.close(fd)
