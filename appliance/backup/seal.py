"""The sealed stream of a backup file: a passphrase, scrypt, and AES-256-GCM over numbered chunks.

File: ``MAGIC``, a 4-byte big-endian length and a JSON header (format, scrypt parameters and salt, a
random nonce prefix, and what the backup is of: site, node, version, time), then chunks, each a 4-byte
length and its AES-256-GCM ciphertext. Chunk ``i``'s nonce is the 7-byte prefix, ``i`` (4 bytes) and a
last-chunk flag (1 byte): chunks cannot be reordered, dropped or cut from the end without the open
failing, and the header is bound to every chunk as associated data (its SHA-256), so it cannot be changed
either (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár).

Owns: ``SealWriter``, ``SealReader``, ``read_header``. Never: writes the passphrase or the key anywhere;
hands out plaintext from a chunk that failed its check.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from appliance.errors import OperatorError

MAGIC = b"PHIBACKUP\x01\n"
CHUNK = 1 << 20
# scrypt at 2^17 x 8 (128 MiB, a fraction of a second): an offline guess costs that much each.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1
MAX_HEADER = 64 << 10
_LEN = struct.Struct(">I")


def _key(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


class SealWriter:
    """A writable file object: what is written is sealed chunk by chunk into ``out``; ``close`` seals
    the last chunk (without it the file does not open)."""

    def __init__(self, out: IO[bytes], passphrase: bytes, about: dict[str, Any]) -> None:
        salt = os.urandom(16)
        self._prefix = os.urandom(7)
        header = {
            "format": 1,
            "cipher": "AES-256-GCM",
            "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex()},
            "nonce_prefix": self._prefix.hex(),
            "chunk": CHUNK,
            **about,
        }
        raw = json.dumps(header, sort_keys=True).encode()
        self._aad = hashlib.sha256(raw).digest()
        self._aead = AESGCM(_key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))
        self._out = out
        self._buffer = bytearray()
        self._index = 0
        self._closed = False
        out.write(MAGIC + _LEN.pack(len(raw)) + raw)

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) > CHUNK:
            self._seal(bytes(self._buffer[:CHUNK]), last=False)
            del self._buffer[:CHUNK]
        return len(data)

    def _seal(self, plain: bytes, *, last: bool) -> None:
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, last), plain, self._aad)
        self._out.write(_LEN.pack(len(sealed)) + sealed)
        self._index += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._seal(bytes(self._buffer), last=True)
            self._buffer.clear()

    def flush(self) -> None:
        """Part of the file protocol tarfile expects; sealing happens at chunk boundaries and ``close``."""


def read_header(source: IO[bytes]) -> tuple[dict[str, Any], bytes]:
    """The header of a backup file (not secret, not yet authenticated) and its raw bytes."""
    magic = source.read(len(MAGIC))
    if magic != MAGIC:
        raise OperatorError("not a Phi Gateway backup file (its first bytes are not a backup's)")
    (size,) = _LEN.unpack(_exact(source, _LEN.size, "header length"))
    if size > MAX_HEADER:
        raise OperatorError("damaged backup: its header is too large")
    raw = _exact(source, size, "header")
    try:
        header = json.loads(raw)
    except ValueError:
        raise OperatorError("damaged backup: its header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != 1:
        raise OperatorError("this backup's format is not one this version reads (format 1)")
    return header, raw


def _exact(source: IO[bytes], size: int, what: str) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise OperatorError(f"damaged backup: the file ends inside its {what} (cut short?)")
    return data


class SealReader:
    """A readable file object over a sealed backup: each chunk is checked before any of it is read."""

    def __init__(self, source: IO[bytes], passphrase: bytes) -> None:
        header, raw = read_header(source)
        self.header = header
        try:
            kdf = header["kdf"]
            salt = bytes.fromhex(kdf["salt"])
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            self._prefix = bytes.fromhex(header["nonce_prefix"])
        except (KeyError, TypeError, ValueError):
            raise OperatorError("damaged backup: its header lacks the key parameters") from None
        # Only what a writer of this format would choose: a forged header must not make the key
        # derivation take gigabytes or minutes before the passphrase is even checked.
        if (
            len(self._prefix) != 7
            or len(salt) != 16
            or not (1 << 14 <= n <= 1 << 18)
            or n & (n - 1)
            or not (1 <= r <= 16 and 1 <= p <= 4)
            or 128 * n * r > 256 << 20
        ):
            raise OperatorError("damaged backup: its key parameters are out of range")
        self._aead = AESGCM(_key(passphrase, salt, n, r, p))
        self._aad = hashlib.sha256(raw).digest()
        self._source = source
        self._index = 0
        self._plain = b""
        self._done = False

    def _next(self) -> None:
        head = self._source.read(_LEN.size)
        if len(head) != _LEN.size:
            raise OperatorError("damaged backup: it ends before its last chunk (cut short?)")
        (size,) = _LEN.unpack(head)
        if size > CHUNK + 16:
            raise OperatorError(f"damaged backup: chunk {self._index} is larger than any chunk written")
        sealed = _exact(self._source, size, f"chunk {self._index}")
        for last in (False, True):
            try:
                plain = self._aead.decrypt(_nonce(self._prefix, self._index, last), sealed, self._aad)
            except InvalidTag:
                continue
            self._plain, self._done = plain, last
            self._index += 1
            if last and self._source.read(1):
                raise OperatorError("damaged backup: bytes follow its last chunk")
            return
        if self._index == 0:
            raise OperatorError("wrong passphrase, or the backup is damaged (its first chunk does not open)")
        raise OperatorError(f"damaged backup: chunk {self._index} does not open (altered or reordered)")

    def finish(self) -> None:
        """Open every chunk left (tar stops reading at its end marker, which may lie before the last
        chunk), so that a dropped last chunk or bytes after it fail the restore."""
        while not self._done:
            self._next()
        self._plain = b""

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        wanted = size if size >= 0 else None
        while wanted is None or wanted > 0:
            if not self._plain:
                if self._done:
                    break
                self._next()
                continue
            take = self._plain if wanted is None else self._plain[:wanted]
            self._plain = self._plain[len(take) :]
            parts.append(take)
            if wanted is not None:
                wanted -= len(take)
        return b"".join(parts)
