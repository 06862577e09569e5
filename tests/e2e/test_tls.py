"""End to end over TLS: the real OpenAI and Anthropic SDKs against the certificate `tls self-signed` made
(verified against it, and its fingerprint pinned), client certificates required for one role, and a
certificate rotated while a stream runs, without a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from click.testing import CliRunner

from appliance.cli import main
from tests.support.fake_answers import _LAST_CHUNK, _chunk, _head
from tests.support.fake_upstream import FakeUpstream, openai_answer
from tests.support.gateway import GatewayHarness, policy_doc
from tests.support.tls_certs import CertificateAuthority, client_context, name, pem, served_fingerprint

FINGERPRINT = re.compile(r"^fingerprint: (sha256:[0-9a-f]{64})$", re.M)
RADIOLOGY_CERT = "CN=radiology-bot,O=St Marys Hospital"


def self_signed(home: Path) -> str:
    """``phi-gateway tls self-signed`` for 127.0.0.1 and localhost; the fingerprint it printed."""
    result = CliRunner().invoke(
        main,
        ["tls", "self-signed", "--home", str(home), "--host", "127.0.0.1", "--host", "localhost"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    match = FINGERPRINT.search(result.stdout)
    assert match is not None, result.stdout
    return match.group(1)


class TlsGateway:
    """A ``GatewayHarness`` whose home holds a self-signed certificate: the port speaks TLS."""

    def __init__(self, root: Path, upstream: str, *, client_ca: bytes | None = None, **policy: Any) -> None:
        self.h = GatewayHarness(root)
        home = self.h.home.root
        self.fingerprint = self_signed(home)
        self.ca_file = root / "gateway-ca.pem"  # what a client is given: the certificate itself, public
        self.ca_file.write_bytes((home / "tls" / "cert.pem").read_bytes())
        settings = "\n[server.tls]\nreload_interval_s = 0.05\n"
        if client_ca is not None:
            (home / "clients-ca.pem").write_bytes(client_ca)
            settings += 'client_ca_file = "clients-ca.pem"\n'
        with open(home / "gateway.toml", "a") as toml:
            toml.write(settings)
        self.h.import_policy(policy_doc(upstream, **policy))
        self.h.set_provider_keys()
        self.h.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.h.port}"

    def http(self, client_cert: tuple[Path, Path] | None = None, cafile: Path | None = None) -> httpx2.Client:
        context = client_context(cafile or self.ca_file, client_cert)
        return httpx2.Client(verify=context, timeout=10)

    def openai(self, token: str, client_cert: tuple[Path, Path] | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=token, max_retries=0, http_client=self.http(client_cert)
        )

    def records(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in self.h.audit.records() if r["type"] != "admin"]
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.01)


@pytest.fixture
def gateway(tmp_path: Path, upstream: FakeUpstream) -> Iterator[TlsGateway]:
    gw = TlsGateway(tmp_path, upstream.base_url)
    yield gw
    gw.h.stop()


def test_sdks_over_https_verified_and_pinned(gateway: TlsGateway, upstream: FakeUpstream) -> None:
    token = gateway.h.issue("radiology-bot")
    assert served_fingerprint(gateway.h.port) == gateway.fingerprint, "the pin matches what tls printed"

    with gateway.openai(token) as client:
        reply = client.chat.completions.create(
            model="openai/gpt-4o", messages=[{"role": "user", "content": "two words"}]
        )
        assert reply.choices[0].message.content == "Hello from gpt-4o"
        stream = client.chat.completions.create(
            model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        ssl_object = stream.response.extensions["network_stream"].get_extra_info("ssl_object")
        der = ssl_object.getpeercert(True)
        assert "sha256:" + hashlib.sha256(der).hexdigest() == gateway.fingerprint  # the SDK's own connection
        assert ssl_object.version() == "TLSv1.3" and ssl_object.selected_alpn_protocol() == "http/1.1"
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "Hello from gpt-4o"

    with anthropic.Anthropic(
        base_url=gateway.url, api_key=token, max_retries=0, http_client=gateway.http()
    ) as claude:
        message = claude.messages.create(
            model="anthropic/claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hello"}],
        )
        assert message.content[0].type == "text" and "claude-sonnet-4-5" in message.content[0].text
        with claude.messages.stream(
            model="anthropic/claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hello"}],
        ) as streamed:
            assert "claude-sonnet-4-5" in "".join(streamed.text_stream)

    untrusting = openai.OpenAI(
        base_url=f"{gateway.url}/v1",
        api_key=token,
        max_retries=0,
        http_client=httpx2.Client(verify=ssl.create_default_context(), timeout=10),  # the system CAs only
    )
    with untrusting, pytest.raises(openai.APIConnectionError):
        untrusting.models.list()

    with gateway.http() as http:
        health = http.get(f"{gateway.url}/health").json()
    transport = health["transport"]
    assert transport["tls"] is True and transport["fingerprint"] == gateway.fingerprint
    assert transport["client_ca"] is False and 363 <= transport["days_left"] <= 365
    responses = [r for r in gateway.records(8) if r["type"] == "response"]
    assert len(responses) == 4 and all(r["client_cert"] is None for r in responses)
    assert len(upstream.requests) >= 4


def test_a_client_certificate_is_required_and_checked_for_one_role(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    ca = CertificateAuthority("St Marys Client CA")
    radiology = ca.issue(name("radiology-bot", "St Marys Hospital")).write(tmp_path, "radiology")
    intruder = ca.issue(name("intruder", "St Marys Hospital")).write(tmp_path, "intruder")
    stranger = CertificateAuthority("Not Our CA").issue(name("radiology-bot", "St Marys Hospital"))
    stranger_files = stranger.write(tmp_path, "stranger")
    doc = policy_doc(upstream.base_url)
    roles = doc["organizations"]["stmarys"]["roles"]
    roles["radiology"]["client_certificate"] = {"required": True, "subjects": [RADIOLOGY_CERT]}
    gateway = TlsGateway(
        tmp_path, upstream.base_url, client_ca=pem(ca.cert), organizations=doc["organizations"]
    )
    try:
        radiology_token = gateway.h.issue("radiology-bot")
        billing_token = gateway.h.issue("billing-bot", role="billing")
        sent = len(upstream.requests)
        chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

        with gateway.openai(radiology_token) as client, pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(**chat)  # type: ignore[call-overload]
        assert (
            isinstance(denied.value.body, dict) and denied.value.body["code"] == "client_certificate_required"
        )
        with (
            gateway.openai(radiology_token, intruder) as client,
            pytest.raises(openai.PermissionDeniedError) as no,
        ):
            client.chat.completions.create(**chat)  # type: ignore[call-overload]
        assert isinstance(no.value.body, dict) and no.value.body["code"] == "client_certificate_not_allowed"
        assert len(upstream.requests) == sent, "nothing was forwarded"

        with gateway.openai(radiology_token, radiology) as client:
            assert client.chat.completions.create(**chat).choices[0].message.content  # type: ignore[call-overload]
        with gateway.openai(billing_token) as client:  # no rule for billing: no certificate needed
            assert client.chat.completions.create(**chat).choices[0].message.content  # type: ignore[call-overload]
        with (
            gateway.openai(billing_token, stranger_files) as client,
            pytest.raises(openai.APIConnectionError),
        ):
            client.models.list()  # a certificate that is presented must verify: the handshake fails

        records = gateway.records(6)
        refusals = [r for r in records if r["decision"] == "denied"]
        assert [r["detail"] for r in refusals] == [
            "client_certificate_required",
            "client_certificate_not_allowed",
        ]
        assert all(r["status_code"] == 403 and r["intervention"] == "policy_denied" for r in refusals)
        assert refusals[0]["rule"] == "organizations.stmarys.roles.radiology.client_certificate"
        # each refusal's X-Request-Id names its ledger record
        answered = [denied.value.response.headers["x-request-id"], no.value.response.headers["x-request-id"]]
        assert answered == [r["request_id"] for r in refusals]
        assert (
            refusals[0]["client_cert"] is None
            and refusals[1]["client_cert"] == "CN=intruder,O=St Marys Hospital"
        )
        admitted = [r for r in records if r["claw_id"] == "radiology-bot" and r["decision"] == "allowed"]
        assert [r["type"] for r in admitted] == ["request", "response"]
        expected = hashlib.sha256(_der(radiology[0])).hexdigest()
        assert all(
            r["client_cert"] == RADIOLOGY_CERT and r["client_cert_sha256"] == expected for r in admitted
        )
        billing = [r for r in records if r["claw_id"] == "billing-bot"]
        assert billing and all(r["client_cert"] is None for r in billing)

        # The organization's rule covers the roles without their own; the role's own rule takes precedence.
        doc["organizations"]["stmarys"]["client_certificate"] = {"required": True}
        gateway.h.import_policy(policy_doc(upstream.base_url, version=2, organizations=doc["organizations"]))
        _wait_for_policy(gateway, 2)
        with gateway.openai(billing_token) as client, pytest.raises(openai.PermissionDeniedError) as org_rule:
            client.models.list()
        assert (
            isinstance(org_rule.value.body, dict)
            and org_rule.value.body["code"] == "client_certificate_required"
        )
        with gateway.openai(billing_token, intruder) as client:  # any certificate of the client CA will do
            assert client.models.list().data
        with gateway.openai(radiology_token, radiology) as client:
            assert client.models.list().data
        last = gateway.records(9)  # 6 before, a refusal and two listings since
        assert len(last) == 9 and last[6]["rule"] == "organizations.stmarys.client_certificate"
    finally:
        gateway.h.stop()


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _wait_for_policy(gateway: TlsGateway, version: int) -> None:
    deadline = time.monotonic() + 5
    with gateway.http() as http:
        while http.get(f"{gateway.url}/health").json()["policy"]["version"] != version:
            assert time.monotonic() < deadline, "the new policy was not picked up"
            time.sleep(0.05)


MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_required_certificate_without_a_client_ca_is_refused_with_the_setting_named(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """... on every endpoint, and ``policy explain`` decides the same (the engine decides both)."""
    doc = policy_doc(upstream.base_url)
    doc["organizations"]["stmarys"]["roles"]["radiology"]["client_certificate"] = {"required": True}
    h = GatewayHarness(tmp_path)
    h.import_policy(doc)
    h.set_provider_keys()
    h.start()  # plain HTTP on loopback: no client can present a certificate
    try:
        token = h.issue("radiology-bot")
        with openai.OpenAI(base_url=h.base_url, api_key=token, max_retries=0, timeout=10) as client:
            with pytest.raises(openai.PermissionDeniedError) as denied:
                client.models.list()
            with pytest.raises(openai.PermissionDeniedError) as refused:
                client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert (
            isinstance(denied.value.body, dict) and denied.value.body["code"] == "client_certificate_required"
        )
        assert "server.tls.client_ca_file" in denied.value.body["message"]
        args = ["policy", "explain", "--home", str(h.home.root), "--caller", "radiology-bot"]
        explained = CliRunner().invoke(main, [*args, "--model", "openai/gpt-4o", "--json"])
        document = json.loads(explained.stdout)
        assert document["decision"] == "denied"
        assert document["reason"] == refused.value.body["code"] == "client_certificate_required"  # type: ignore[index]
        assert "server.tls.client_ca_file" in document["message"]
    finally:
        h.stop()


class HeldStreamUpstream(FakeUpstream):
    """The fake provider, plus model ``held-stream``: its first SSE event at once, the rest only when the
    test releases it (a long generation, as long as the test needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.first_sent = threading.Event()
        self.release = threading.Event()

    def dispatch(
        self, conn: Any, method: bytes, url: bytes, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        req = json.loads(body) if body else {}
        if req.get("model") != "held-stream":
            super().dispatch(conn, method, url, headers, body, keep_alive)
            return
        _, events = openai_answer(req)
        conn.run(self._held(conn, events, keep_alive))

    async def _held(self, conn: Any, events: list[bytes], keep_alive: bool) -> None:
        conn.write(_head(200, b"text/event-stream", length=None, close=not keep_alive) + _chunk(events[0]))
        self.first_sent.set()
        await asyncio.to_thread(self.release.wait, 30)
        conn.write(b"".join(_chunk(event) for event in events[1:]) + _LAST_CHUNK, keep_alive=keep_alive)


def test_certificate_rotation_while_a_stream_runs(tmp_path: Path) -> None:
    held = HeldStreamUpstream()
    held.start_in_thread()
    doc = policy_doc(held.base_url)
    doc["routes"]["openai"]["timeout_s"] = 30  # the stream waits for the test between its events
    gateway = TlsGateway(tmp_path, held.base_url, routes=doc["routes"])
    try:
        token = gateway.h.issue("radiology-bot")
        old_ca, first = gateway.ca_file, gateway.fingerprint
        server = gateway.h.gateway
        assert server is not None and server.server is not None
        listener = server.server

        with gateway.openai(token) as client:
            stream = client.chat.completions.create(
                model="openai/held-stream",
                messages=[{"role": "user", "content": "a long answer"}],
                stream=True,
            )
            chunks = iter(stream)
            received = [next(chunks)]
            assert held.first_sent.wait(5)

            second = self_signed(gateway.h.home.root)  # the operator rotates: no restart, no reload verb
            assert second != first
            new_ca = tmp_path / "gateway-ca-2.pem"
            new_ca.write_bytes((gateway.h.home.root / "tls" / "cert.pem").read_bytes())
            deadline = time.monotonic() + 5
            while served_fingerprint(gateway.h.port) != second:
                assert time.monotonic() < deadline, "new connections did not get the new certificate"
                time.sleep(0.02)
            with gateway.http(cafile=new_ca) as http:
                assert http.get(f"{gateway.url}/health").json()["transport"]["fingerprint"] == second
            with gateway.openai(token) as stale, pytest.raises(openai.APIConnectionError):
                stale.models.list()  # trusts the old certificate only: a new connection now fails, as it must

            ssl_object = stream.response.extensions["network_stream"].get_extra_info("ssl_object")
            old_der = ssl_object.getpeercert(True)
            assert "sha256:" + hashlib.sha256(old_der).hexdigest() == first, (
                "its connection keeps the old one"
            )
            held.release.set()  # the running stream, on its old connection, completes
            received += list(chunks)
        text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
        assert text == "Hello from held-stream"
        assert gateway.h.gateway is server and server.server is listener and gateway.h.port == listener.port
        fresh = openai.OpenAI(
            base_url=f"{gateway.url}/v1",
            api_key=token,
            max_retries=0,
            http_client=gateway.http(cafile=new_ca),
        )
        with fresh:
            assert fresh.models.list().data
        assert old_ca.exists()
        responses = [r for r in gateway.records(3) if r["type"] == "response"]
        assert responses and responses[0]["status_code"] == 200 and responses[0]["tokens_out"] == 4
    finally:
        gateway.h.stop()
        held.stop_thread()


def test_policy_explain_reads_the_subject_as_the_gateway_does(tmp_path: Path, upstream: FakeUpstream) -> None:
    doc = policy_doc(upstream.base_url)
    rule = {"required": True, "subjects": ["CN=radiology-bot,O=St Marys"]}
    doc["organizations"]["stmarys"]["roles"]["radiology"]["client_certificate"] = rule
    doc["organizations"]["stmarys"]["client_certificate"] = {"required": True}
    h = GatewayHarness(tmp_path)
    h.import_policy(doc)
    explain_args = ["policy", "explain", "--home", str(h.home.root), "--model", "openai/gpt-4o"]

    def explain(*args: str) -> dict[str, Any]:
        done = CliRunner().invoke(main, [*explain_args, *args])
        assert done.exit_code == 0, done.output
        return json.loads(done.output)  # type: ignore[no-any-return]

    radiology = ("--org", "stmarys", "--role", "radiology", "--json")
    # no client CA on this gateway: no certificate can ever be presented, whatever explain is told
    assert explain(*radiology, "--client-cert", "CN=radiology-bot,O=St Marys")["reason"] == (
        "client_certificate_required"
    )
    with (h.home.root / "gateway.toml").open("a", encoding="utf-8") as settings:
        settings.write('\n[server.tls]\nclient_ca_file = "tls/client-ca.pem"\n')
    for spelling in (
        "CN=radiology-bot,O=St Marys",
        "cn=radiology-bot,o=St Marys",
        "CN=radiology-bot,O=St\\20Marys",
    ):
        assert explain(*radiology, "--client-cert", spelling)["decision"] == "allowed", spelling
    refused = CliRunner().invoke(main, [*explain_args, *radiology, "--client-cert", "radiology-bot"])
    assert refused.exit_code == 1 and "--client-cert" in refused.output
    # a role the policy lacks is refused for that reason, as the gateway's role check does
    assert explain("--org", "stmarys", "--role", "nobody", "--json")["reason"] == "unknown_role"
