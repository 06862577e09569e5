"""The certificate material in a gateway home: where it lives, reading it, and replacing it atomically.

    <home>/tls/             0700
      cert.pem              the served certificate, followed by its chain (issuing order)
      key.pem               0600  its private key, unencrypted PEM

Owns: those paths, whether TLS is in force (``present``: the home holds a certificate or a key), reading
the pair (``read``: both files once, checked and described together), installing a new pair (``install``:
checked first, both files written to temporary names and fsynced before either is renamed over the old
one, the key before the certificate, the old key put back if the certificate cannot be), ``recover``
(what a crash in the middle of an install left), and the stamp a running gateway compares to notice a new
pair.
Never: writes a pair that ``certificates.check`` refuses; leaves a key readable by anyone but the
appliance's user, or serves one that is (as ``master.key``); prints or records key material.
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
        self.previous = self.dir / ".key.pem.previous"
        """The key an install is replacing, kept until its certificate is replaced too."""

    def recover(self) -> None:
        """Undo what an install interrupted by a crash left: staged files are removed, and the old key is
        put back when the new one never got its certificate. Run before an install and when the gateway
        starts, never by the watcher (an install may be running then)."""
        if not self.dir.is_dir():
            return
        for stale in self.dir.glob(".*.tmp"):
            _discard(stale)
        if not self.previous.exists():
            return
        try:
            self.read()
        except OperatorError:
            try:
                _check(files.read_bytes(self.cert, PEM_FILE), files.read_bytes(self.previous, PEM_FILE))
            except OperatorError:
                return  # neither key goes with the certificate: leave both for the operator to see
            os.replace(self.previous, self.key)
            _fsync_dir(self.dir)
            return
        _discard(self.previous)  # the pair in place is whole: the old key is no longer needed

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
        _require_private(self.key)
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
        self.recover()
        # Both written in full before either is renamed: a full disk fails here, with the old pair intact.
        key_file = _staged(self.key, _normalized_key(key_pem), 0o600)
        try:
            cert_file = _staged(self.cert, served, 0o644)
        except BaseException:
            _discard(key_file)
            raise
        # The old key is copied aside first (it is put back if the certificate cannot follow, and by
        # ``recover`` after a crash between the renames). The key is renamed first: a running gateway that
        # looks between the two renames sees a key that does not match the old certificate, refuses that
        # pair and keeps serving; the next look sees both.
        try:
            old_key = self.key.read_bytes() if self.key.exists() else None
            if old_key is not None:
                os.replace(_staged(self.previous, old_key, 0o600), self.previous)
            os.replace(key_file, self.key)
            try:
                os.replace(cert_file, self.cert)
            except BaseException:
                if old_key is not None:  # the old key back beside the old certificate
                    os.replace(self.previous, self.key)
                else:  # a first install: no half pair left to stop the next start
                    _discard(self.key)
                raise
        finally:
            _discard(key_file, cert_file, self.previous)
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


def _require_private(key: Path) -> None:
    """Refuse a key file other users can read (restored from a backup with the wrong mode, say)."""
    try:
        mode = os.stat(key).st_mode
    except OSError as exc:
        raise OperatorError(f"cannot read {key}: {exc.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise OperatorError(
            f"the TLS key {key} is accessible by other users (mode {mode & 0o777:04o}); "
            f"fix it with: chmod 600 {key}"
        )


def _staged(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new file beside ``path``, with ``mode``, fsynced: ready to be renamed over it."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        out = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        _discard(Path(temporary))
        raise
    try:
        with out:
            os.fchmod(fd, mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        _discard(Path(temporary))
        raise
    return Path(temporary)


def _discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
