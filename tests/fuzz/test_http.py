"""Fuzzing the request path over a real socket: one in-process gateway (a signed policy, a fake upstream)
for the module, and arbitrary or near-valid HTTP sent to it.

Properties, per connection: every answer is one well-formed HTTP/1.1 response (a status line, headers,
a body framed by Content-Length or chunked encoding, or by the close for an HTTP/1.0 stream), with exactly
one ``x-request-id`` of 32 hex digits; a status of 200 or 4xx/5xx, never 500 ``internal_error``; an error
body is OpenAI-shaped ``{"error": {"message", "type", ...}}``. After the last answer the server either
answers the next request or closes: it never writes bytes that are not a response, and never leaves a
complete request unanswered on an open connection.

Records: every answer to an authenticated request (a valid token, past the HTTP layer and the dispatcher)
has a ledger record with that request_id naming the caller. Unauthenticated answers (no or a wrong token,
the server's own 400/408/413/431/503, unknown paths and methods) are only checked for never being recorded
as a caller's: an unauthenticated flood may be sampled (one counted record per window), so a missing
record there is not an error. ``/health`` is never recorded.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.http.limits import HttpLimits
from tests.fuzz._profile import examples
from tests.fuzz.strategies import json_values, mutate_bytes
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc

pytestmark = pytest.mark.fuzz

MAX_BODY = 16 * 1024
CALLER = "fuzz-bot"
_REQUEST_ID = re.compile(rb"[0-9a-f]{32}")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")
# Refusals made before the caller is identified: by the HTTP layer, or by the dispatcher (404, 405).
_UNIDENTIFIED_CODES = {
    "malformed_http",
    "request_header_fields_too_large",
    "payload_too_large",
    "request_timeout",
    "overloaded",
    "upgrade_not_supported",
    "unknown_endpoint",
    "method_not_allowed",
    "not_found",
}


@dataclass
class Gateway:
    harness: GatewayHarness
    token: str
    vault: Path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    fake = FakeUpstream()
    fake.start_in_thread()
    harness = GatewayHarness(tmp_path_factory.mktemp("fuzz-http"))
    try:
        harness.import_policy(policy_doc(fake.base_url))
        harness.set_provider_keys()
        token = harness.issue(CALLER)
        harness.start(limits=HttpLimits(max_body_bytes=MAX_BODY, header_timeout_s=5, keepalive_timeout_s=5))
        yield Gateway(harness, token, harness.home.vault_path)
    finally:
        harness.stop()
        fake.stop_thread()


# ---- reading answers ------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    close_delimited: bool = False

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def request_id(self) -> str:
        return self.header("x-request-id")[0]

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]


@dataclass
class Exchange:
    answers: list[Answer] = field(default_factory=list)
    closed: bool = False


class Malformed(AssertionError):
    pass


def _parse(data: bytes, heads: list[bool], *, eof: bool) -> tuple[list[Answer], bytes]:
    """Whole responses at the start of ``data`` (``heads[i]``: the i-th answers a HEAD), and the rest."""
    answers: list[Answer] = []
    while data:
        match = _STATUS_LINE.match(data)
        if match is None:
            if len(data) < 16 and b"HTTP/1.1 "[: len(data)] == data[: len(data)] and not eof:
                break
            raise Malformed(f"not a status line: {data[:80]!r}")
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if eof:
                raise Malformed(f"a response head cut short: {data[:200]!r}")
            break
        status = int(match.group(1))
        headers: list[tuple[str, str]] = []
        for line in data[match.end() : end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise Malformed(f"a malformed header line {line!r}")
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        rest = data[end + 4 :]
        if 100 <= status < 200:  # an interim answer (100 Continue): no body, the real one follows
            data = rest
            continue
        answer = Answer(status, headers, b"")
        is_head = heads[len(answers)] if len(answers) < len(heads) else False
        lengths = answer.header("content-length")
        chunked = "chunked" in ",".join(answer.header("transfer-encoding")).lower()
        if is_head:
            pass
        elif chunked:
            body, consumed = _dechunk(rest, eof=eof)
            if consumed < 0:
                break
            answer.body, rest = body, rest[consumed:]
        elif lengths:
            if len(lengths) != 1 or not lengths[0].isdigit():
                raise Malformed(f"bad Content-Length {lengths}")
            n = int(lengths[0])
            if len(rest) < n:
                if eof:
                    raise Malformed(f"a body cut short: {len(rest)} of {n} bytes")
                break
            answer.body, rest = rest[:n], rest[n:]
        else:  # close-delimited: only for an HTTP/1.0 caller's stream
            if not eof:
                break
            answer.body, rest, answer.close_delimited = rest, b"", True
        answers.append(answer)
        data = rest
    return answers, data


def _dechunk(data: bytes, *, eof: bool) -> tuple[bytes, int]:
    body, at = [], 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            if eof:
                raise Malformed("a chunked body cut short")
            return b"", -1
        size_text = data[at:line_end].split(b";")[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]+", size_text):
            raise Malformed(f"a bad chunk size {size_text!r}")
        size = int(size_text, 16)
        start = line_end + 2
        if size == 0:
            if data[start : start + 2] == b"\r\n":
                return b"".join(body), start + 2
            if eof:
                raise Malformed("a chunked body without its final CRLF")
            return b"", -1
        if len(data) < start + size + 2:
            if eof:
                raise Malformed("a chunk cut short")
            return b"", -1
        if data[start + size : start + size + 2] != b"\r\n":
            raise Malformed("a chunk not followed by CRLF")
        body.append(data[start : start + size])
        at = start + size + 2


def _converse(port: int, payload: bytes, heads: list[bool], expected: int | None) -> Exchange:
    """Send ``payload``; read answers until ``expected`` of them, or the close (``expected`` None: send,
    half-close and read to the end)."""
    ex = Exchange()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            sock.sendall(payload)
            if expected is None:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early (431, 413) and closed while we were still sending
        data = b""
        deadline = time.monotonic() + 20
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise AssertionError(
                    f"no answer and no close within 15 s; got {len(ex.answers)} answers"
                ) from None
            if not chunk:
                ex.closed = True
            data += chunk
            answers, data = _parse(data, heads[len(ex.answers) :], eof=ex.closed)
            ex.answers += answers
            if ex.closed or (expected is not None and len(ex.answers) >= expected):
                break
            assert time.monotonic() < deadline, "the server kept the connection busy for 20 s"
    if data:
        raise Malformed(f"bytes after the last answer: {data[:100]!r}")
    return ex


# ---- properties -----------------------------------------------------------------------------------------


def _check_answer(answer: Answer) -> None:
    ids = answer.header("x-request-id")
    assert len(ids) == 1 and _REQUEST_ID.fullmatch(ids[0].encode()), answer.headers
    assert answer.status == 200 or 400 <= answer.status <= 599, answer.status
    if answer.status >= 400 and answer.body:
        assert answer.header("content-type") == ["application/json"], answer.headers
        error = answer.error()
        assert isinstance(error, dict) and isinstance(error.get("message"), str), answer.body
        assert isinstance(error.get("type"), str) and "code" in error, answer.body
        assert not (answer.status == 500 and error["code"] == "internal_error"), answer.body


def _is_health(answer: Answer) -> bool:
    if answer.status not in (200, 503) or not answer.body.startswith(b"{"):
        return False
    doc = json.loads(answer.body)
    return isinstance(doc, dict) and "uptime_s" in doc


def _records(vault: Path, request_id: str) -> list[tuple[str | None, str]]:
    conn = sqlite3.connect(f"file:{vault}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT claw_id, type FROM ledger WHERE request_id = ?", (request_id,)).fetchall()
    finally:
        conn.close()
    return [(claw, kind) for claw, kind in rows]


def _check_records(gw: Gateway, answers: list[Answer], authenticated: list[bool]) -> None:
    for answer, authed in zip(answers, authenticated, strict=False):
        if _is_health(answer) or (answer.status == 200 and not answer.body and not authed):
            continue  # /health (or HEAD /health) is never recorded
        code = answer.error().get("code") if answer.status >= 400 and answer.body else None
        # Without a body (an answer to HEAD) neither the endpoint nor the refusal's code is known.
        strict = authed and bool(answer.body) and code not in _UNIDENTIFIED_CODES and answer.status != 401
        deadline = time.monotonic() + 5
        rows = _records(gw.vault, answer.request_id)
        while strict and not rows and time.monotonic() < deadline:
            time.sleep(0.02)
            rows = _records(gw.vault, answer.request_id)
        if strict:
            assert rows, f"no ledger record for {answer.request_id} (status {answer.status}, {code})"
            assert {claw for claw, _ in rows} == {CALLER}, rows
        else:  # a refusal before identification may or may not name the caller; a stranger, never
            assert {claw for claw, _ in rows} <= ({None, CALLER} if authed else {None}), rows


# ---- near-valid requests --------------------------------------------------------------------------------

TOKEN = "<token>"  # replaced by the module's real token when the request is built
METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "PRI"]
PATHS = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/models/",
    "/health",
    "/health/",
    "/",
    "/v1/chat/completions?x=1",
    "/v1%2Fmodels",
    "/%ZZ",
    "*",
    "http://example.org/v1/models",
    "/v2/nothing",
]
MODELS = [
    "openai/gpt-4o-mini",
    "openai/gpt-4o",
    "anthropic/claude-sonnet-4-5",
    "local/none",
    "gpt-4o",
    "",
    "openai/",
    "/",
]
header_names = st.one_of(
    st.sampled_from(
        [
            "Content-Type",
            "Accept",
            "Connection",
            "Expect",
            "X-Request-Id",
            "X-Phi-Data-Class",
            "User-Agent",
            "Transfer-Encoding",
            "Upgrade",
            "Anthropic-Version",
            "Host",
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
)
header_values = st.one_of(
    st.sampled_from(
        ["close", "keep-alive", "100-continue", "application/json", "phi", "deidentified", "h2c"]
    ),
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
    ),
)

chat_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(MODELS), json_values(3))},
    optional={
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                        "content": st.one_of(st.text(max_size=40), json_values(4)),
                    }
                ),
                max_size=3,
            ),
            json_values(4),
        ),
        "stream": st.one_of(st.booleans(), json_values(2)),
        "stream_options": st.one_of(st.just({"include_usage": True}), json_values(2)),
        "max_tokens": st.one_of(st.integers(-5, 100), json_values(2)),
        "tools": json_values(4),
        "input": json_values(3),
        "prompt": json_values(3),
        "max_tokens_to_sample": json_values(2),
    },
)


@dataclass
class Req:
    raw: bytes
    head: bool
    authenticated: bool
    answers_expected: bool  # framing the server must accept as one whole request


@st.composite
def requests(draw: st.DrawFn, token: str) -> Req:
    method = draw(
        st.one_of(
            st.sampled_from(METHODS), st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8)
        )
    )
    path = draw(
        st.one_of(
            st.sampled_from(PATHS),
            st.text(alphabet="/abcdefghijklmnopqrstuvwxyz0123456789%?=&.-_~", min_size=1, max_size=30).map(
                lambda p: "/" + p
            ),
        )
    )
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    headers: list[tuple[str, str]] = [("Host", "gateway")] if draw(st.booleans()) else []
    auth = draw(st.sampled_from(["valid", "valid", "valid", "none", "wrong", "x-api-key"]))
    if auth == "valid":
        headers.append(("Authorization", f"Bearer {token}"))
    elif auth == "x-api-key":
        headers.append(("x-api-key", token))
    elif auth == "wrong":
        headers.append(
            (
                "Authorization",
                draw(st.sampled_from(["Bearer nope", "Basic abc", "Bearer " + token[:-1] + "x", ""])),
            )
        )
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=4)):
        if name.lower() not in ("transfer-encoding", "content-length"):
            headers.append((name, value))
    kind = draw(st.sampled_from(["none", "chat", "chat", "json", "bytes"]))
    body: bytes | None
    if kind == "none":
        body = None
    elif kind == "chat":
        body = json.dumps(draw(chat_bodies)).encode()
    elif kind == "json":
        body = json.dumps(draw(json_values())).encode()
    else:
        body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "length", "chunked", "bad-length", "too-large", "none"]))
    whole = True
    if body is None or framing == "none":
        body = b""
        if draw(st.booleans()):
            headers.append(("Content-Length", "0"))
    elif framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked" and version == "HTTP/1.1":
        headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted({0, len(body), *draw(st.lists(st.integers(0, len(body)), max_size=4))})
        pieces = [body[a:b] for a, b in itertools.pairwise(cuts) if b > a]
        body = b"".join(
            b"%x%s\r\n%s\r\n" % (len(p), draw(st.sampled_from([b"", b";ext=1"])), p) for p in pieces
        )
        trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
        body += b"0\r\n" + trailer + b"\r\n"
    elif framing == "bad-length":
        headers.append(("Content-Length", draw(st.sampled_from(["abc", "-1", "1e3", "", "0x10", "12, 13"]))))
        body = b""
        whole = False  # refused (400) and the connection closed
    else:
        headers.append(("Content-Length", str(MAX_BODY + draw(st.integers(1, 10**12)))))
        body = b""
        whole = False  # refused (413) and the connection closed
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    raw = head.encode("latin-1") + body
    return Req(raw, method == "HEAD", auth in ("valid", "x-api-key"), whole)


def _sequence(reqs: list[Req]) -> tuple[bytes, int]:
    """The bytes of a pipelined sequence, cut after the first request whose framing ends the connection."""
    out, n = [], 0
    for req in reqs:
        out.append(req.raw)
        n += 1
        if not req.answers_expected:
            break
    return b"".join(out), n


@examples(120, long_share=0.2)
@given(data=st.data())
def test_near_valid_requests_get_well_formed_answers_and_records(
    gateway: Gateway, data: st.DataObject
) -> None:
    reqs = data.draw(st.lists(requests(gateway.token), min_size=1, max_size=3), label="requests")
    payload, n = _sequence(reqs)
    ex = _converse(gateway.harness.port, payload, [r.head for r in reqs[:n]], n)
    for answer in ex.answers:
        _check_answer(answer)
    # Fewer answers than requests only when the server closed (after a refusal that ends the connection,
    # a Connection: close, or an HTTP/1.0 request without keep-alive).
    assert len(ex.answers) == n or ex.closed, (len(ex.answers), n)
    if len(ex.answers) < n and ex.answers:
        last = ex.answers[-1]
        closing = "close" in ",".join(last.header("connection")).lower() or last.close_delimited
        assert closing or last.status in (400, 408, 413, 431), last.headers
    _check_records(gateway, ex.answers, [r.authenticated for r in reqs[: len(ex.answers)]])


@examples(120, long_share=0.2)
@given(
    payload=st.one_of(
        st.binary(max_size=1024),
        st.sampled_from(
            [
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\n\r\n",
                b"GET /health HTTP/1.0\r\n\r\nGET /v1/models HTTP/1.1\r\n\r\n",
            ]
        ).flatmap(mutate_bytes),
    )
)
@example(payload=b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70_000 + b"\r\n\r\n")
@example(payload=b"GET /\x00 HTTP/1.1\r\n\r\n")
@example(payload=b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
def test_arbitrary_bytes_get_well_formed_answers_or_a_close(gateway: Gateway, payload: bytes) -> None:
    """No token anywhere: every answer is a refusal or /health, read until the server closes."""
    heads = [b"HEAD" in payload] * 64
    ex = _converse(gateway.harness.port, payload, heads, None)
    assert ex.closed
    for answer in ex.answers:
        _check_answer(answer)
    _check_records(gateway, ex.answers, [False] * len(ex.answers))


def test_a_malformed_request_after_head_gets_its_body(gateway: Gateway) -> None:
    payload = (
        f"HEAD /v1/models HTTP/1.1\r\nAuthorization: Bearer {gateway.token}\r\n\r\n"
        "A /v1/models HTTP/1.1\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.harness.port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    first_end = data.index(b"\r\n\r\n") + 4  # the HEAD's answer: a head only
    second = data[first_end:]
    head, _, body = second.partition(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 400 ")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    assert len(body) == length
