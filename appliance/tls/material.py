"""The certificate material in a gateway home: where it lives, reading it, and replacing it atomically.

    <home>/tls/             0700
      cert.pem              the served certificate, followed by its chain (issuing order)
      key.pem               0600  its private key, unencrypted PEM

Owns: those paths, whether TLS is in force (``present``: the home holds a certificate or a key), reading
the pair (``read``: both files once, checked and described together), installing a new pair (``install``:
checked first, each file written to a temporary name, fsynced and renamed over the old one, the key
before the certificate), and the stamp a running gateway compares to notice a new pair.
Never: writes a pair that ``certificates.check`` refuses; leaves a key readable by anyone but the
appliance's user; prints or records key material.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from appliance import files
from appliance.errors import OperatorError
from appliance.tls import certificates
from appliance.tls.certificates import CertificateInfo, ServerKey

__all__ = ["PEM_FILE", "Pair", "TlsMaterial"]

PEM_FILE = files.Input("certificate or key file", 1 << 20)
"""A PEM certificate, chain, key or CA bundle: a few KiB; a CA bundle of a few hundred certificates fits."""

Stamp = tuple[tuple[int, int, int, int], ...]
"""(device, inode, size, mtime in ns) of each file: a change of any means a new pair may be there."""


@dataclass(frozen=True)
class Pair:
    """A certificate (with its chain) and its key, read once and checked together."""

    certificate_pem: bytes
    key_pem: bytes
    info: CertificateInfo


class TlsMaterial:
    """The ``tls/`` directory of one home."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "tls"
        self.cert = self.dir / "cert.pem"
        self.key = self.dir / "key.pem"

    def present(self) -> bool:
        """True when the home holds a certificate or a key: then the public port speaks TLS (and a half
        pair is an error to report, not a reason to fall back to plain HTTP)."""
        return self.cert.exists() or self.key.exists()

    def stamp(self) -> Stamp | None:
        """What changes when either file is replaced or rewritten; None while one is missing."""
        try:
            stats = [os.stat(path) for path in (self.cert, self.key)]
        except FileNotFoundError:
            return None
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def read(self) -> Pair:
        """Both files, checked as ``install`` checks them (the key matches, valid now, accepted types)."""
        if not self.cert.exists() or not self.key.exists():
            missing = self.cert if not self.cert.exists() else self.key
            raise OperatorError(
                f"{missing} is missing: the home's certificate needs both tls/cert.pem and tls/key.pem "
                "(phi-gateway tls self-signed --host NAME, or tls import CERT KEY)"
            )
        certificate_pem = files.read_bytes(self.cert, PEM_FILE)
        key_pem = files.read_bytes(self.key, PEM_FILE)
        try:
            info = _check(certificate_pem, key_pem)
        except OperatorError as exc:
            raise OperatorError(f"{self.dir}: {exc}") from None
        return Pair(certificate_pem, key_pem, info)

    def describe(self) -> CertificateInfo:
        """The certificate alone, as it is (expired or not): what ``tls show`` prints."""
        certs = certificates.parse_certificates(files.read_bytes(self.cert, PEM_FILE))
        return certificates.describe(certs)

    def install(self, certificate_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None) -> Pair:
        """Check the pair, then replace the home's files with it; returns what was installed."""
        served = _join(certificate_pem, chain_pem)
        info = _check(served, key_pem)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        # The key first: a running gateway that looks between the two renames sees a key that does not
        # match the old certificate, refuses that pair and keeps serving; the next look sees both.
        _replace(self.key, _normalized_key(key_pem), 0o600)
        _replace(self.cert, served, 0o644)
        _fsync_dir(self.dir)
        return Pair(served, key_pem, info)


def _check(certificate_pem: bytes, key_pem: bytes) -> CertificateInfo:
    certs: list[x509.Certificate] = certificates.parse_certificates(certificate_pem)
    key: ServerKey = certificates.parse_key(key_pem)
    return certificates.check(certs, key)


def _join(certificate_pem: bytes, chain_pem: bytes | None) -> bytes:
    """The served file: the certificate file's PEM blocks, then the chain's, each certificate once."""
    certs = certificates.parse_certificates(certificate_pem)
    if chain_pem is not None:
        certs += certificates.parse_certificates(chain_pem, "chain file")
    unique = list({cert.fingerprint(hashes.SHA256()): cert for cert in certs}.values())
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in unique)


def _normalized_key(key_pem: bytes) -> bytes:
    """The key alone, as PKCS#8 PEM (a key file may carry comments or the certificate too)."""
    key = certificates.parse_key(key_pem)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _replace(path: Path, data: bytes, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
