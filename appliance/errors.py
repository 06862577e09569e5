"""The one error hierarchy of the gateway.

Every error a caller can see is a ``GatewayError``; the HTTP status, the OpenAI error ``type`` and the
default ``code`` live on the class, so raising the right class is all a handler has to do. Library errors
(sqlite3, cryptography, llama.cpp, sockets) are translated at the boundary with ``raise ... from exc``.
Messages must never contain a token secret, a provider key or prompt text.

    GatewayError (500 server_error)
    ├── BadRequest (400 invalid_request_error)
    │   └── MalformedHTTP (400, the connection is closed after the answer)
    ├── Unauthorized (401 authentication_error)
    ├── Forbidden (403 permission_error)
    │   └── PolicyDenied (403, the role's policy refuses the request)
    │       └── ClientCertificateDenied (403, mutual TLS: no client certificate, or one not accepted)
    ├── NotFound (404 invalid_request_error)
    ├── MethodNotAllowed (405 invalid_request_error)
    ├── Conflict (409 invalid_request_error: the state changed since the client looked, e.g. a bundle
    │             other than the one verified, or a ledger verify already running)
    ├── RequestTimeout (408 timeout_error)
    ├── PayloadTooLarge (413 invalid_request_error)
    ├── RateLimited (429 rate_limit_error, carries Retry-After)
    │   └── LimitReached (429, a role's limit or budget; names the policy rule)
    ├── HeadersTooLarge (431 invalid_request_error)
    ├── UpstreamError (502 upstream_error)
    │   └── UpstreamTimeout (504 upstream_error)
    └── Unavailable (503 service_unavailable)
        ├── Overloaded (503, the concurrency cap is reached)
        ├── NoPolicy (503, no valid policy is in force: fail closed)
        └── StorageUnavailable (503, the vault database cannot be written)
            └── LedgerUnavailable (503, the audit ledger cannot be written: fail closed)

    OperatorError (not HTTP: a CLI command failed; the message is printed and the exit code is 1)
    ├── BundleRejected (a policy bundle failed one of the import checks; nothing was changed)
    └── EvidenceError (the ledger's evidence does not hold; the message says which check failed)
        ├── ProofError (a Merkle proof does not prove what it claims; also a ValueError)
        ├── CheckpointError (a signed note, checkpoint or verifier key was refused; also a ValueError)
        ├── ProofRejected (a proof document, or the checkpoint it rests on, was refused)
        ├── TreeInconsistent (stored tiles do not fit the records; also a sqlite3.DatabaseError, so
        │                     the vault writer's storage-failure path takes it and the gateway fails closed)
        └── ArchivedRecordsUnavailable (a check needs archived records no bundle given holds as the
                                        vault's tiles vouch for)

    ClientDisconnected (not an error anyone is told of: the client went away, nothing more can be sent)

The pure modules (``ledger.merkle``, ``ledger.signed_note``) raise their own classes from here, so
callers catch one tree; the second bases keep them catchable as the library kinds they used to be.
"""

from __future__ import annotations

import json
import sqlite3


class GatewayError(Exception):
    """Base of every error a caller can receive; rendered as an OpenAI-shaped JSON body."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers this error requires (e.g. Retry-After)."""
        return []

    def to_dict(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def body(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class MalformedHTTP(BadRequest):
    code = "malformed_http"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class PolicyDenied(Forbidden):
    """The role's policy refused the request; ``code`` is the verdict's reason, ``rule`` the policy path."""

    code = "policy_denied"

    def __init__(self, message: str, *, code: str | None = None, rule: str | None = None) -> None:
        super().__init__(message, code=code)
        self.rule = rule


class ClientCertificateDenied(PolicyDenied):
    """The caller's organization or role requires a client certificate (mutual TLS) and the connection
    presented none (``client_certificate_required``) or one whose subject the rule does not list
    (``client_certificate_not_allowed``); ``rule`` names the policy path."""

    code = "client_certificate_required"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "timeout_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Retry-After", str(max(1, round(self.retry_after))).encode())]


class LimitReached(RateLimited):
    """A limit or budget refused the request: 429 with Retry-After; ``rule`` names the policy path.

    ``code`` is ``rate_limited`` (requests/tokens per minute) or ``budget_exceeded`` (USD per day/month).
    """

    def __init__(self, message: str, *, rule: str, retry_after: float, code: str) -> None:
        super().__init__(message, retry_after=retry_after, code=code)
        self.rule = rule


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class Overloaded(Unavailable):
    code = "overloaded"


class NoPolicy(Unavailable):
    code = "no_policy"


class StorageUnavailable(Unavailable):
    code = "storage_unavailable"


class LedgerUnavailable(StorageUnavailable):
    code = "ledger_unavailable"


class OperatorError(Exception):
    """A CLI command failed for a reason the operator can act on; the message is printed, exit code 1."""


class BundleRejected(OperatorError):
    """A policy bundle failed an import check; nothing was changed. ``check`` names the failed check."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"bundle rejected ({check}): {message}")
        self.check = check


class EvidenceError(OperatorError):
    """The ledger's evidence (a proof, a checkpoint, the stored tree) does not hold; the message says why."""


class ProofError(EvidenceError, ValueError):
    """A Merkle proof does not prove what it claims; the message says which check failed."""


class CheckpointError(EvidenceError, ValueError):
    """A note, checkpoint or verifier key was refused; the message says precisely why.

    Prefixes: ``not a checkpoint:`` (malformed note or text), ``invalid checkpoint:`` (bad field values
    given to ``Checkpoint``), ``not a verifier key:``, ``invalid verifier key:``, ``cannot sign:``; and the
    verdicts ``signature does not verify``, ``signed by an unknown key``, ``origin mismatch``,
    ``ambiguous verifier key``.
    """


class ProofRejected(EvidenceError):
    """A proof, or the checkpoint it rests on, does not hold; the message says why."""


class TreeInconsistent(EvidenceError, sqlite3.DatabaseError):
    """The stored tiles do not fit the records (a torn or edited file): the writer refuses to append."""


class ArchivedRecordsUnavailable(EvidenceError):
    """A check or proof needs records archived away, and no archive bundle given holds them as the vault's
    tiles vouch for (none covers them, or its records do not hash to the tile the vault kept)."""


class ClientDisconnected(Exception):
    """The client connection is gone; raised by ``Responder.write`` and ``Request.body``."""
