"""End to end: a site's own llama-server behind an OpenAI-compatible route (README "Beyond one machine").

The real ``llama-server`` (``$PHI_LLAMA_SERVER``: ``./dev test`` builds it from the same llama.cpp sources
as the engine and exports its path) serves a generated model on 127.0.0.1; a real gateway routes
``site/…`` to it through a route of kind ``openai`` with ``auth: none``; the real ``openai`` SDK talks to
the gateway. Without the binary the test fails: the route it proves must never pass untested.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from bench.local import Shape, llama_server, staged_llama_server
from local_models.tiny import write_tiny_model
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc

START_TIMEOUT_S = 60.0
END_TOKENS = {"2": -100, "262": -100}  # </s> and <|end|> of the generated vocabulary: exact lengths
ASK = [{"role": "user", "content": "Summarise the discharge note."}]


def _binary() -> Path:
    value = os.environ.get("PHI_LLAMA_SERVER", "")
    if not value:
        pytest.fail(
            "PHI_LLAMA_SERVER is not set: run ./dev test, which builds llama-server from the pinned "
            "llama.cpp sources and exports its path (or set it to that binary)"
        )
    path = Path(value)
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"PHI_LLAMA_SERVER={value} is not an executable file; run ./dev test to build it")
    return path


@pytest.fixture(scope="module")
def site_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-server on 127.0.0.1 with the tiny model, two slots of 512 tokens; yields its root URL."""
    folder = tmp_path_factory.mktemp("site-llama-server")
    binary = staged_llama_server(_binary(), folder / "bin")  # the CPU variant the gateway chose, no other
    model = folder / "tiny.gguf"
    write_tiny_model(model)
    with llama_server(binary, model, Shape(threads=2, slots=2, ctx=512), folder) as (url, _, _):
        yield url.removesuffix("/v1")


def _site_policy(upstream: FakeUpstream, server: str) -> dict[str, Any]:
    doc = policy_doc(upstream.base_url)
    # A server on the site's own network may receive PHI, as a local route does; it must say so itself
    # (an openai-kind route without data_classes takes deidentified and public only, like a cloud).
    doc["routes"]["site"] = {
        "kind": "openai",
        "base_url": f"{server}/v1",
        "auth": "none",
        "timeout_s": 30,
        "data_classes": ["phi", "deidentified", "public"],
    }
    doc["routes"]["lab"] = {"kind": "openai", "base_url": f"{server}/v1", "auth": "none"}
    doc["organizations"]["stmarys"]["roles"]["radiology"]["models"] += ["site/*", "lab/*"]
    doc["pricing"]["site/tiny"] = {"input_per_mtok": 0.0, "output_per_mtok": 0.0}
    return doc


@pytest.fixture
def gateway(tmp_path: Path, upstream: FakeUpstream, site_server: str) -> Iterator[GatewayHarness]:
    h = GatewayHarness(tmp_path)
    h.import_policy(_site_policy(upstream, site_server))
    h.start()  # no provider key is set for the site routes: auth none needs none
    yield h
    h.stop()


def _outcomes(h: GatewayHarness, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in h.audit.records() if r["type"] in ("response", "error") and r["model"]]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_a_site_llama_server_answers_through_an_openai_route(gateway: GatewayHarness) -> None:
    token = gateway.issue("radiology-bot")
    with openai.OpenAI(base_url=gateway.base_url, api_key=token, max_retries=0, timeout=60) as client:
        assert "site/tiny" in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(
            model="site/tiny",
            messages=ASK,
            max_tokens=8,
            seed=1,
            logit_bias=END_TOKENS,  # type: ignore[arg-type]
        )
        with_usage = list(
            client.chat.completions.create(
                model="site/tiny",
                messages=ASK,  # type: ignore[arg-type]
                max_tokens=6,
                seed=2,
                logit_bias=END_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        # Without include_usage the caller sees no usage chunk, yet the gateway asked for one and counts it.
        plain = list(
            client.chat.completions.create(
                model="site/tiny",
                messages=ASK,  # type: ignore[arg-type]
                max_tokens=5,
                seed=3,
                logit_bias=END_TOKENS,
                stream=True,
            )
        )
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 0
    usage = [c.usage for c in with_usage if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in with_usage if c.choices)
    assert not [c for c in plain if c.usage is not None]
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices)

    outcomes = _outcomes(gateway, 3)
    assert [r["type"] for r in outcomes] == ["response"] * 3, outcomes
    assert [r["tokens_out"] for r in outcomes] == [8, 6, 5]
    assert [r["tokens_in"] for r in outcomes] == [reply.usage.prompt_tokens] * 3
    for record in outcomes:
        assert record["route"] == "site" and record["model"] == "site/tiny", record
        assert record["status_code"] == 200 and record["data_class"] == "phi" and record["cost_usd"] == 0.0
    # The same records are durable in the ledger, request record first for each.
    durable = [r for r in gateway.ledger_rows() if r.get("route") == "site"]
    assert [r["type"] for r in durable] == ["request", "response"] * 3, durable


def test_a_site_route_without_phi_in_its_classes_refuses_phi(gateway: GatewayHarness) -> None:
    token = gateway.issue("radiology-bot")
    with openai.OpenAI(base_url=gateway.base_url, api_key=token, max_retries=0, timeout=60) as client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="lab/tiny", messages=ASK, max_tokens=4)  # type: ignore[arg-type]
    assert refused.value.code == "data_class_denied"
