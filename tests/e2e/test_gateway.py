"""End to end: fail-closed behaviour, policy hot swap, HTTP limits at the gateway, and no secret anywhere."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from appliance.http.limits import HttpLimits
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import PROVIDER_KEYS, GatewayHarness, policy_doc


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_no_policy_fails_closed_and_health_says_so(tmp_path: Path) -> None:
    h = GatewayHarness(tmp_path)
    token = h.issue("radiology-bot")
    root = h.start()
    try:
        status, doc = _get(f"{root}/health")
        assert status == 503 and doc["status"] == "refusing" and doc["policy"]["in_force"] is False
        status, doc = _get(f"{root}/v1/models", token)
        assert status == 503 and doc["error"]["code"] == "no_policy"
        assert set(doc["error"]) >= {"message", "type", "code"}
    finally:
        h.stop()


def test_policy_import_swaps_while_serving(tmp_path: Path, upstream: FakeUpstream) -> None:
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    h.set_provider_keys()
    token = h.issue("billing-bot", role="billing")
    root = h.start()
    try:
        assert _get(f"{root}/v1/models", token)[1]["data"][0]["id"] == "openai/gpt-4o-mini"
        doc = policy_doc(upstream.base_url, version=2)
        doc["organizations"]["stmarys"]["roles"]["billing"]["models"] = [
            "openai/gpt-4o",
            "openai/gpt-4o-mini",
        ]
        h.import_policy(doc)
        _until(lambda: len(_get(f"{root}/v1/models", token)[1]["data"]) == 2)
        assert _get(f"{root}/health")[1]["policy"]["version"] == 2
    finally:
        h.stop()


def test_removing_the_trusted_key_fails_closed(tmp_path: Path, upstream: FakeUpstream) -> None:
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    token = h.issue("radiology-bot")
    root = h.start()
    try:
        assert _get(f"{root}/v1/models", token)[0] == 200
        trust = h.home.trust()
        for keyid in list(trust.keys):
            trust.remove(keyid)
        trust.save()
        _until(lambda: _get(f"{root}/v1/models", token)[0] == 503)
    finally:
        h.stop()


def test_unreadable_trust_file_fails_closed(tmp_path: Path, upstream: FakeUpstream) -> None:
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    token = h.issue("radiology-bot")
    root = h.start()
    try:
        assert _get(f"{root}/v1/models", token)[0] == 200
        h.home.trust_path.write_text("{ this is not json")
        _until(lambda: _get(f"{root}/v1/models", token)[0] == 503)
        assert "cannot be loaded" in _get(f"{root}/health")[1]["policy"]["reason"]
    finally:
        h.stop()


def test_ledger_failure_refuses_traffic_then_recovers(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    raw = sqlite3.connect(harness.home.vault_path)
    raw.execute("CREATE TRIGGER jam BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    raw.commit()
    try:
        with openai.OpenAI(base_url=harness.base_url, api_key=token, max_retries=0, timeout=10) as client:
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(
                    model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
            assert err.value.status_code == 503
            raw.execute("DROP TRIGGER jam")
            raw.commit()
            reply = client.chat.completions.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
            assert reply.choices[0].message.content
    finally:
        raw.close()


def test_http_limits_answer_at_the_gateway_and_are_recorded(tmp_path: Path, upstream: FakeUpstream) -> None:
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    h.start(limits=HttpLimits(max_body_bytes=1024, max_header_bytes=2048))
    try:
        with socket.create_connection(("127.0.0.1", h.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413")
        with socket.create_connection(("127.0.0.1", h.port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 431")
        # Neither request has a caller: the first of the window is recorded, the second counted.
        _until(lambda: 413 in {r.get("status_code") for r in h.audit.records()})
    finally:
        h.stop()
    counted = [r for r in h.audit.records() if r.get("intervention") == "flood_sampled"]
    assert len(counted) == 1 and "(431: 1)" in counted[0]["detail"]


def test_unknown_endpoint_and_method(harness: GatewayHarness) -> None:
    root = f"http://127.0.0.1:{harness.port}"
    assert _get(f"{root}/v2/nothing")[0] == 404
    status, doc = _get(f"{root}/v1/chat/completions")
    assert status == 405 and doc["error"]["type"] == "invalid_request_error"
    # No token: the first refusal of the window is recorded in full, the second counted at its end.
    _until(lambda: "unknown_endpoint" in {r.get("detail") for r in harness.audit.records()})
    _until(lambda: any("(405: 1)" in (r.get("detail") or "") for r in harness.audit.records()))


def test_bad_json_is_a_clean_400_and_recorded(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    req = urllib.request.Request(
        f"http://127.0.0.1:{harness.port}/v1/chat/completions",
        data=b"{not json",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    with err.value as resp:
        assert resp.code == 400 and json.loads(resp.read())["error"]["code"] == "invalid_json"
    _until(lambda: any(r.get("detail") == "invalid_json" for r in harness.audit.records()))


def test_no_secret_in_logs_records_or_errors(
    harness: GatewayHarness, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    token = harness.issue("radiology-bot")
    wrong = token[:-6] + "abcdef"
    bodies: list[str] = []
    with openai.OpenAI(base_url=harness.base_url, api_key=token, max_retries=0, timeout=10) as client:
        client.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}])
        list(
            client.chat.completions.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
        for model in ("openai/fail-401", "openai/fail-500", "openai/fail-midstream", "anthropic/fail-401"):
            try:
                result = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "x"}],
                    stream=model.endswith("midstream"),
                )
                if model.endswith("midstream"):
                    list(result)  # type: ignore[arg-type]
            except openai.APIError as exc:
                bodies.append(json.dumps(getattr(exc, "body", None)) + str(exc))
    with openai.OpenAI(base_url=harness.base_url, api_key=wrong, max_retries=0, timeout=10) as client:
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.models.list()
        bodies.append(json.dumps(err.value.body) + str(err.value))
    time.sleep(0.2)
    harness.stop()
    out, errout = capfd.readouterr()
    ledger = json.dumps(list(harness.ledger_rows()))
    vault_bytes = harness.home.vault_path.read_bytes()
    haystacks = {
        "logs": caplog.text + out + errout,
        "audit lines": harness.audit.text,
        "ledger rows": ledger,
        "error bodies": "\n".join(bodies),
    }
    secrets = [token, token.split(":")[1], wrong.split(":")[1], *PROVIDER_KEYS.values()]
    for name, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {name}"
    for secret in secrets:
        assert secret.encode() not in vault_bytes, "the vault file holds a secret in clear"
    assert len(bodies) >= 4


def test_client_leaving_a_non_streaming_call_stops_it_and_is_recorded(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    with openai.OpenAI(base_url=harness.base_url, api_key=token, max_retries=0, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(
                model="openai/fail-timeout", messages=[{"role": "user", "content": "x"}]
            )
    _until(lambda: any(r.get("detail") == "client_closed" for r in harness.audit.records()), timeout=1.5)
    outcome = next(r for r in harness.audit.records() if r.get("detail") == "client_closed")
    assert (
        outcome["type"] == "response" and outcome["status_code"] == 499
    )  # long before the 2 s upstream timeout


def test_shutdown_past_the_drain_timeout_still_records_the_outcome(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    import threading

    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    h.set_provider_keys()
    token = h.issue("radiology-bot")
    h.start(limits=HttpLimits(drain_timeout_s=0.2))

    def call() -> None:
        with openai.OpenAI(base_url=h.base_url, api_key=token, max_retries=0, timeout=5) as client:
            with pytest.raises(openai.APIError):
                client.chat.completions.create(
                    model="openai/fail-timeout", messages=[{"role": "user", "content": "x"}]
                )

    caller = threading.Thread(target=call)
    caller.start()
    _until(lambda: any(r["type"] == "request" for r in h.audit.records()))
    h.stop()
    caller.join(10)
    outcomes = [r for r in h.ledger_rows() if r["type"] == "error"]
    assert [(r["status_code"], r["detail"]) for r in outcomes] == [(503, "shutdown")]


def test_anthropic_sdk_sees_a_midstream_failure(harness: GatewayHarness) -> None:
    import anthropic

    token = harness.issue("radiology-bot")
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{harness.port}", api_key=token, max_retries=0, timeout=10
    )
    with client, pytest.raises(anthropic.APIError):
        with client.messages.stream(
            model="anthropic/fail-midstream", max_tokens=32, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            for _ in stream:
                pass
    _until(lambda: any(r["type"] == "error" and r["status_code"] == 502 for r in harness.audit.records()))


def test_admin_socket_status_and_reload(harness: GatewayHarness) -> None:
    from click.testing import CliRunner

    from appliance.admin.client import AdminClient
    from appliance.cli import main

    socket_path = harness.home.admin_socket
    assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
    status = AdminClient(socket_path).call("GET", "/admin/status")
    assert status["policy"]["version"] == 1 and status["ledger"]["writable"] is True
    reloaded = CliRunner().invoke(main, ["policy", "reload", "--home", str(harness.home.root)])
    assert reloaded.exit_code == 0 and "policy v1 in force" in reloaded.output
    shown = CliRunner().invoke(main, ["status", "--home", str(harness.home.root)])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["site"] == "test-site"
    _until(lambda: any(r.get("detail") == "policy_reload via admin socket" for r in harness.audit.records()))


def test_operator_verbs_say_when_no_gateway_runs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from appliance.cli import main

    h = GatewayHarness(tmp_path)
    result = CliRunner().invoke(main, ["status", "--home", str(h.home.root)])
    assert result.exit_code == 1 and "no gateway is running" in result.output
