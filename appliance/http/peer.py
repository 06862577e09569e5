"""Who is at the other end of one connection, as the transport knows it: never from a header.

Owns: ``Peer`` (the client's address; for a unix socket the OS user and process from ``SO_PEERCRED``; for
a TLS connection the verified client certificate's subject and SHA-256 fingerprint) and ``peer_of``,
which reads it once when a connection is made.
Never: trusts anything the client says about itself (``X-Forwarded-For`` and the like are not read here);
raises: a peer the transport cannot describe is a ``Peer`` with empty fields.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
from typing import Any

from appliance.x509_names import subject_of

__all__ = ["Peer", "peer_of"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (Linux)


class Peer:
    """The transport's view of a client: address, OS identity (unix sockets), client certificate (TLS)."""

    __slots__ = ("address", "cert_fingerprint", "cert_subject", "gid", "pid", "tls", "uid")

    def __init__(
        self,
        address: tuple[str, int] | None = None,
        *,
        uid: int | None = None,
        gid: int | None = None,
        pid: int | None = None,
        tls: bool = False,
        cert_subject: str | None = None,
        cert_fingerprint: str | None = None,
    ) -> None:
        self.address = address
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.tls = tls
        self.cert_subject = cert_subject
        """RFC 4514 subject of the client certificate the handshake verified (``appliance.x509_names``'s
        canonical form, which a policy's subjects are also put in); None without one."""
        self.cert_fingerprint = cert_fingerprint
        """``sha256:<hex>`` of that certificate's DER encoding."""


def peer_of(transport: asyncio.BaseTransport) -> Peer:
    """Describe the peer of a freshly made connection (after its TLS handshake, if any)."""
    address = None
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        address = (str(peername[0]), int(peername[1]))
    uid = gid = pid = None
    sock = transport.get_extra_info("socket")
    if sock is not None and getattr(sock, "family", None) == getattr(socket, "AF_UNIX", None):
        uid, gid, pid = _credentials(sock)
    ssl_object = transport.get_extra_info("ssl_object")
    subject = fingerprint = None
    if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        der = ssl_object.getpeercert(binary_form=True)
        if der:  # only a certificate the context verified is ever returned here (CERT_OPTIONAL/REQUIRED)
            subject = subject_of(der)
            fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()
    return Peer(
        address,
        uid=uid,
        gid=gid,
        pid=pid,
        tls=ssl_object is not None,
        cert_subject=subject,
        cert_fingerprint=fingerprint,
    )


def _credentials(sock: Any) -> tuple[int | None, int | None, int | None]:
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # not Linux: no peer credentials to read
        return None, None, None
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    except (OSError, struct.error):
        return None, None, None
    return uid, gid, pid
