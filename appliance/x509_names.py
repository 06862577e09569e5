"""The one written form of an X.509 distinguished name: what the ledger records as a client certificate's
subject and what a policy's ``client_certificate.subjects`` are compared with.

Owns: ``subject_of`` (a certificate's subject, from its DER encoding) and ``canonical`` (a subject an
operator wrote, in the same form). Both are RFC 4514 as the ``cryptography`` library escapes it, most
specific attribute first (``CN=radiology-bot,O=St Marys``), attribute types named as OpenSSL names them
(``emailAddress``, ``GN``, ``serialNumber``, …; unknown ones as their OID), the attributes of a multi-valued
RDN in sorted order: so a subject copied from ``openssl x509 -noout -subject -nameopt RFC2253`` matches
however its escaping, attribute-type case or multi-valued order was written.
Never: compares names as the operator typed them (two spellings of one name must be one string); accepts
an empty name or a ``#``-hex value (BER bytes an operator cannot check by eye) from a policy.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["canonical", "subject_of"]

# Attribute types beyond RFC 4514's own (CN, L, ST, O, OU, C, STREET, DC, UID), named as OpenSSL names
# them, so its ``-nameopt RFC2253`` output is the canonical form; anything else is written as its OID.
_OPENSSL_NAMES = {
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.STREET_ADDRESS: "street",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.TITLE: "title",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.INITIALS: "initials",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL",
    x509.ObjectIdentifier("2.5.4.13"): "description",
}
_RFC4514 = {
    "CN": NameOID.COMMON_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "STREET": NameOID.STREET_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
}
_WRITE = dict(_OPENSSL_NAMES)
# Attribute type names are case-insensitive (RFC 4514 section 3): every spelling an operator may copy.
_READ = {
    spelling: oid
    for name, oid in [
        *_RFC4514.items(),
        *((n, o) for o, n in _OPENSSL_NAMES.items()),
        ("E", NameOID.EMAIL_ADDRESS),
    ]
    for spelling in {name, name.lower(), name.upper(), name.capitalize()}
}
_HEX_VALUE = re.compile(r"(?:^|(?<!\\)[,+])[^=]*=\s*#")


def subject_of(der: bytes) -> str | None:
    """The subject of a DER certificate in the canonical form; None when it is empty or cannot be read
    (such a certificate matches no subject a policy lists)."""
    try:
        written = _written(x509.load_der_x509_certificate(der).subject)
    except ValueError:
        return None
    return written or None


def canonical(subject: str) -> str:
    """``subject`` (RFC 4514) in the canonical form; ``ValueError`` naming the problem if it is not one."""
    try:
        if _HEX_VALUE.search(subject):
            raise ValueError
        name = x509.Name.from_rfc4514_string(subject, _READ)
        if not name.rdns:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{subject[:200]!r} is not an RFC 4514 distinguished name (write it as "
            "openssl x509 -noout -subject -nameopt RFC2253 prints it: CN=radiology-bot,O=St Marys)"
        ) from None
    return _written(name)


def _written(name: x509.Name) -> str:
    """Most specific RDN first; a multi-valued RDN's attributes sorted (their DER order is not an
    operator's to know)."""
    return ",".join(
        "+".join(sorted(attribute.rfc4514_string(_WRITE) for attribute in rdn)) for rdn in reversed(name.rdns)
    )
