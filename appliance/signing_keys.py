"""Ed25519 signing keys, shared by the policy (bundle signatures) and the ledger (checkpoints).

Owns: key ids (SHA-256 of the raw public key), the ``SigningKey`` type, the ``.key`` file (PKCS8 PEM,
created 0600 and never overwritten) and the ``.pub`` file (a small JSON ``{"keytype", "scheme", "keyid",
"public"}``; a PEM SubjectPublicKeyInfo file is accepted too).

Must never: overwrite an existing key file, write a private key with a wider mode than 0600, accept a key
that is not Ed25519, or accept a ``.pub`` whose stated keyid differs from its key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from appliance.errors import OperatorError

KEYTYPE = "ed25519"
SCHEME = "ed25519"
_MAX_KEY_FILE = 64 * 1024


def keyid_of(public: Ed25519PublicKey) -> str:
    """The key's id: SHA-256 of its raw 32 bytes, hex (what DSSE signatures and ``trust.json`` name)."""
    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def short_keyid(keyid: str) -> str:
    """The first 8 characters, for operator messages."""
    return keyid[:8] + "…" if len(keyid) > 8 else keyid


@dataclass(frozen=True)
class SigningKey:
    keyid: str
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()


def public_json(public: Ed25519PublicKey) -> dict[str, str]:
    """The ``.pub`` document (also the shape of a ``trust.json`` entry, less ``added_at``)."""
    return {
        "keytype": KEYTYPE,
        "scheme": SCHEME,
        "keyid": keyid_of(public),
        "public": public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex(),
    }


def generate(out_prefix: Path) -> str:
    """Write ``<prefix>.key`` (0600) and ``<prefix>.pub``; refuse if either exists. Returns the keyid."""
    key_path = out_prefix.with_name(out_prefix.name + ".key")
    pub_path = out_prefix.with_name(out_prefix.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise OperatorError(f"{path} already exists; refusing to overwrite a key file")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    doc = public_json(private.public_key())
    _create(key_path, pem, 0o600)
    try:
        _create(pub_path, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            key_path.unlink()
        raise
    return doc["keyid"]


def load_signing_key(path: Path) -> SigningKey:
    data = _read(path)
    try:
        private = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise OperatorError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise OperatorError(f"{path} is not an Ed25519 key (policy keys are Ed25519 only)")
    return SigningKey(keyid_of(private.public_key()), private)


def load_public_key(path: Path) -> tuple[str, Ed25519PublicKey]:
    """Read a ``.pub`` JSON file or a PEM public key; returns ``(keyid, key)``."""
    data = _read(path)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            public = load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise OperatorError(f"{path} is not a PEM public key: {exc}") from exc
        if not isinstance(public, Ed25519PublicKey):
            raise OperatorError(f"{path} is not an Ed25519 public key (policy keys are Ed25519 only)")
        return keyid_of(public), public
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise OperatorError(f"{path} is neither a .pub JSON file nor a PEM public key") from exc
    if not isinstance(doc, dict):
        raise OperatorError(f"{path} is not a .pub JSON object")
    public = public_from_entry(doc, str(path))
    return check_stated_keyid(doc, public, str(path)), public


def check_stated_keyid(doc: dict[str, object], public: Ed25519PublicKey, where: str) -> str:
    """The key's id; a ``keyid`` the document states (as a ``.pub`` does) must be that id, or this refuses
    naming both."""
    keyid = keyid_of(public)
    stated = doc.get("keyid", keyid)
    if stated != keyid:
        raise OperatorError(
            f"{where}: the stated keyid does not match the key: it states {str(stated)[:80]}, and the key's "
            f"id (the SHA-256 of the raw public key) is {keyid}"
        )
    return keyid


def public_from_entry(doc: dict[str, object], where: str) -> Ed25519PublicKey:
    """Check keytype/scheme are Ed25519 and decode the raw hex key of a ``.pub`` or trust entry."""
    if doc.get("keytype") != KEYTYPE or doc.get("scheme") != SCHEME:
        raise OperatorError(f"{where}: only keytype/scheme 'ed25519' is supported")
    raw = doc.get("public")
    try:
        if not isinstance(raw, str) or len(raw) != 64:
            raise ValueError("not 64 hex characters")
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw))
    except ValueError as exc:
        raise OperatorError(f"{where}: 'public' must be the raw Ed25519 key as 64 hex characters") from exc


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise OperatorError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_KEY_FILE:
        raise OperatorError(f"{path} is too large to be a key file")
    return data


def _create(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    except FileExistsError as exc:
        raise OperatorError(f"{path} already exists; refusing to overwrite a key file") from exc
    except OSError as exc:
        raise OperatorError(f"cannot create {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as f:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # the umask may only narrow the mode; make it exact
        f.write(data)
        f.flush()
        os.fsync(fd)
