"""Sealed secrets: the appliance master key and AES-256-GCM sealing under it.

Owns: the master key file (32 random bytes, mode 0600, created once at ``init``), and the sealed-value
format ``b"v1" + 12-byte nonce + ciphertext-and-tag``. The associated data (``aad``) binds a sealed value
to the place it belongs (``b"provider_key:openai"``), so a value copied to another row does not open.

Must never: print, log or ``repr`` key bytes; overwrite an existing master key (that would make every
sealed value unreadable); load a key file other users can read; reuse a nonce (each seal draws a fresh
random one).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance import files
from appliance.errors import OperatorError

KEY_BYTES = 32
MASTER_KEY_FILE = files.Input("master key", 4096)
"""Far above the 32 bytes of a key, so a wrong size is reported as such, and far below anything harmful."""
_VERSION = b"v1"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_OPEN_FAILED = "sealed value cannot be opened: wrong master key or altered data"


class MasterKey:
    """The AES-256-GCM key that seals the vault's secrets. Build with ``create`` or ``load``."""

    __slots__ = ("_aead", "path")

    def __init__(self, key: bytes, path: Path | None = None) -> None:
        if len(key) != KEY_BYTES:
            raise OperatorError(f"a master key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self.path = path

    @classmethod
    def create(cls, path: Path) -> MasterKey:
        """Write a fresh random key to ``path`` (mode 0600, fsynced); refuse if the file exists."""
        key = os.urandom(KEY_BYTES)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError as exc:
            raise OperatorError(
                f"a master key already exists at {path}; refusing to overwrite it "
                "(every sealed secret depends on it)"
            ) from exc
        except OSError as exc:
            raise OperatorError(f"cannot create the master key {path}: {exc.strerror}") from exc
        try:
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return cls(key, path)

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        """Read the key at ``path``; refuse a file that group or other users can access, or a wrong size."""
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise OperatorError(f"no master key at {path}; run 'phi-gateway init' first") from exc
        except OSError as exc:
            raise OperatorError(f"cannot read the master key {path}: {exc.strerror}") from exc
        if os.name == "posix" and st.st_mode & 0o077:
            raise OperatorError(
                f"the master key {path} is accessible by other users (mode {st.st_mode & 0o777:04o}); "
                f"fix it with: chmod 600 {path}"
            )
        key = files.read_bytes(path, MASTER_KEY_FILE)  # a regular file only: never a FIFO or a device
        if len(key) != KEY_BYTES:
            raise OperatorError(
                f"the master key {path} has {len(key)} bytes, expected {KEY_BYTES}: "
                "it is damaged or not a key"
            )
        return cls(key, path)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < len(_VERSION) + _NONCE_BYTES + _TAG_BYTES or blob[:2] != _VERSION:
            raise OperatorError(_OPEN_FAILED)
        try:
            return self._aead.decrypt(blob[2:14], blob[14:], aad)
        except InvalidTag as exc:
            raise OperatorError(_OPEN_FAILED) from exc

    def __repr__(self) -> str:
        return f"MasterKey(path={str(self.path)!r})"


def _fsync_dir(directory: Path) -> None:
    """Make the new file's directory entry durable too (POSIX; a no-op where directories can't be opened)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
