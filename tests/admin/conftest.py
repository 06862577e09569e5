"""Fixtures of the admin socket's tests: a real gateway (``harness``), its admin client, a caller's SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from appliance import signing_keys
from appliance.admin.client import AdminClient
from appliance.policy import dsse
from tests.support.gateway import GatewayHarness


@pytest.fixture
def admin(harness: GatewayHarness) -> AdminClient:
    return AdminClient(harness.home.admin_socket, timeout=30)


Sdk = Callable[[GatewayHarness, str], openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """Makes OpenAI clients for a gateway and a token; closes them after the test."""
    made: list[openai.OpenAI] = []

    def make(harness: GatewayHarness, token: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=harness.base_url, api_key=token, max_retries=0, timeout=60)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def caller(harness: GatewayHarness, sdk: Sdk) -> openai.OpenAI:
    return sdk(harness, harness.issue("radiology-bot"))


def chat(client: openai.OpenAI, model: str = "openai/gpt-4o-mini", *, stream: bool = False) -> None:
    messages: Any = [{"role": "user", "content": "three words please"}]
    if stream:
        for _ in client.chat.completions.create(model=model, messages=messages, stream=True):
            pass
    else:
        client.chat.completions.create(model=model, messages=messages)


def signed_bundle(harness: GatewayHarness, doc: dict[str, Any]) -> bytes:
    key = signing_keys.load_signing_key(Path(f"{harness.author}.key"))
    return dsse.sign(json.dumps(doc).encode(), [key])


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def admin_records(harness: GatewayHarness) -> list[dict[str, Any]]:
    return [r for r in harness.ledger_rows() if r["type"] == "admin"]
