"""A client certificate's subject and a policy's ``client_certificate.subjects`` meet in one written form,
however the operator copied the name (OpenSSL's RFC 2253 output, other escaping, lower-case types)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from appliance.policy.schema import ClientCertificate
from appliance.x509_names import canonical, subject_of
from tests.support.tls_certs import CertificateAuthority

A = x509.NameAttribute
# (the certificate's subject, most general first; what `openssl x509 -noout -subject -nameopt RFC2253`
# prints for it, and other spellings an operator may write)
CASES = [
    ([A(NameOID.ORGANIZATION_NAME, "St Marys"), A(NameOID.COMMON_NAME, "radiology-bot")],
     ["CN=radiology-bot,O=St Marys", "cn=radiology-bot,o=St Marys"]),
    ([A(NameOID.ORGANIZATION_NAME, "St Marys"), A(NameOID.COMMON_NAME, "svc=radiology")],
     ["CN=svc=radiology,O=St Marys", "CN=svc\\=radiology,O=St Marys"]),
    ([A(NameOID.ORGANIZATION_NAME, "St Marys, Inc"), A(NameOID.COMMON_NAME, "a b")],
     ["CN=a b,O=St Marys\\, Inc", "CN=a b,O=St Marys\\2C Inc"]),
    ([A(NameOID.ORGANIZATION_NAME, "St Marys"), A(NameOID.EMAIL_ADDRESS, "bot@stmarys.example")],
     ["emailAddress=bot@stmarys.example,O=St Marys", "E=bot@stmarys.example,O=St Marys"]),
    ([A(NameOID.STREET_ADDRESS, "1 Main St"), A(NameOID.COMMON_NAME, "radiology-bot")],
     ["CN=radiology-bot,street=1 Main St", "CN=radiology-bot,STREET=1 Main St"]),
    ([A(NameOID.SURNAME, "Doe"), A(NameOID.GIVEN_NAME, "Jane"), A(NameOID.COMMON_NAME, "jdoe")],
     ["CN=jdoe,GN=Jane,SN=Doe"]),
    ([A(NameOID.SERIAL_NUMBER, "123"), A(NameOID.COMMON_NAME, "x")], ["CN=x,serialNumber=123"]),
    ([A(NameOID.PSEUDONYM, "p"), A(NameOID.INITIALS, "JD"), A(NameOID.DN_QUALIFIER, "q"),
      A(NameOID.JURISDICTION_COUNTRY_NAME, "US"), A(x509.ObjectIdentifier("2.5.4.13"), "x"),
      A(NameOID.COMMON_NAME, "bot")],
     ["CN=bot,description=x,jurisdictionC=US,dnQualifier=q,initials=JD,pseudonym=p",
      "Cn=bot,DESCRIPTION=x,jurisdictionc=US,dnqualifier=q,Initials=JD,PSEUDONYM=p"]),
]  # fmt: skip


@pytest.mark.parametrize(("attributes", "spellings"), CASES)
def test_every_spelling_of_a_subject_is_the_certificates_own(
    attributes: list[x509.NameAttribute], spellings: list[str]
) -> None:
    cert = CertificateAuthority().issue(x509.Name(attributes)).cert
    seen = subject_of(cert.public_bytes(Encoding.DER))
    assert seen == spellings[0]  # OpenSSL's own output is the canonical form
    for spelling in spellings:
        assert canonical(spelling) == seen
        assert ClientCertificate(subjects=[spelling]).subjects == [seen]


@pytest.mark.parametrize(
    "written",
    ["radiology-bot", "", "CN=#0C03626F74", "CN=bot,1.3.6.1.4.1.99999.1=#0C0178"],  # hex: BER bytes
)
def test_a_subject_that_is_no_readable_name_is_refused_at_import(written: str) -> None:
    with pytest.raises(ValueError, match="not an RFC 4514 distinguished name"):
        ClientCertificate(subjects=[written])


def test_a_multi_valued_rdn_matches_in_any_order_and_an_empty_subject_matches_nothing() -> None:
    ca = CertificateAuthority()
    rdn = x509.RelativeDistinguishedName([A(NameOID.ORGANIZATION_NAME, "b"), A(NameOID.COMMON_NAME, "a")])
    seen = subject_of(ca.issue(x509.Name([rdn])).cert.public_bytes(Encoding.DER))
    assert seen == canonical("O=b+CN=a") == canonical("CN=a+O=b")  # OpenSSL prints O=b+CN=a
    assert canonical("CN=a,O=b") != seen
    assert canonical("CN=a\\,O=b") != canonical("CN=a,O=b")
    empty = ca.issue(x509.Name([])).cert  # a SAN-only certificate (a SPIFFE SVID, say)
    assert subject_of(empty.public_bytes(Encoding.DER)) is None
