"""The public port's TLS: the server ``SSLContext``s, the certificate swapped without a restart, and the rule
for when plain HTTP may be served instead.

Owns: the context's settings (TLS 1.2 at least, 1.3 preferred; for 1.2 only ECDHE key exchange with AEAD
ciphers; no compression, no renegotiation, the server's cipher order; client certificates optional and
verified against ``server.tls.client_ca_file`` when that is set), a fresh context for every certificate
pair, the watcher that builds one when the home's files change, and the listener's SNI callback (OpenSSL
calls it for every handshake, with or without a server name) that hands each new handshake to the context
in service: new handshakes get the new certificate, open connections keep theirs, nothing restarts. A
context is never loaded twice: OpenSSL keeps one certificate per key type, so an RSA pair loaded over an
EC one would leave the EC certificate in service beside it; the transport document of ``/health``,
and ``listener_tls``: TLS whenever the home holds a certificate, plain HTTP on loopback, and plain HTTP on
any other address only when the operator said ``insecure_http``.
Never: loads a pair that ``material`` refuses (a half-written rotation, a key that does not match); changes
a context in service (the one serving is kept when anything fails); asks for a passphrase (the gateway
starts unattended).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import files
from appliance.config import ServerSettings, TlsSettings
from appliance.errors import OperatorError
from appliance.tls import certificates
from appliance.tls.certificates import CertificateInfo
from appliance.tls.material import PEM_FILE, Pair, Stamp, TlsMaterial

__all__ = ["ServerTls", "is_loopback", "listener_tls", "plain_transport"]

log = logging.getLogger("phi.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
EXPIRY_WARNING_DAYS = 14
"""A certificate with fewer days left than this is logged as a warning when loaded."""


class ServerTls:
    """The server context of the public port and what it serves now."""

    def __init__(self, material: TlsMaterial, settings: TlsSettings, client_ca: Path | None = None) -> None:
        """Build the context and load the home's pair; ``OperatorError`` says what is wrong with either."""
        self.material = material
        self.settings = settings
        self.client_ca = client_ca
        # Read once: every pair's context verifies clients against the same CAs (a change needs a restart).
        self._client_ca_pem = _client_ca_pem(client_ca) if client_ca is not None else None
        material.recover()  # an install a crash interrupted: its old key back, its staged files gone
        self._stamp: Stamp | None = material.stamp()  # before reading: a change meanwhile is seen later
        pair = material.read()
        self._serving = self._context_for(pair)
        self.context = self._listener_context()
        """The listener's context: its callback hands every handshake to the context serving now. It holds
        a throwaway certificate of its own, so no pair the operator replaced stays loaded for the life of
        the process (a key rotated away after a leak is dropped with its context)."""
        self.info: CertificateInfo = pair.info
        self.reload_error: str | None = None
        """Why the pair now in the home is not the one served (None when it is)."""
        self._refused: Stamp | None = None  # the files of the last pair refused
        self._warned: Stamp | None = None  # ... and of the last one reported
        self._watcher: asyncio.Task[None] | None = None
        _warn_if_expiring(pair.info)

    def refresh(self) -> bool:
        """Load the home's pair into the context if its files changed; True when a new one was loaded.

        A pair that cannot be loaded leaves the one in service in place and is reported once."""
        stamp = self.material.stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            pair = self.material.read()
            serving = self._context_for(pair)
        except OperatorError as exc:
            # A rotation caught between its two renames is refused once and quietly; the same files refused
            # at the next look are a real problem, reported once.
            if stamp == self._refused and stamp != self._warned:
                log.warning(
                    "the new certificate was not loaded; still serving %s: %s", self.info.fingerprint, exc
                )
                self.reload_error, self._warned = str(exc), stamp
            self._refused = stamp
            return False
        # ``stamp`` was taken before reading: files replaced while they were read differ from it, and the
        # next look loads them.
        old = self.info.fingerprint
        self._serving = serving  # one assignment, on the loop: the next handshake gets it
        self.info, self._stamp, self.reload_error = pair.info, stamp, None
        log.info(
            "new certificate in service for new connections: %s (was %s), expires %s",
            pair.info.fingerprint,
            old,
            pair.info.not_after.isoformat(),
        )
        _warn_if_expiring(pair.info)
        return True

    def start_watching(self, interval_s: float | None = None) -> None:
        """Look for a new pair every ``interval_s`` (default: the setting) on the running loop."""
        interval = interval_s if interval_s is not None else self.settings.reload_interval_s
        self._watcher = asyncio.get_running_loop().create_task(self._watch(interval), name="tls-watch")

    async def stop_watching(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.refresh()  # on the loop: the context is never changed while a handshake reads it
            except Exception:  # the watcher must outlive anything one look at the files can raise
                log.exception("looking for a new certificate failed; still serving %s", self.info.fingerprint)

    def transport(self) -> dict[str, Any]:
        """The ``transport`` part of ``/health``."""
        info = self.info
        return {
            "tls": True,
            "min_version": self.settings.min_version,
            "subject": info.subject,
            "fingerprint": info.fingerprint,
            "not_after": info.not_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "days_left": info.days_left(),
            "client_ca": self.client_ca is not None,
            "reload_error": self.reload_error,
        }

    def _choose(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        """The SNI callback: a handshake begun on an older context continues on the one serving now."""
        serving = self._serving
        if context is not serving:
            ssl_object.context = serving

    def _listener_context(self) -> ssl.SSLContext:
        context = _server_context(self.settings, self.client_ca, self._client_ca_pem)
        certificate_pem, key_pem = certificates.self_signed(["phi-gateway.invalid"], 1)
        with _private_copy(self.material.dir, key_pem + certificate_pem) as combined:
            context.load_cert_chain(combined)
        context.sni_callback = self._choose
        return context

    def _context_for(self, pair: Pair) -> ssl.SSLContext:
        """A new context holding a checked pair (never an old context loaded again; see the module)."""
        context = _server_context(self.settings, self.client_ca, self._client_ca_pem)
        with _private_copy(self.material.dir, pair.key_pem + pair.certificate_pem) as combined:
            try:
                context.load_cert_chain(combined, password=_no_passphrase)
            except (ssl.SSLError, OSError) as exc:
                raise OperatorError(f"OpenSSL refused the certificate or key: {exc}") from None
        return context


def listener_tls(root: Path, server: ServerSettings, host: str) -> ServerTls | None:
    """The TLS of a listener on ``host``: a ``ServerTls`` when the home holds a certificate, None for plain
    HTTP where that is allowed (loopback, or ``insecure_http``); otherwise ``OperatorError`` saying what
    to run."""
    material = TlsMaterial(root)
    settings = server.tls
    client_ca = None
    if settings.client_ca_file is not None:
        client_ca = root / settings.client_ca_file  # an absolute path stays as it is
    if material.present():
        return ServerTls(material, settings, client_ca)
    if client_ca is not None:
        raise OperatorError(
            f"server.tls.client_ca_file is set ({client_ca}) but the home holds no certificate, so the port "
            "would not speak TLS; make one first: phi-gateway tls self-signed --host NAME (or tls import)"
        )
    if is_loopback(host) or server.insecure_http:
        return None
    raise OperatorError(
        f"refusing to serve plain HTTP on {host or 'every address'}: callers' tokens would cross the network "
        "in clear. Give the gateway a certificate first: phi-gateway tls self-signed --host NAME (clients "
        "then pin its fingerprint), or phi-gateway tls import CERT KEY [--chain FILE]. To serve plain HTTP "
        "there anyway (behind a TLS-terminating proxy on the same host, say), pass --insecure-http (setting "
        "server.insecure_http); on 127.0.0.1 plain HTTP is always allowed"
    )


def plain_transport(host: str) -> dict[str, Any]:
    """The ``transport`` part of ``/health`` when the port speaks plain HTTP."""
    return {"tls": False, "insecure_http": not is_loopback(host)}


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); an empty host means every address."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to anything: not loopback


def _client_ca_pem(client_ca: Path) -> bytes:
    bundle = files.read_bytes(client_ca, PEM_FILE)
    try:
        count = len(certificates.parse_certificates(bundle, "client CA file"))
    except OperatorError as exc:
        raise OperatorError(f"server.tls.client_ca_file {client_ca}: {exc}") from None
    log.info(
        "client certificates are asked for and verified against %s (%d CA certificates)", client_ca, count
    )
    return bundle


def _server_context(
    settings: TlsSettings, client_ca: Path | None, client_ca_pem: bytes | None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.min_version]
    try:
        context.set_ciphers(settings.ciphers)
    except ssl.SSLError:
        raise OperatorError(f"server.tls.ciphers: OpenSSL knows no cipher in {settings.ciphers!r}") from None
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])  # the one protocol spoken here, said so in the handshake
    if client_ca_pem is not None:
        # Optional, not required: a role without the rule connects without one; Police refuses the roles
        # whose policy requires one. A certificate that is presented must verify, or the handshake fails.
        try:
            context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        except (UnicodeDecodeError, ssl.SSLError) as exc:
            raise OperatorError(f"server.tls.client_ca_file {client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


@contextlib.contextmanager
def _private_copy(directory: Path, data: bytes) -> Iterator[str]:
    """A path holding ``data`` while the block runs: ``load_cert_chain`` reads paths only, and reading the
    home's files again could see a newer pair than the one checked. On Linux an anonymous memory file
    (the key never touches a disk, and a read-only home still serves); elsewhere a 0600 file beside the
    pair, removed at once."""
    memfd_create = getattr(os, "memfd_create", None)
    try:
        if memfd_create is not None and os.path.isdir("/proc/self/fd"):
            fd = memfd_create("phi-tls-pair", getattr(os, "MFD_CLOEXEC", 0))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                yield f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
            return
        fd, path = tempfile.mkstemp(dir=directory, prefix=".loading.", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    except OSError as exc:
        raise OperatorError(f"cannot stage the certificate for loading: {exc}") from None


def _no_passphrase() -> bytes:
    """An encrypted key fails to load rather than prompt on a terminal nobody watches."""
    return b""


def _warn_if_expiring(info: CertificateInfo) -> None:
    left = info.days_left(datetime.now(UTC))
    if left < EXPIRY_WARNING_DAYS:
        log.warning(
            "the certificate %s expires in %d day(s) (%s): import a new one (phi-gateway tls import)",
            info.fingerprint,
            left,
            info.not_after.isoformat(),
        )
