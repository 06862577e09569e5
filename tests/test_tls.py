"""TLS on the public port, below the gateway: the certificate checks, the self-signed certificate, the server
context (versions, ciphers, compression), the swap of a certificate in the same context, the rule for plain
HTTP, and what a scanner or a plain-HTTP client gets from the TLS port. Real handshakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.config import ServerSettings, TlsSettings
from appliance.errors import OperatorError
from appliance.http import HttpLimits, HttpServer, Request, Responder
from appliance.tls import ServerTls, TlsMaterial, certificates, is_loopback, listener_tls, plain_transport
from tests.support.tls_certs import (
    CertificateAuthority,
    client_context,
    key_pem,
    name,
    pem,
    served_fingerprint,
)


@pytest.fixture
def material(tmp_path: Path) -> TlsMaterial:
    cert, key = certificates.self_signed(["127.0.0.1", "gw.ward.local"], 30)
    found = TlsMaterial(tmp_path)
    found.install(cert, key)
    return found


class _Listener:
    """A plain blocking TLS accept loop on 127.0.0.1 with the context under test (one handshake each)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(material: TlsMaterial) -> Iterator[tuple[_Listener, ServerTls]]:
    tls = ServerTls(material, TlsSettings())
    server = _Listener(tls.context)
    yield server, tls
    server.close()


def _handshake(port: int, context: ssl.SSLContext, host: str = "127.0.0.1") -> tuple[str, str, bytes]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        version, cipher = tls.version() or "", tls.cipher()[0]
        return version, cipher, tls.recv(2)


# -- the self-signed certificate ------------------------------------------------------------------------


def test_self_signed_is_verified_by_a_client_that_loads_it_as_its_ca(
    listener: tuple[_Listener, ServerTls], material: TlsMaterial
) -> None:
    server, tls = listener
    context = client_context(material.cert)
    assert _handshake(server.port, context, "127.0.0.1") == ("TLSv1.3", "TLS_AES_256_GCM_SHA384", b"ok")
    assert _handshake(server.port, context, "gw.ward.local")[2] == b"ok"  # the DNS SAN
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _handshake(server.port, context, "other.ward.local")
    strict = client_context(material.cert)
    strict.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: the extensions it wants are there
    assert _handshake(server.port, strict)[2] == b"ok"
    assert served_fingerprint(server.port) == tls.info.fingerprint


def test_self_signed_contents() -> None:
    cert_pem, key = certificates.self_signed(["gw.ward.local", "10.1.2.3", "::1", "gw.ward.local"], 90)
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw.ward.local"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "::1"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    assert 89 <= (cert.not_valid_after_utc - datetime.now(UTC)).days <= 90
    assert b"ENCRYPTED" not in key and b"PRIVATE KEY" in key
    info = certificates.describe([cert])
    assert info.subject.startswith("CN=gw.ward.local") and info.self_signed and info.key == "EC P-256"
    assert info.sans == ("DNS:gw.ward.local", "IP:10.1.2.3", "IP:::1")


@pytest.mark.parametrize(
    ("hosts", "days", "message"),
    [
        ([], 30, "at least one host"),
        (["bad host"], 30, "neither an IP address nor a DNS name"),
        (["-x.example"], 30, "neither"),
        (["gw.local"], 0, "--days"),
        (["gw.local"], 5000, "--days"),
    ],
)
def test_self_signed_refuses_bad_input(hosts: list[str], days: int, message: str) -> None:
    with pytest.raises(OperatorError, match=message):
        certificates.self_signed(hosts, days)


# -- what install refuses -------------------------------------------------------------------------------


def _server_cert(ca: CertificateAuthority, key: object | None = None, **kw: object) -> tuple[bytes, bytes]:
    issued = ca.issue(name("gw.ward.local"), usage=ExtendedKeyUsageOID.SERVER_AUTH, key=key, **kw)
    return pem(issued.cert), key_pem(issued.key)


def test_install_refuses_what_cannot_be_served(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    material = TlsMaterial(tmp_path)
    cert, key = _server_cert(ca)
    _, other_key = _server_cert(ca)
    now = datetime.now(UTC)
    cases: list[tuple[bytes, bytes, bytes | None, str]] = [
        (cert, other_key, None, "does not match"),
        (b"not a pem", key, None, "no PEM certificate"),
        (cert, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", None, "no PEM private key"),
        (
            *_server_cert(ca, not_before=now - timedelta(days=9), not_after=now - timedelta(days=1)),
            None,
            "expired",
        ),
        (*_server_cert(ca, not_before=now + timedelta(days=2)), None, "check the clock"),
        (*_server_cert(ca, key=rsa.generate_private_key(65537, 1024)), None, "too weak"),
        (*_server_cert(ca, key=ec.generate_private_key(ec.SECP521R1())), None, "P-256 or P-384"),
        (cert, key, pem(CertificateAuthority("Another CA").cert), "not in issuing order"),
    ]
    client = ca.issue(name("a client"))  # extended key usage: client authentication only
    cases.append((pem(client.cert), key_pem(client.key), None, "server authentication"))
    encrypted = ca.issue(name("gw")).key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    cases.append((cert, encrypted, None, "encrypted"))
    for cert_pem, key_bytes, chain, message in cases:
        with pytest.raises(OperatorError, match=message):
            material.install(cert_pem, key_bytes, chain)
        assert not material.present(), "nothing is written when a check fails"


def test_install_accepts_rsa_ed25519_and_a_chain_and_writes_a_private_key(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    material = TlsMaterial(tmp_path)
    for key, kind in (
        (rsa.generate_private_key(65537, 2048), "RSA 2048"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        (ec.generate_private_key(ec.SECP384R1()), "EC P-384"),
    ):
        cert, key_bytes = _server_cert(ca, key=key)
        pair = material.install(cert, key_bytes, pem(ca.cert))
        assert pair.info.key == kind and pair.info.chain == 1
    assert stat.S_IMODE(os.stat(material.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(material.dir).st_mode) == 0o700
    assert material.read().info.chain == 1 and material.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    assert not [p for p in material.dir.iterdir() if p.name.startswith(".")], "no temporary file is left"


# -- the server context ---------------------------------------------------------------------------------


def test_context_refuses_old_versions_weak_ciphers_and_compresses_nothing(
    listener: tuple[_Listener, ServerTls], material: TlsMaterial
) -> None:
    server, tls = listener
    assert tls.context.options & ssl.OP_NO_COMPRESSION and tls.context.options & ssl.OP_NO_RENEGOTIATION
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = client_context(material.cert)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher, _ = _handshake(server.port, tls12)
    assert (
        version == "TLSv1.2" and cipher.startswith("ECDHE-ECDSA-") and ("GCM" in cipher or "CHACHA" in cipher)
    )
    for weak in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA"):  # CBC: not AEAD
        client = client_context(material.cert)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        client.set_ciphers(weak)
        with pytest.raises(ssl.SSLError):
            _handshake(server.port, client)
    assert set(tls.context.get_ciphers()[i]["protocol"] for i in range(len(tls.context.get_ciphers()))) <= {
        "TLSv1.2",
        "TLSv1.3",
    }
    for suite in tls.context.get_ciphers():
        assert suite["aead"] and (suite["protocol"] == "TLSv1.3" or suite["kea"] == "kx-ecdhe"), suite


def test_min_version_1_3(material: TlsMaterial) -> None:
    tls = ServerTls(material, TlsSettings(min_version="1.3"))
    server = _Listener(tls.context)
    try:
        old = client_context(material.cert)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            _handshake(server.port, old)
        assert _handshake(server.port, client_context(material.cert))[0] == "TLSv1.3"
    finally:
        server.close()


def test_unknown_cipher_setting_is_an_operator_error(material: TlsMaterial) -> None:
    with pytest.raises(OperatorError, match=r"server\.tls\.ciphers"):
        ServerTls(material, TlsSettings(ciphers="NO-SUCH-CIPHER"))


def _fail_renaming_the_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    """``material``'s rename of a staged ``cert.pem`` fails (EIO); every other rename works."""
    from appliance.tls import material as material_module

    real_replace = os.replace

    def replace(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "cert.pem":
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(material_module.os, "replace", replace)


@pytest.mark.parametrize("failing", ["staging the certificate", "renaming the certificate"])
def test_an_install_that_fails_midway_leaves_the_old_pair_whole(
    material: TlsMaterial, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    from appliance.tls import material as material_module

    served = material.read().info.fingerprint
    if failing == "staging the certificate":
        real_staged = material_module._staged

        def staged(path: Path, data: bytes, mode: int) -> Path:
            if path.name == "cert.pem":
                raise OSError(28, "No space left on device")
            return real_staged(path, data, mode)

        monkeypatch.setattr(material_module, "_staged", staged)
    else:
        _fail_renaming_the_certificate(monkeypatch)
    with pytest.raises(OSError):
        material.install(*certificates.self_signed(["127.0.0.1"], 30))
    monkeypatch.undo()
    assert material.read().info.fingerprint == served  # the old key with the old certificate
    assert sorted(p.name for p in material.dir.iterdir()) == ["cert.pem", "key.pem"]  # nothing left behind


def test_what_a_crash_between_the_renames_left_is_undone_when_the_gateway_starts(
    material: TlsMaterial,
) -> None:
    served = material.read()
    new_cert, new_key = certificates.self_signed(["127.0.0.1"], 30)
    # as install leaves it when killed after the key's rename: old key aside, new key in place, staged files
    material.previous.write_bytes(material.key.read_bytes())
    material.previous.chmod(0o600)
    material.key.write_bytes(new_key)
    (material.dir / ".cert.pem.x1.tmp").write_bytes(new_cert)
    (material.dir / ".key.pem.x2.tmp").write_bytes(new_key)
    with pytest.raises(OperatorError, match="does not match"):
        material.read()
    tls = ServerTls(material, TlsSettings())
    assert tls.info.fingerprint == served.info.fingerprint
    assert sorted(p.name for p in material.dir.iterdir()) == ["cert.pem", "key.pem"]


def test_a_first_install_that_fails_leaves_no_half_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_renaming_the_certificate(monkeypatch)
    fresh = TlsMaterial(tmp_path)
    with pytest.raises(OSError):
        fresh.install(*certificates.self_signed(["127.0.0.1"], 30))
    assert not fresh.present() and list(fresh.dir.iterdir()) == []


def test_a_key_other_users_can_read_is_not_served(material: TlsMaterial) -> None:
    material.key.chmod(0o644)
    with pytest.raises(OperatorError, match=r"accessible by other users \(mode 0644\).*chmod 600"):
        ServerTls(material, TlsSettings())
    material.key.chmod(0o600)
    tls = ServerTls(material, TlsSettings())
    material.install(*certificates.self_signed(["127.0.0.1"], 30))
    material.key.chmod(0o640)
    assert tls.refresh() is False and tls.refresh() is False  # refused at reload too; the old pair serves
    assert tls.reload_error is not None and "chmod 600" in tls.reload_error


# -- a new certificate in the same context --------------------------------------------------------------


def test_refresh_puts_a_new_pair_in_service_on_the_same_listener(
    listener: tuple[_Listener, ServerTls], material: TlsMaterial
) -> None:
    server, tls = listener
    context, first = tls.context, tls.info.fingerprint
    assert tls.refresh() is False, "nothing changed"
    new = material.install(*certificates.self_signed(["127.0.0.1"], 30))
    assert tls.refresh() is True and tls.context is context
    assert tls.info.fingerprint == new.info.fingerprint != first
    assert served_fingerprint(server.port) == new.info.fingerprint
    assert tls.transport()["fingerprint"] == new.info.fingerprint


def test_a_pair_that_does_not_match_is_refused_and_the_old_one_kept(
    listener: tuple[_Listener, ServerTls], material: TlsMaterial, caplog: pytest.LogCaptureFixture
) -> None:
    server, tls = listener
    served = tls.info.fingerprint
    original = material.dir.parent / "served.pem"
    original.write_bytes(material.cert.read_bytes())
    other_cert, _ = certificates.self_signed(["127.0.0.1"], 30)
    material.cert.write_bytes(other_cert)  # by hand, without its key
    with caplog.at_level(logging.WARNING, "phi.tls"):
        assert tls.refresh() is False
        assert not caplog.records and tls.reload_error is None, "a rotation half done is retried quietly"
        assert tls.refresh() is False
        assert tls.refresh() is False
    assert len(caplog.records) == 1 and "does not match" in caplog.records[0].getMessage()
    assert tls.transport()["reload_error"] is not None
    assert served_fingerprint(server.port) == served, "still serving the old pair, whole"
    assert _handshake(server.port, client_context(original))[2] == b"ok"  # verified as before
    material.install(*certificates.self_signed(["127.0.0.1"], 30))
    assert tls.refresh() is True and tls.reload_error is None


@pytest.mark.parametrize("first_kind", ["ec", "rsa"])
def test_a_rotation_to_another_key_type_serves_only_the_new_certificate(
    tmp_path: Path, first_kind: str
) -> None:
    """OpenSSL keeps one certificate per key type in a context: the EC self-signed certificate of first boot
    must not stay in service beside the site CA's RSA one that replaced it (nor the other way round)."""
    ca = CertificateAuthority("Site CA")
    keys = {"ec": ec.generate_private_key(ec.SECP256R1()), "rsa": rsa.generate_private_key(65537, 2048)}
    second_kind = "rsa" if first_kind == "ec" else "ec"
    material = TlsMaterial(tmp_path)
    first = ca.issue(
        name("gw"), usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=["127.0.0.1"], key=keys[first_kind]
    )
    material.install(pem(first.cert), key_pem(first.key))
    tls = ServerTls(material, TlsSettings())
    server = _Listener(tls.context)
    try:
        second = ca.issue(
            name("gw"), usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=["127.0.0.1"], key=keys[second_kind]
        )
        installed = material.install(pem(second.cert), key_pem(second.key))
        assert tls.refresh() is True
        # a default client, and clients that can only take the old key type's signatures
        assert served_fingerprint(server.port) == installed.info.fingerprint
        only_old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        only_old.check_hostname, only_old.verify_mode = False, ssl.CERT_NONE
        only_old.maximum_version = ssl.TLSVersion.TLSv1_2
        only_old.set_ciphers("ECDHE+aECDSA+AESGCM" if first_kind == "ec" else "ECDHE+aRSA+AESGCM")
        with pytest.raises((ssl.SSLError, OSError)):
            _handshake(server.port, only_old)
    finally:
        server.close()


# -- plain HTTP, or TLS: the rule -----------------------------------------------------------------------


def test_listener_tls_rule(tmp_path: Path) -> None:
    server = ServerSettings()
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and listener_tls(tmp_path, server, host) is None
    for host in ("0.0.0.0", "", "10.0.0.5", "gw.ward.local", "::"):
        with pytest.raises(OperatorError, match="phi-gateway tls self-signed --host NAME") as refused:
            listener_tls(tmp_path, server, host)
        assert "--insecure-http" in str(refused.value)
    assert listener_tls(tmp_path, ServerSettings(insecure_http=True), "0.0.0.0") is None
    assert plain_transport("0.0.0.0") == {"tls": False, "insecure_http": True}
    assert plain_transport("127.0.0.1") == {"tls": False, "insecure_http": False}
    with_ca = ServerSettings(tls=TlsSettings(client_ca_file=Path("clients.pem")))
    with pytest.raises(OperatorError, match="holds no certificate"):
        listener_tls(tmp_path, with_ca, "127.0.0.1")
    material = TlsMaterial(tmp_path)
    material.install(*certificates.self_signed(["gw.ward.local"], 30))
    tls = listener_tls(tmp_path, server, "0.0.0.0")
    assert tls is not None and tls.transport()["tls"] is True and tls.transport()["client_ca"] is False
    material.key.unlink()
    with pytest.raises(OperatorError, match=r"key\.pem is missing"):
        listener_tls(tmp_path, server, "127.0.0.1")  # half a pair never falls back to plain HTTP
    material.install(*certificates.self_signed(["gw.ward.local"], 30))
    (tmp_path / "clients.pem").write_bytes(b"not a certificate")
    with pytest.raises(OperatorError, match="client_ca_file"):
        listener_tls(tmp_path, with_ca, "127.0.0.1")
    (tmp_path / "clients.pem").write_bytes(pem(CertificateAuthority().cert))
    tls = listener_tls(tmp_path, with_ca, "127.0.0.1")
    assert tls is not None and tls.context.verify_mode == ssl.CERT_OPTIONAL and tls.transport()["client_ca"]


# -- the HTTP server on a TLS port: scanners and plain-HTTP clients -------------------------------------


async def _hello(request: Request, responder: Responder) -> None:
    await responder.send(200, [(b"Content-Type", b"text/plain")], b"hello")


def _closes_without_an_answer(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if data:
            sock.sendall(data)
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_scanners_and_plain_http_are_closed_quietly(
    loop: str, material: TlsMaterial, caplog: pytest.LogCaptureFixture
) -> None:
    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    tls = ServerTls(material, TlsSettings())

    async def scenario() -> None:
        server = HttpServer(_hello, HttpLimits(header_timeout_s=0.5))
        await server.start("127.0.0.1", 0, ssl=tls.context)
        port = server.port
        try:
            for scanner in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello" * 4, b""):
                # plain HTTP, a broken ClientHello, and silence (the handshake timeout): closed, no answer
                assert await asyncio.to_thread(_closes_without_an_answer, port, scanner) == b""
            verified = client_context(material.cert)

            def request() -> bytes:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                    verified.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
                ):
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return sock.recv(4096)

            answer = await asyncio.to_thread(request)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello")
        finally:
            await server.shutdown()

    with caplog.at_level(logging.DEBUG), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 15))
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


def test_a_replaced_pair_is_not_kept_loaded(material: TlsMaterial) -> None:
    """The listener's own context holds a throwaway certificate: after a rotation nothing keeps the
    replaced pair's context (and its private key) alive."""
    import gc
    import weakref

    tls = ServerTls(material, TlsSettings())
    first = weakref.ref(tls._serving)
    assert tls.context is not tls._serving
    material.install(*certificates.self_signed(["127.0.0.1"], 30))
    assert tls.refresh() is True
    gc.collect()
    assert first() is None
