"""TLS for tests: a test CA and the certificates it signs (made with ``cryptography``), client contexts that
verify the gateway's certificate, and the fingerprint a server presents in its handshake.

Never: turns verification off for a client that sends a request (``served_fingerprint`` reads the
certificate of a handshake without sending anything: it is how a pinning client checks what it got).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def name(common_name: str, org: str | None = None) -> x509.Name:
    """``CN=<common_name>[,O=<org>]`` in RFC 4514 (DER holds the most general attribute first)."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attributes)


@dataclass
class Issued:
    cert: x509.Certificate
    key: PrivateKey

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(pem(self.cert))
        key_path.write_bytes(key_pem(self.key))
        return cert_path, key_path


class CertificateAuthority:
    """A certificate authority made in the test: it issues client and server certificates."""

    def __init__(self, common_name: str = "Clinic Client CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = name(common_name)
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        subject: x509.Name,
        *,
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        hosts: list[str] | None = None,
        key: PrivateKey | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(minutes=5))
            .not_valid_after(not_after or now + timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False
            )
        return Issued(builder.sign(self.key, hashes.SHA256()), key)


def client_context(cafile: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A verifying client context: the gateway's certificate is checked against ``cafile`` (its own
    self-signed certificate, or the CA that issued it), host name included."""
    context = ssl.create_default_context(cafile=str(cafile))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return context


def served_fingerprint(port: int, host: str = "127.0.0.1") -> str:
    """``sha256:<hex>`` of the certificate a new handshake with ``host:port`` presents (what a client that
    pins a fingerprint compares with the one it was given)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the fingerprint comparison is the check
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return "sha256:" + hashlib.sha256(der).hexdigest()
