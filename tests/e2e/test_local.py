"""End to end: the real OpenAI SDK against local/ routes served in-process by llama.cpp (generated models)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.config import LocalSettings
from local_models.json_schema import validate_against
from local_models.tiny import write_tiny_model
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc


def _local_doc(
    upstream: FakeUpstream,
    models: dict[str, tuple[Path, str]],
    slots: dict[str, int] | None = None,
    **pins: str,
) -> dict[str, Any]:
    doc = policy_doc(upstream.base_url)
    doc["models"] = {
        f"local/{name}": {"file": path.name, "sha256": pins.get(name, sha), "n_ctx": 512}
        for name, (path, sha) in models.items()
    }
    for name, count in (slots or {}).items():
        doc["models"][f"local/{name}"]["slots"] = count
    doc["organizations"]["stmarys"]["roles"]["radiology"]["models"].append("local/*")
    doc["pricing"]["local/tiny"] = {"input_per_mtok": 0.0, "output_per_mtok": 0.0}
    return doc


def _start(
    tmp_path: Path, upstream: FakeUpstream, models: dict[str, tuple[Path, str]], **kwargs: Any
) -> GatewayHarness:
    h = GatewayHarness(tmp_path)
    for path, _ in models.values():
        shutil.copy(path, h.home.models_dir / path.name)
    h.import_policy(_local_doc(upstream, models, kwargs.pop("slots", None), **kwargs.pop("pins", {})))
    h.start(**kwargs)
    return h


@pytest.fixture
def local(
    tmp_path: Path, upstream: FakeUpstream, tiny_models: dict[str, tuple[Path, str]]
) -> Iterator[GatewayHarness]:
    h = _start(tmp_path, upstream, tiny_models)
    yield h
    h.stop()


def _client(h: GatewayHarness, token: str, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=h.base_url, api_key=token, max_retries=0, timeout=timeout)


def _records(h: GatewayHarness, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in h.audit.records() if r["type"] in ("response", "error")]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_chat_stream_and_not_with_exact_usage(local: GatewayHarness) -> None:
    token = local.issue("radiology-bot")
    with _client(local, token) as client:
        reply = client.chat.completions.create(
            model="local/tiny",
            messages=[{"role": "user", "content": "Summarise the note."}],
            max_tokens=8,
            seed=1,
        )
        assert reply.choices[0].message.role == "assistant" and reply.usage is not None
        assert 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model="local/tiny",
                messages=[{"role": "user", "content": "Summarise the note."}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and 0 < usage[0].completion_tokens <= 8
    records = _records(local, 2)
    assert [r["tokens_out"] for r in records] == [reply.usage.completion_tokens, usage[0].completion_tokens]
    assert all(r["route"] == "local" and r["detail"] is None and r["cost_usd"] == 0.0 for r in records)


def test_completions_and_embeddings(local: GatewayHarness) -> None:
    token = local.issue("radiology-bot")
    with _client(local, token) as client:
        completion = client.completions.create(model="local/tiny", prompt="The patient", max_tokens=6)
        assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 6
        streamed = list(
            client.completions.create(model="local/tiny", prompt="The patient", max_tokens=6, stream=True)
        )
        assert streamed and all(c.object == "text_completion" for c in streamed)
        vectors = client.embeddings.create(model="local/tiny", input=["chest x-ray", "no acute findings"])
        floats = client.embeddings.create(model="local/tiny", input="x", encoding_format="float")
    assert [len(v.embedding) for v in vectors.data] == [64, 64]
    assert len(floats.data[0].embedding) == 64 and vectors.usage.prompt_tokens > 0


def test_json_schema_output_validates(local: GatewayHarness) -> None:
    schema = {
        "type": "object",
        "properties": {"urgent": {"type": "boolean"}, "site": {"type": "string", "enum": ["chest", "head"]}},
        "required": ["urgent", "site"],
        "additionalProperties": False,
    }
    token = local.issue("radiology-bot")
    with _client(local, token) as client:
        reply = client.chat.completions.create(
            model="local/tiny",
            messages=[{"role": "user", "content": "Classify."}],
            max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "triage", "schema": schema}},
        )
    value = json.loads(reply.choices[0].message.content or "")
    assert validate_against(schema, value) == []


def test_client_closing_a_stream_stops_generation(local: GatewayHarness) -> None:
    token = local.issue("radiology-bot")
    with _client(local, token) as client:
        stream = client.chat.completions.create(
            model="local/tiny", messages=[{"role": "user", "content": "Go on."}], max_tokens=400, stream=True
        )
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
    record = next(r for r in _records(local, 1) if r["model"] == "local/tiny")
    assert record["detail"] == "client_closed" and record["tokens_in"] > 0
    assert 0 < record["tokens_out"] < 200  # counted, and stopped long before max_tokens
    _until_idle(local)


def _until_idle(h: GatewayHarness, model: str = "local/tiny") -> None:
    from appliance.admin.client import AdminClient

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = AdminClient(h.home.admin_socket).call("GET", "/admin/status")["local_models"][model]
        if not row.get("active") and not row.get("queue_depth"):
            return
        time.sleep(0.02)
    raise AssertionError("the model is still busy: the generation did not stop")


def test_queue_full_is_429_with_retry_after(
    tmp_path: Path, upstream: FakeUpstream, tiny_models: dict[str, tuple[Path, str]]
) -> None:
    # The ~34M-parameter model: its 400 tokens take over a second, so the first request is surely still
    # running (the tiny model would finish into the socket buffers before the test could look).
    big = tmp_path / "models" / "big.gguf"
    big.parent.mkdir()
    models = {**tiny_models, "big": (big, write_tiny_model(big, size="bench"))}
    h = _start(tmp_path, upstream, models, local=LocalSettings(queue_size=1), slots={"big": 1})
    token = h.issue("radiology-bot")
    try:
        long = {"model": "local/big", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400}
        with _client(h, token) as client:
            first = client.chat.completions.create(**long, stream=True)  # type: ignore[call-overload]
            next(iter(first))  # running now
            waiting = threading.Thread(target=lambda: _quietly(h, token, long), daemon=True)
            waiting.start()
            _until_queued(h)
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(**long)  # type: ignore[call-overload]
            assert err.value.response.headers.get("retry-after")
            first.close()
        waiting.join(10)
        _until_idle(h, "local/big")  # the queued request ran or its client left: nothing is left behind
    finally:
        h.stop()


def _quietly(h: GatewayHarness, token: str, body: dict[str, Any]) -> None:
    try:
        with _client(h, token, timeout=5) as client:
            client.chat.completions.create(**body)
    except openai.APIError:
        pass


def _until_queued(h: GatewayHarness) -> None:
    from appliance.admin.client import AdminClient

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = AdminClient(h.home.admin_socket).call("GET", "/admin/status")["local_models"]["local/big"]
        if status.get("queue_depth", 0):
            return
        time.sleep(0.02)
    raise AssertionError("the second request never queued")


def test_a_new_pin_loads_beside_the_old_instance_which_retires_when_idle(
    tmp_path: Path, upstream: FakeUpstream, tiny_models: dict[str, tuple[Path, str]]
) -> None:
    from appliance.admin.client import AdminClient

    h = _start(tmp_path, upstream, tiny_models)
    token = h.issue("radiology-bot")
    try:
        with _client(h, token) as client:
            client.chat.completions.create(
                model="local/tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
            doc = _local_doc(upstream, tiny_models)
            doc["version"] = 2
            doc["models"]["local/tiny"] = {
                "file": "tiny2.gguf",
                "sha256": tiny_models["tiny2"][1],
                "n_ctx": 512,
            }
            h.import_policy(doc)
            time.sleep(0.3)  # the keeper notices the new policy
            client.chat.completions.create(
                model="local/tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = AdminClient(h.home.admin_socket).call("GET", "/admin/status")["local_models"]
            if not any("@" in key for key in status):
                break
            time.sleep(0.05)
        assert status["local/tiny"]["state"] == "ready" and not any("@" in key for key in status)
    finally:
        h.stop()


def test_a_file_whose_hash_differs_is_refused(
    tmp_path: Path, upstream: FakeUpstream, tiny_models: dict[str, tuple[Path, str]]
) -> None:
    h = _start(tmp_path, upstream, tiny_models, pins={"tiny": "0" * 64})
    token = h.issue("radiology-bot")
    try:
        with _client(h, token) as client, pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="local/tiny", messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503 and "model_hash_mismatch" in str(err.value.body)
        runner = CliRunner()
        verified = runner.invoke(main, ["models", "verify", "--home", str(h.home.root)])
        assert verified.exit_code == 1 and "local/tiny2: ok" in verified.output
    finally:
        h.stop()


def test_two_models_concurrently_and_the_models_verbs(local: GatewayHarness) -> None:
    token = local.issue("radiology-bot")
    texts: dict[str, str] = {}

    def ask(model: str) -> None:
        with _client(local, token) as client:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], max_tokens=16
            )
            texts[model] = reply.choices[0].message.content or ""

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("local/tiny", "local/tiny2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(texts) == {"local/tiny", "local/tiny2"}
    home = str(local.home.root)
    runner = CliRunner()
    listed = runner.invoke(main, ["models", "list", "--home", home])
    assert listed.exit_code == 0 and "local/tiny" in listed.output
    assert runner.invoke(main, ["models", "unload", "local/tiny2", "--home", home]).exit_code == 0
    assert runner.invoke(main, ["models", "load", "local/tiny2", "--home", home]).exit_code == 0
    with _client(local, token) as client:
        ids = [m.id for m in client.models.list()]
    assert {"local/tiny", "local/tiny2"} <= set(ids)
