"""``AdminClient``: what the CLI verbs, ``phi-gateway top`` and the console use to talk to a running gateway.

Owns: the HTTP exchange over ``<home>/admin.sock`` (JSON calls, raw bundle uploads, the NDJSON audit stream)
and turning every failure into an ``OperatorError`` that says what happened and what to run.
On Windows there is no admin socket (no ``AF_UNIX`` in Python there; the gateway does not open one): every
call is an ``OperatorError`` that says so.
Never: opens the vault or the ledger (the console may import this module and nothing of the server side);
retries an action by itself (a console that reconnects does so on purpose).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.errors import OperatorError

_CLIENT_TIMEOUT_S = 600.0  # loading a large model verifies its hash first: minutes for tens of GB
_STREAM_SILENCE_S = 30.0
"""A stream sends a heartbeat every 2 s: this long without a line, the gateway is hung or gone."""
NO_ADMIN_SOCKET = (
    "the admin socket is not available on Windows: status, console, top, models load/unload and policy "
    "reload need it; the gateway picks up a new policy within a second by itself"
)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        family = getattr(socket, "AF_UNIX", None)
        if family is None:
            raise OperatorError(NO_ADMIN_SOCKET)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Talks to a running gateway through ``<home>/admin.sock``."""

    def __init__(self, socket_path: Path, timeout: float = _CLIENT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self._timeout = timeout

    def text(self, path: str) -> str:
        """A GET of a plain-text document (``/metrics``)."""
        status, raw = self._exchange("GET", path, None, {})
        if status != 200:
            raise OperatorError(f"the gateway answered {status} to GET {path}")
        return raw.decode("utf-8", "replace")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        return _document(*self._exchange(method, path, payload, headers))

    def send_bytes(self, method: str, path: str, data: bytes) -> dict[str, Any]:
        """An upload of raw bytes (a policy bundle to verify or import)."""
        headers = {"Content-Type": "application/octet-stream"}
        return _document(*self._exchange(method, path, data, headers))

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        """The JSON lines of a streaming GET (``/admin/audit/stream``), as they come; ends when the gateway
        closes the connection. Blocking: call it from a thread."""
        conn = _UnixConnection(self.socket_path, _STREAM_SILENCE_S)
        try:
            try:
                conn.request("GET", path)
                response = conn.getresponse()
            except OSError as exc:
                raise self._failure(exc) from exc
            if response.status != 200:
                _document(response.status, response.read())
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException):
                    return  # the gateway went away mid-stream: the caller reconnects if it wants to
                if not line:
                    return
                if line.strip():
                    doc = json.loads(line)
                    if isinstance(doc, dict):
                        yield doc
        finally:
            conn.close()

    def _exchange(
        self, method: str, path: str, payload: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        conn = _UnixConnection(self.socket_path, self._timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except OSError as exc:
            raise self._failure(exc) from exc
        finally:
            conn.close()
        return response.status, raw

    def _failure(self, exc: OSError) -> OperatorError:
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            return OperatorError(
                f"no gateway is running for this home (nothing answers on {self.socket_path}); start it "
                "with phi-gateway serve"
            )
        return OperatorError(f"the gateway's admin socket {self.socket_path} failed: {exc}")


def _document(status: int, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise OperatorError(f"the gateway answered {status} with a non-JSON body") from exc
    if status != 200:
        error = doc.get("error", {}) if isinstance(doc, dict) else {}
        raise OperatorError(f"the gateway refused: {error.get('message', status)}")
    if not isinstance(doc, dict):
        raise OperatorError("the gateway's answer is not a JSON object")
    return doc
