"""End to end: one caller, or an outsider with no token, cannot take the gateway or fill its disk (issue 10,
class 4). Each test failed on main at 1e3709a: 401s were one durable row each, a caller could hold every
request slot with bodies it never finished, and limits were applied only once the body had arrived.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.http.limits import HttpLimits
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc

CHAT = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _request(token: str | None, body: bytes = CHAT, *, send_body: bool = True) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body if send_body else head


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    head, body = _read(sock)
    return int(head.split()[1]), body


def _refusal(h: GatewayHarness, sock: socket.socket, status: int) -> dict[str, object]:
    """The refusal on ``sock``: its status, its OpenAI-shaped error, its X-Request-Id and its record."""
    head, body = _read(sock)
    assert int(head.split()[1]) == status
    error = json.loads(body)["error"]
    assert {"message", "type", "code", "param"} <= set(error)
    found = re.search(rb"(?i)x-request-id: ([0-9a-f]{32})", head)
    assert found is not None
    request_id = found.group(1).decode()
    deadline = time.monotonic() + 5
    while not (records := h.audit.for_request(request_id)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r["status_code"] for r in records] == [status]
    return dict(error)


def _read(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest[:length]


@pytest.fixture
def h(tmp_path: Path, upstream: FakeUpstream) -> Iterator[GatewayHarness]:
    harness = GatewayHarness(tmp_path)
    doc = policy_doc(upstream.base_url)
    doc["organizations"]["stmarys"]["roles"]["billing"]["limits"] = {"per_caller": {"requests_per_min": 1}}
    harness.import_policy(doc)
    harness.set_provider_keys()
    settings = harness.home.root / "gateway.toml"
    settings.write_text(settings.read_text() + "\n[server]\nmax_in_flight_per_caller = 2\n")
    harness.start()
    yield harness
    harness.stop()


def test_an_unauthenticated_flood_is_counted_not_recorded_row_by_row(h: GatewayHarness) -> None:
    before = len(list(h.ledger_rows()))
    sent = 600
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
        for _ in range(sent):
            sock.sendall(_request("nobody:" + "0" * 48))
            status, body = _read_response(sock)
            assert status in (401, 403) and json.loads(body)["error"]
    elapsed = time.monotonic() - started
    h.stop()  # the last window's count is written at shutdown
    rows = list(h.ledger_rows())[before:]
    counted = [r for r in rows if r.get("intervention") == "flood_sampled"]
    full = [r for r in rows if r.get("intervention") != "flood_sampled"]
    total = len(full) + sum(int(r["detail"].split()[0]) for r in counted)
    assert total == sent  # every refusal is accounted for
    windows = int(elapsed) + 2
    assert len(full) <= windows and len(counted) <= windows  # but at most two rows per 1-second window
    assert all("0" * 48 not in json.dumps(r) for r in rows)


def test_one_caller_cannot_hold_every_request_slot(h: GatewayHarness) -> None:
    slow = h.issue("slow-bot")
    held = []
    for _ in range(2):  # two requests whose bodies never come: the caller's whole allowance
        sock = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        sock.sendall(_request(slow, send_body=False))
        held.append(sock)
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
            sock.sendall(_request(slow))
            assert _refusal(h, sock, 429)["code"] == "too_many_concurrent_requests"
        with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
            sock.sendall(_request(h.issue("other-bot")))
            assert _read_response(sock)[0] == 200  # another caller is served meanwhile
    finally:
        for sock in held:
            sock.close()


def test_a_caller_at_its_rate_limit_is_refused_before_sending_its_body(h: GatewayHarness) -> None:
    token = h.issue("billing-bot", role="billing")
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
        sock.sendall(_request(token))
        assert _read_response(sock)[0] == 200
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
        sock.sendall(_request(token, send_body=False))  # the head only: the answer must not wait for more
        assert _refusal(h, sock, 429)["code"] == "rate_limited"


def test_health_reports_readiness_not_a_moment_of_saturation(tmp_path: Path, upstream: FakeUpstream) -> None:
    harness = GatewayHarness(tmp_path)
    harness.import_policy(policy_doc(upstream.base_url))
    harness.start(limits=HttpLimits(max_concurrency=1))
    try:
        with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as held:
            held.sendall(_request(harness.issue("busy-bot"), send_body=False))  # the only slot, held
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
                sock.sendall(_request(harness.issue("other-bot")))
                assert _read_response(sock)[0] == 503  # the gateway is full ...
            with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                status, body = _read_response(sock)
            assert status == 200 and json.loads(body)["status"] == "ok"  # ... and still ready
    finally:
        harness.stop()
