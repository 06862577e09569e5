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


def test_a_subject_that_is_no_name_is_refused_at_import() -> None:
    with pytest.raises(ValueError, match="not an RFC 4514 distinguished name"):
        ClientCertificate(subjects=["radiology-bot"])
