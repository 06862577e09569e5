"""Every response carries X-Request-Id, whoever wrote it, and a recorded one names its audit records."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from pathlib import Path

from appliance.http.limits import HttpLimits
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc

_ID = re.compile(r"[0-9a-f]{32}")


def _ask(
    port: int, method: str, path: str, token: str | None = None, body: bytes | None = None
) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        ids = resp.headers.get_all("x-request-id") or []
        assert len(ids) == 1, f"{method} {path}: {ids}"
        return resp.status, ids[0]
    finally:
        conn.close()


def _recorded(h: GatewayHarness, request_id: str) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if h.audit.for_request(request_id):
            return True
        time.sleep(0.02)
    return False


def test_every_endpoint_and_refusal_names_its_request(tmp_path: Path, upstream: FakeUpstream) -> None:
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    h.set_provider_keys()
    h.start(limits=HttpLimits(max_body_bytes=4096))
    try:
        token = h.issue("radiology-bot")
        chat = json.dumps({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        cases = [
            ("GET", "/health", None, None, 200, False),  # neither identified nor recorded
            ("GET", "/v1/models", token, None, 200, True),
            ("GET", "/v1/models", None, None, 401, True),
            ("POST", "/v1/chat/completions", token, chat.encode(), 200, True),
            ("POST", "/v1/chat/completions", token, b"{bad", 400, True),
            ("GET", "/v2/nothing", token, None, 404, True),
            ("GET", "/v1/chat/completions", token, None, 405, True),
        ]
        seen = set()
        for method, path, tok, body, status, recorded in cases:
            got, request_id = _ask(h.port, method, path, tok, body)
            assert got == status, (method, path, got)
            assert _ID.fullmatch(request_id), request_id
            seen.add(request_id)
            if recorded:
                assert _recorded(h, request_id), (method, path)
        assert len(seen) == len(cases)
        # The server's own refusal (413, before any handler runs) names its request too.
        with socket.create_connection(("127.0.0.1", h.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n")
            head = sock.recv(65536).decode("latin-1")
        assert head.startswith("HTTP/1.1 413")
        ids = re.findall(r"(?im)^x-request-id: ([0-9a-f]+)\r$", head)
        assert len(ids) == 1 and _ID.fullmatch(ids[0])
    finally:
        h.stop()


def test_a_handler_cannot_set_a_second_request_id(tmp_path: Path, upstream: FakeUpstream) -> None:
    """An upstream's own x-request-id is renamed, and the server drops any copy a handler adds."""
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    h.set_provider_keys()
    h.start()
    try:
        token = h.issue("radiology-bot")
        chat = json.dumps({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        status, request_id = _ask(h.port, "POST", "/v1/chat/completions", token, chat.encode())
        assert status == 200 and request_id != "req_fake"
    finally:
        h.stop()
