"""Certificates and keys as the public port serves them: parsed, checked, described, or made for first boot.

Owns: what a server certificate must be to be installed (``check``: PEM that parses, an unencrypted key
of an accepted type that matches the certificate, valid now, usable for a TLS server, a chain in issuing
order), what an operator is shown about one (``CertificateInfo``: subject, SANs, issuer, validity, the
SHA-256 fingerprint clients pin), and the self-signed certificate of a first boot (``self_signed``:
ECDSA P-256, one SAN per host name or IP address, not a CA).
Never: does I/O (``material`` reads and writes the files); returns or prints a private key's content;
accepts a key type or size weaker than RSA 2048, EC P-256/P-384 or Ed25519.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import OperatorError

__all__ = [
    "MAX_DAYS",
    "CertificateInfo",
    "ServerKey",
    "check",
    "describe",
    "parse_certificates",
    "parse_key",
    "self_signed",
]

ServerKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
"""The private key types a server certificate may have here."""

MAX_DAYS = 3650
"""Longest validity ``self_signed`` makes (ten years); clients of a pinned certificate need no renewal,
but a shorter life limits what a stolen key is worth."""

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
_MIN_RSA_BITS = 2048
_SKEW = timedelta(minutes=5)  # a self-signed certificate is valid from a little before now: clock skew
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator (``tls show``) and ``/health`` are told about the certificate being served."""

    subject: str
    """RFC 4514, most specific attribute first (``CN=gw.ward.local,O=St Example``)."""
    issuer: str
    sans: tuple[str, ...]
    """``DNS:name`` and ``IP:address`` entries of the subjectAltName extension, in order."""
    not_before: datetime
    not_after: datetime
    fingerprint: str
    """``sha256:<hex>`` of the certificate's DER encoding: what a client pins."""
    key: str
    """``EC P-256``, ``RSA 3072``, ``Ed25519``…"""
    chain: int
    """Certificates served after this one (intermediates)."""

    @property
    def self_signed(self) -> bool:
        return self.subject == self.issuer and self.chain == 0

    def days_left(self, now: datetime | None = None) -> int:
        """Whole days until ``not_after`` (negative once expired)."""
        return (self.not_after - (now or datetime.now(UTC))) // timedelta(days=1)

    def lines(self, now: datetime | None = None) -> list[str]:
        """The operator's view, one ``name: value`` per line."""
        return [
            f"subject:     {self.subject}",
            f"SANs:        {', '.join(self.sans) or '(none)'}",
            f"issuer:      {self.issuer}{' (self-signed)' if self.self_signed else ''}",
            f"not before:  {_iso(self.not_before)}",
            f"not after:   {_iso(self.not_after)} ({self.days_left(now)} days left)",
            f"key:         {self.key}",
            f"chain:       {self.chain} certificate(s) after this one",
            f"fingerprint: {self.fingerprint}",
        ]


def parse_certificates(pem: bytes, what: str = "certificate file") -> list[x509.Certificate]:
    """Every certificate of a PEM file, in file order; refuses a file with none."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise OperatorError(f"the {what} holds no PEM certificate that parses ({exc})") from None
    return certificates


def parse_key(pem: bytes) -> ServerKey:
    """An unencrypted PEM private key of an accepted type and size."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise OperatorError(
            "the key file is encrypted; the gateway starts unattended, so give it the key without a "
            "passphrase (openssl pkey -in key.pem -out plain.pem) and keep that file 0600"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise OperatorError(f"the key file holds no PEM private key that parses ({exc})") from None
    _key_name(key)  # refuses weak or unknown types
    assert isinstance(key, ServerKey)
    return key


def check(
    certificates: list[x509.Certificate], key: ServerKey, now: datetime | None = None
) -> CertificateInfo:
    """Refuse a certificate (with its chain after it) that cannot be served with ``key`` now; describe it."""
    leaf = certificates[0]
    now = now or datetime.now(UTC)
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise OperatorError("the key does not match the certificate (their public keys differ)")
    if leaf.not_valid_after_utc <= now:
        raise OperatorError(f"the certificate expired on {_iso(leaf.not_valid_after_utc)}")
    if leaf.not_valid_before_utc > now + _SKEW:
        raise OperatorError(
            f"the certificate is not valid before {_iso(leaf.not_valid_before_utc)} and this appliance's "
            f"clock says {_iso(now)}; check the clock, or wait"
        )
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise OperatorError("the certificate's extended key usage does not include TLS server authentication")
    for position, (child, parent) in enumerate(itertools.pairwise(certificates)):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise OperatorError(
                f"the chain is not in issuing order: certificate {position + 2} did not issue certificate "
                f"{position + 1} (the server's certificate first, then each issuer)"
            ) from None
    return describe(certificates)


def describe(certificates: list[x509.Certificate]) -> CertificateInfo:
    """The served certificate (the first) and the length of the chain after it."""
    leaf = certificates[0]
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        sans=_sans(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint="sha256:" + hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        key=_key_name(leaf.public_key()),
        chain=len(certificates) - 1,
    )


def self_signed(hosts: list[str], days: int, now: datetime | None = None) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``hosts`` (names and IP addresses, each a SAN; the first
    is the subject's CN), valid ``days`` days: ``(certificate PEM, key PEM)``.

    Not a CA (basicConstraints CA:false), key usage digitalSignature, extended key usage serverAuth: a
    client that loads the certificate itself as its CA file verifies it, names included."""
    if not hosts:
        raise OperatorError("name at least one host: --host gateway.ward.local (or an IP address)")
    if not 1 <= days <= MAX_DAYS:
        raise OperatorError(f"--days must be between 1 and {MAX_DAYS}")
    names = [_general_name(host) for host in dict.fromkeys(hosts)]
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = hosts[0] if len(hosts[0]) <= 64 else "phi-gateway"
    subject = x509.Name(  # most general first, as DER orders it: CN=…,O=… in RFC 4514
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Phi Gateway"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(key_id, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise OperatorError(
            f"--host {host!r} is neither an IP address nor a DNS name (letters, digits and hyphens in "
            "dot-separated labels; an international name in its xn-- form)"
        )
    return x509.DNSName(name)


def _sans(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = [f"DNS:{name}" for name in names.get_values_for_type(x509.DNSName)]
    out += [f"IP:{address}" for address in names.get_values_for_type(x509.IPAddress)]
    return tuple(out)


def _key_name(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise OperatorError(f"an RSA key of {key.key_size} bits is too weak; use 2048 bits or more")
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        curve = _CURVES.get(key.curve.name)
        if curve is None:
            raise OperatorError(f"EC curve {key.curve.name} is not accepted; use P-256 or P-384")
        return f"EC {curve}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    raise OperatorError(
        f"{type(key).__name__} keys are not accepted; use RSA (2048+), EC P-256/P-384 or Ed25519"
    )


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
