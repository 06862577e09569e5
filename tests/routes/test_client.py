"""The upstream HTTP client on real sockets: pooling, body framings, streaming, failures, flow control."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import UpstreamError, UpstreamTimeout
from routes.client import HIGH_WATER, MAX_BODY, MAX_HEAD, UpstreamClient
from tests.support.fake_upstream import BIG_JSON_CONTENT, BIG_STREAM_CHUNKS, FakeUpstream

Scenario = Callable[[FakeUpstream, UpstreamClient], Awaitable[None]]
JSON_HEADERS = [(b"content-type", b"application/json")]


def run(scenario: Scenario, **client_options: float) -> None:
    async def main() -> None:
        async with FakeUpstream() as fake, UpstreamClient(**client_options) as client:  # type: ignore[arg-type]
            await scenario(fake, client)

    asyncio.run(main())


def chat(model: str, *, stream: bool = False) -> bytes:
    return json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


async def post(
    fake: FakeUpstream, client: UpstreamClient, model: str, *, stream: bool = False, timeout_s: float = 5.0
) -> bytes:
    response = await client.request(
        "POST",
        fake.base_url + "/v1/chat/completions",
        JSON_HEADERS,
        chat(model, stream=stream),
        timeout_s=timeout_s,
        route="fake",
    )
    try:
        assert response.status == 200
        return await response.read()
    finally:
        await response.aclose()


async def wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_sequential_requests_reuse_one_connection() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        for _ in range(5):
            body = json.loads(await post(fake, client, "m"))
            assert body["choices"][0]["message"]["content"] == "Hello from m"
        assert fake.accepts == 1
        assert [r.path for r in fake.requests] == ["/v1/chat/completions"] * 5
        headers = fake.requests[0].headers
        assert headers["host"] == f"127.0.0.1:{fake.port}"
        assert headers["content-length"] == str(len(chat("m")))

    run(scenario)


def test_response_head_and_headers() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        response = await client.request(
            "POST", fake.base_url + "/v1/chat/completions", [], chat("m"), timeout_s=5
        )
        assert response.status == 200
        assert response.header(b"content-type") == b"application/json"
        assert response.header(b"x-request-id") == b"req_fake"
        assert response.header(b"nope") is None
        assert all(name == name.lower() for name, _ in response.headers)
        await response.aclose()  # the small body was already received whole: the connection is reusable
        await post(fake, client, "m")
        assert fake.accepts == 1

    run(scenario)


@pytest.mark.parametrize("wait", [True, False], ids=["closed-while-idle", "closed-as-we-send"])
def test_stale_pooled_connection_is_replaced(wait: bool) -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        await post(fake, client, "m")
        fake.close_connections()
        if wait:
            await wait_for(lambda: fake.open_connections == 0)
            await asyncio.sleep(0.01)
        assert json.loads(await post(fake, client, "m"))["model"] == "m"
        assert fake.accepts == 2

    run(scenario)


def test_reset_on_a_reused_connection_is_retried_once_only() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        await post(fake, client, "m")
        with pytest.raises(UpstreamError, match="upstream fake closed the connection"):
            await post(fake, client, "fail-reset")
        assert fake.accepts == 2  # the pooled one, then one fresh retry
        assert [json.loads(r.body)["model"] for r in fake.requests] == ["m", "fail-reset", "fail-reset"]

    run(scenario)


def test_reset_on_a_fresh_connection_is_not_retried() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        with pytest.raises(UpstreamError):
            await post(fake, client, "fail-reset")
        assert len(fake.requests) == 1

    run(scenario)


def test_chunked_body_is_read_whole_and_connection_reused() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        body = await post(fake, client, "m", stream=True)
        assert body.startswith(b"data: ") and body.endswith(b"data: [DONE]\n\n")
        await post(fake, client, "m", stream=True)
        assert fake.accepts == 1

    run(scenario)


async def _raw_server(response: bytes, accepted: list[int], *, hold: bool = False) -> asyncio.Server:
    """Answers each connection with ``response`` and closes it (``hold``: once the client closes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
            if hold:
                await reader.read()
        except ConnectionError:
            pass  # the client gave up on the answer, as some tests want it to
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("response", "body"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", b"ok"),
        (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx",
            b"x",
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["close-delimited", "http10", "interim-100", "no-content"],
)
def test_other_framings_and_no_reuse_after_close(response: bytes, body: bytes) -> None:
    async def main() -> None:
        accepted: list[int] = []
        server = await _raw_server(response, accepted)
        port = server.sockets[0].getsockname()[1]
        async with server, UpstreamClient() as client:
            for _ in range(2):
                answer = await client.request("GET", f"http://127.0.0.1:{port}/x", [], b"", timeout_s=5)
                assert await answer.read() == body
                await answer.aclose()
            assert len(accepted) == 2

    asyncio.run(main())


def test_body_far_above_the_pause_threshold_is_read_whole() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        body = await post(fake, client, "big-json", timeout_s=2)
        assert len(body) > 16 * HIGH_WATER
        content = json.loads(body)["choices"][0]["message"]["content"]
        assert content == BIG_JSON_CONTENT
        await post(fake, client, "m")
        assert fake.accepts == 1  # read to the end: the connection went back to the pool

    run(scenario)


def test_body_over_the_limit_is_refused() -> None:
    async def main() -> None:
        size = MAX_BODY + 1
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size
        server = await _raw_server(head + b"x" * size, [])
        port = server.sockets[0].getsockname()[1]
        async with server, UpstreamClient() as client:
            answer = await client.request(
                "GET", f"http://127.0.0.1:{port}/", [], b"", timeout_s=5, route="raw"
            )
            with pytest.raises(UpstreamError, match="upstream raw sent a body over 32 MiB") as info:
                await answer.read()
            assert info.value.status == 502
            await answer.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("finished", [True, False], ids=["in-one-read", "never-ending"])
def test_oversized_response_head_is_refused(finished: bool) -> None:
    head = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_HEAD + 1)
    if finished:
        head += b"\r\ncontent-length: 2\r\n\r\nok"

    async def main() -> None:
        server = await _raw_server(head, [], hold=True)
        port = server.sockets[0].getsockname()[1]
        async with server, UpstreamClient() as client:
            with pytest.raises(UpstreamError, match="upstream raw sent an oversized response head"):
                await client.request("GET", f"http://127.0.0.1:{port}/", [], b"", timeout_s=5, route="raw")

    asyncio.run(main())


def test_truncated_content_length_body_raises() -> None:
    async def main() -> None:
        server = await _raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", [])
        port = server.sockets[0].getsockname()[1]
        async with server, UpstreamClient() as client:
            answer = await client.request(
                "GET", f"http://127.0.0.1:{port}/", [], b"", timeout_s=5, route="raw"
            )
            with pytest.raises(UpstreamError, match="upstream raw closed the connection early"):
                await answer.read()
            await answer.aclose()

    asyncio.run(main())


def test_malformed_response_raises() -> None:
    async def main() -> None:
        server = await _raw_server(b"NOT HTTP AT ALL\r\n\r\n", [])
        port = server.sockets[0].getsockname()[1]
        async with server, UpstreamClient() as client:
            with pytest.raises(UpstreamError, match="malformed response"):
                await client.request("GET", f"http://127.0.0.1:{port}/", [], b"", timeout_s=5, route="raw")

    asyncio.run(main())


def test_stream_arrives_incrementally() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        response = await client.request(
            "POST", fake.base_url + "/v1/chat/completions", [], chat("slow-stream", stream=True), timeout_s=5
        )
        arrivals: list[float] = []
        chunks: list[bytes] = []
        async for chunk in response:
            arrivals.append(time.monotonic())
            chunks.append(chunk)
        await response.aclose()
        assert len(chunks) >= 5
        assert arrivals[-1] - arrivals[0] >= 0.2  # the first chunk came well before the stream ended
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
        await post(fake, client, "m")
        assert fake.accepts == 1

    run(scenario)


def test_refused_port_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        async with UpstreamClient() as client:
            with pytest.raises(UpstreamError, match="upstream openai unreachable") as info:
                await client.request(
                    "POST", f"http://127.0.0.1:{port}/v1", [], b"{}", timeout_s=5, route="openai"
                )
            assert info.value.status == 502

    asyncio.run(main())


def test_unknown_host_is_unreachable() -> None:
    async def main() -> None:
        async with UpstreamClient() as client:
            with pytest.raises(UpstreamError, match="unreachable"):
                await client.request("GET", "http://no-such-host.invalid/", [], b"", timeout_s=5)

    asyncio.run(main())


def test_no_answer_times_out() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"upstream fake did not answer within 0\.2 s") as info:
            await post(fake, client, "fail-timeout", timeout_s=0.2)
        assert info.value.status == 504
        assert 0.15 < time.monotonic() - started < 2
        await wait_for(lambda: fake.open_connections == 0)  # the hung connection was closed, not pooled

    run(scenario)


def test_midstream_drop_raises_from_the_iterator() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        response = await client.request(
            "POST",
            fake.base_url + "/v1/chat/completions",
            [],
            chat("fail-midstream", stream=True),
            timeout_s=5,
            route="fake",
        )
        received = b""
        with pytest.raises(UpstreamError, match="upstream fake closed the connection early"):
            async for chunk in response:
                received += chunk
        assert received.count(b"data: ") == 2
        await response.aclose()

    run(scenario)


def test_aclose_mid_stream_closes_the_upstream_socket() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        response = await client.request(
            "POST", fake.base_url + "/v1/chat/completions", [], chat("slow-stream", stream=True), timeout_s=5
        )
        assert (await response.__anext__()).startswith(b"data: ")
        assert fake.open_connections == 1
        await response.aclose()
        await wait_for(lambda: fake.open_connections == 0)
        await post(fake, client, "m")
        assert fake.accepts == 2

    run(scenario)


def test_slow_consumer_pauses_upstream_reading() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        response = await client.request(
            "POST", fake.base_url + "/v1/chat/completions", [], chat("big-stream", stream=True), timeout_s=5
        )
        conn = response._conn
        assert conn is not None
        await wait_for(lambda: conn.read_paused)
        assert HIGH_WATER < conn.buffered < 4 * HIGH_WATER
        body = b"".join([chunk async for chunk in response])
        assert not conn.read_paused
        assert body.count(b'"content":"tok "') == BIG_STREAM_CHUNKS
        await response.aclose()
        await post(fake, client, "m")
        assert fake.accepts == 1

    run(scenario)


def test_pool_caps_connections_per_origin() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        bodies = await asyncio.gather(*(post(fake, client, "slow-stream", stream=True) for _ in range(5)))
        assert all(body.endswith(b"[DONE]\n\n") for body in bodies)
        assert fake.accepts == 2

    run(scenario, max_per_origin=2)


def test_waiting_for_a_free_connection_times_out() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        hung = asyncio.ensure_future(post(fake, client, "fail-timeout", timeout_s=1))
        await wait_for(lambda: fake.accepts == 1)
        with pytest.raises(UpstreamTimeout, match="no free connection"):
            await post(fake, client, "m", timeout_s=0.1)
        with pytest.raises(UpstreamTimeout):
            await hung

    run(scenario, max_per_origin=1)


def test_idle_connections_expire() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        await post(fake, client, "m")
        assert fake.open_connections == 1
        await wait_for(lambda: fake.open_connections == 0)
        await post(fake, client, "m")
        assert fake.accepts == 2

    run(scenario, idle_timeout_s=0.05)


def test_aclose_closes_pooled_connections() -> None:
    async def main() -> None:
        async with FakeUpstream() as fake:
            client = UpstreamClient()
            await post(fake, client, "m")
            await post(fake, client, "m", stream=True)
            await client.aclose()
            await wait_for(lambda: fake.open_connections == 0)
            with pytest.raises(RuntimeError):
                await post(fake, client, "m")

    asyncio.run(main())


def test_cancelled_request_closes_its_connection() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        task = asyncio.ensure_future(post(fake, client, "fail-timeout"))
        await wait_for(lambda: len(fake.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: fake.open_connections == 0)

    run(scenario)


def test_header_injection_is_refused() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        with pytest.raises(UpstreamError, match="line break") as info:
            await client.request(
                "POST",
                fake.base_url + "/v1/chat/completions",
                [(b"authorization", b"Bearer sk-secret\r\nx-evil: 1")],
                b"{}",
                timeout_s=5,
            )
        assert "sk-secret" not in str(info.value)
        assert fake.requests == []

    run(scenario)


@pytest.mark.parametrize("url", ["ftp://x/", "/relative", "http://"])
def test_bad_urls_are_refused(url: str) -> None:
    async def main() -> None:
        async with UpstreamClient() as client:
            with pytest.raises(ValueError):
                await client.request("GET", url, [], b"", timeout_s=1)

    asyncio.run(main())


def test_server_dropping_every_idle_connection_costs_one_retry_only() -> None:
    async def scenario(fake: FakeUpstream, client: UpstreamClient) -> None:
        await asyncio.gather(*(post(fake, client, "slow-stream", stream=True) for _ in range(3)))
        assert fake.accepts == 3
        fake.close_connections()
        await post(fake, client, "m")  # the first pooled one is stale; the retry skips the other two
        assert fake.accepts == 4

    run(scenario)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert_path, key_path)

    async def main() -> None:
        async with FakeUpstream(tls=server_tls) as fake:
            assert fake.base_url.startswith("https://")
            async with UpstreamClient(ca_file=str(cert_path)) as client:
                for _ in range(2):
                    assert json.loads(await post(fake, client, "m"))["model"] == "m"
                assert b"data: [DONE]" in await post(fake, client, "m", stream=True)
                assert fake.accepts == 1
            async with UpstreamClient() as untrusting:
                with pytest.raises(UpstreamError, match="upstream fake failed the TLS handshake"):
                    await post(fake, untrusting, "m")

    asyncio.run(main())


def test_fake_fast_mode_records_nothing_and_answers_the_same() -> None:
    async def main() -> None:
        async with FakeUpstream(fast=True) as fast, FakeUpstream() as plain, UpstreamClient() as client:
            for stream in (False, True):
                answers = {await post(fast, client, "m", stream=stream) for _ in range(3)}
                assert answers == {await post(plain, client, "m", stream=stream)}
            assert fast.requests == [] and len(plain.requests) == 2

    asyncio.run(main())
