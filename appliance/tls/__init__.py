"""TLS on the public port: the certificate material in the home and the server context that serves it.

    certificates   parse, check and describe a certificate and key; make the self-signed one of a first boot
    material       <home>/tls/cert.pem and key.pem: read, install atomically, notice a change
    context        the server SSLContext, its certificate swapped in place, and when plain HTTP is allowed

Owns nothing else. Never: imports the http server, the pipeline, the ledger or the command line (the
gateway hands the context to the server; the ``tls`` verbs record their own admin records).
"""

from appliance.tls.certificates import CertificateInfo
from appliance.tls.context import ServerTls, is_loopback, listener_tls, plain_transport
from appliance.tls.material import TlsMaterial

__all__ = ["CertificateInfo", "ServerTls", "TlsMaterial", "is_loopback", "listener_tls", "plain_transport"]
