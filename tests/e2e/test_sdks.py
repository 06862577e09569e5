"""End to end: the real OpenAI and Anthropic SDKs against a running gateway and a fake cloud provider."""

from __future__ import annotations

import anthropic
import openai
import pytest

from appliance.policy.engine import unnamed
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import PROVIDER_KEYS, GatewayHarness


def _openai(h: GatewayHarness, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=h.base_url, api_key=token, max_retries=0, timeout=10)


def _anthropic(h: GatewayHarness, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{h.port}", api_key=token, max_retries=0, timeout=10
    )


def _last_upstream_request(upstream: FakeUpstream) -> tuple[str, str, dict[str, str], bytes]:
    return upstream.requests[-1]


def test_chat_completion_through_the_gateway(harness: GatewayHarness, upstream: FakeUpstream) -> None:
    token = harness.issue("radiology-bot")
    with _openai(harness, token) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="openai/gpt-4o", messages=[{"role": "user", "content": "two words"}]
        )
        reply = raw.parse()
    assert reply.choices[0].message.content == "Hello from gpt-4o"
    assert reply.usage is not None and reply.usage.completion_tokens == 4

    _, path, headers, body = _last_upstream_request(upstream)
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == f"Bearer {PROVIDER_KEYS['openai']}"
    assert token not in str(headers) and token.encode() not in body
    assert b'"model":"gpt-4o"' in body.replace(b" ", b"")

    request_id = raw.headers.get("x-request-id")
    records = _wait_records(harness, 2)
    kinds = [r["type"] for r in records if r["claw_id"] == "radiology-bot"]
    assert kinds == ["request", "response"]
    response = records[-1]
    assert response["model"] == "openai/gpt-4o" and response["route"] == "openai"
    assert response["status_code"] == 200 and response["tokens_out"] == 4 and response["tokens_in"] == 2
    assert response["cost_usd"] == pytest.approx((2 * 2.5 + 4 * 10.0) / 1e6)
    assert (
        response["org"] == "stmarys" and response["role"] == "radiology" and response["policy_version"] == 1
    )
    assert request_id is None or response["request_id"] == request_id


def test_streaming_chat_completion(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    with _openai(harness, token) as client:
        stream = client.chat.completions.create(
            model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from gpt-4o"
    assert all(c.usage is None for c in chunks), (
        "the usage chunk the gateway asked for is not shown uninvited"
    )
    response = _wait_records(harness, 2)[-1]
    assert response["type"] == "response" and response["tokens_out"] == 4


def test_streaming_with_usage_requested(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    with _openai(harness, token) as client:
        chunks = list(
            client.chat.completions.create(
                model="openai/gpt-4o-mini",
                messages=[{"role": "user", "content": "count me"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 4


def test_models_lists_only_what_the_role_may_use(harness: GatewayHarness) -> None:
    billing = harness.issue("billing-bot", role="billing")
    radiology = harness.issue("radiology-bot")
    with _openai(harness, billing) as client:
        assert [m.id for m in client.models.list()] == ["openai/gpt-4o-mini"]
    with _openai(harness, radiology) as client:
        ids = [m.id for m in client.models.list()]
    assert "openai/gpt-4o" in ids and "anthropic/claude-sonnet-4-5" in ids


def test_anthropic_sdk_messages_passthrough(harness: GatewayHarness, upstream: FakeUpstream) -> None:
    token = harness.issue("radiology-bot")
    with _anthropic(harness, token) as client:
        message = client.messages.create(
            model="anthropic/claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hello"}],
        )
        assert message.content[0].type == "text" and "claude-sonnet-4-5" in message.content[0].text
        _, path, headers, _ = _last_upstream_request(upstream)
        assert path == "/v1/messages" and headers["x-api-key"] == PROVIDER_KEYS["anthropic"]
        assert "authorization" not in headers
        with client.messages.stream(
            model="anthropic/claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hello"}],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert "claude-sonnet-4-5" in text and final.usage.output_tokens > 0
    responses = [r for r in _wait_records(harness, 4) if r["type"] == "response"]
    assert len(responses) == 2 and all(r["route"] == "anthropic" and r["tokens_out"] > 0 for r in responses)


def test_openai_sdk_to_an_anthropic_route_is_translated(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    with _openai(harness, token) as client:
        reply = client.chat.completions.create(
            model="anthropic/claude-sonnet-4-5",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        )
        assert "claude-sonnet-4-5" in (reply.choices[0].message.content or "")
        assert reply.choices[0].finish_reason == "stop"
        chunks = list(
            client.chat.completions.create(
                model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    assert "claude-sonnet-4-5" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_policy_denies_a_model_outside_the_role(harness: GatewayHarness, upstream: FakeUpstream) -> None:
    token = harness.issue("billing-bot", role="billing")
    before = len(upstream.requests)
    with _openai(harness, token) as client, pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 403
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_allowed"
    assert len(upstream.requests) == before, "nothing was forwarded"
    record = _wait_records(harness, 1)[-1]
    assert record["type"] == "intervention" and record["intervention"] == "policy_denied"
    assert record["status_code"] == 403 and record["claw_id"] == "billing-bot"


def test_unknown_provider_and_bad_model_names(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    pasted = "Patient Jane Roe, DOB 1950-01-01, MRN 123456: summarise"
    with _openai(harness, token) as client:
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="mistral/large", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model=pasted, messages=[{"role": "user", "content": "x"}])
    records = _wait_records(harness, 3)
    # None of these is a name the policy defines: caller text, so the ledger keeps length and digest only.
    assert records[0]["model"] == unnamed("mistral/large")
    assert records[1]["model"].startswith("[model not named by the policy: 6 chars, sha256:")
    assert records[2]["model"].startswith("[model not named by the policy: 55 chars, sha256:")
    assert "Jane" not in harness.audit.text


def test_identity_failures_are_401_or_403_without_saying_why(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    caller, secret = token.split(":")
    wrong = f"{caller}:{'0' * 48}"
    with _openai(harness, "not-a-token") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    messages = []
    for bad in (wrong, f"nobody:{secret}"):
        with _openai(harness, bad) as client, pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}])
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert all(secret not in m and "0" * 48 not in m for m in messages)


def test_revocation_takes_effect_on_the_next_request(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    with _openai(harness, token) as client:
        client.models.list()
        assert harness.revoke("radiology-bot") == 1
        with pytest.raises(openai.PermissionDeniedError):
            client.models.list()


def test_upstream_failures_give_clean_errors_and_error_records(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    expected = {
        "fail-500": openai.InternalServerError,  # 502 from the gateway
        "fail-reset": openai.InternalServerError,
        "fail-timeout": openai.InternalServerError,  # 504
        "fail-401": openai.InternalServerError,  # the provider key was refused: 502, never forwarded
        "fail-429": openai.RateLimitError,
        "fail-400": openai.BadRequestError,
    }
    with _openai(harness, token) as client:
        for model, error in expected.items():
            with pytest.raises(error) as err:
                client.chat.completions.create(
                    model=f"openai/{model}", messages=[{"role": "user", "content": "x"}]
                )
            assert PROVIDER_KEYS["openai"] not in str(err.value.body)
            assert "fake-key" not in str(err.value.body)
    statuses = {r["model"]: r["status_code"] for r in _wait_records(harness, 12) if r["type"] == "error"}
    # openai/* allows these names, but the policy does not name them: the ledger has their digests.
    assert statuses == {
        unnamed("openai/fail-500"): 502,
        unnamed("openai/fail-reset"): 502,
        unnamed("openai/fail-timeout"): 504,
        unnamed("openai/fail-401"): 502,
        unnamed("openai/fail-429"): 429,
    }
    outcomes = [
        r
        for r in harness.audit.records()
        if r["model"] == unnamed("openai/fail-400") and r["type"] == "response"
    ]
    assert outcomes and outcomes[0]["status_code"] == 400


def test_midstream_upstream_drop_ends_the_stream_with_an_error(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    with _openai(harness, token) as client, pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="openai/fail-midstream", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            pass
    errors = [r for r in _wait_records(harness, 2) if r["type"] == "error"]
    assert errors and errors[-1]["status_code"] == 502


def _wait_records(h: GatewayHarness, count: int, timeout: float = 5.0) -> list[dict[str, object]]:
    """Outcome records are queued after the answer: wait until ``count`` API records are printed."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in h.audit.records() if r["type"] != "admin"]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.01)


def test_completions_and_embeddings_pass_through_to_openai_routes(
    harness: GatewayHarness, upstream: FakeUpstream
) -> None:
    token = harness.issue("radiology-bot")
    with _openai(harness, token) as client:
        completion = client.completions.create(model="openai/gpt-3.5-turbo-instruct", prompt="say hi")
        assert completion.choices[0].text == "Hello from gpt-3.5-turbo-instruct"
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="openai/gpt-3.5-turbo-instruct", prompt="hi", stream=True
            )
            if c.choices
        )
        assert streamed == "Hello from gpt-3.5-turbo-instruct"
        vectors = client.embeddings.create(model="openai/text-embedding-3-small", input=["one two", "three"])
        assert [v.embedding for v in vectors.data] == [[0.25, -0.5, 0.125]] * 2
        assert upstream.requests[-1][1] == "/v1/embeddings"
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="anthropic/claude-sonnet-4-5", input="x")
    responses = [r for r in _wait_records(harness, 8) if r["type"] == "response"]
    assert [r["tokens_in"] for r in responses][-1] == 3  # the embedding's prompt tokens, as reported
