"""Helpers for the adapter tests: a route table on the fake upstream, calls, streams read whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from routes.client import UpstreamClient
from routes.result import RouteResult
from routes.table import RouteTable
from routes.usage import SSEScanner, event_fields, split_events
from tests.support.fake_upstream import FakeUpstream, ReceivedRequest

KEY = "sk-provider-0123456789abcdefWXYZ"
CALLER_TOKEN = "radiology-bot:" + "9f" * 24
PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there friend"}]


@dataclass
class Spec:
    kind: str
    base_url: str | None
    auth: str
    timeout_s: float = 5.0


Scenario = Callable[[FakeUpstream, RouteTable], Awaitable[None]]


def run(scenario: Scenario, *, timeout_s: float = 5.0) -> None:
    async def main() -> None:
        async with FakeUpstream() as fake, UpstreamClient() as client:
            specs = {
                "openai": Spec("openai", fake.base_url + "/v1", "bearer", timeout_s),
                "anthropic": Spec("anthropic", fake.base_url, "x-api-key", timeout_s),
                "vllm": Spec("openai", fake.base_url + "/v1/", "none", timeout_s),
                "proxy": Spec("anthropic", fake.base_url, "bearer", timeout_s),
                "local": Spec("local", None, "none", timeout_s),
            }
            await scenario(fake, RouteTable(specs, client))

    asyncio.run(main())


async def call(
    table: RouteTable, model: str, endpoint: str = "chat", key: str | None = KEY, **body: object
) -> RouteResult:
    route, upstream_model = table.resolve(model)
    request = {"model": model, "messages": PROMPT, **body}
    if endpoint == "messages":
        request = {"model": model, "system": "be brief", "messages": PROMPT[1:], "max_tokens": 64, **body}
        return await route.messages(request, upstream_model=upstream_model, key=key)
    return await route.chat_completions(request, upstream_model=upstream_model, key=key)


async def drain(result: RouteResult) -> bytes:
    assert result.stream is not None and result.body is None
    try:
        return b"".join([chunk async for chunk in result.stream])
    finally:
        await result.aclose()


def payloads(stream: bytes) -> list[Any]:
    out = []
    for event in split_events(SSEScanner("fake").feed(stream)):
        data = event_fields(event)[1]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def assert_clean_headers(request: ReceivedRequest, auth: dict[str, str]) -> None:
    expected = {"host", "content-length", "content-type", "user-agent", "accept", *auth}
    if request.path == "/v1/messages":
        expected.add("anthropic-version")
        assert request.headers["anthropic-version"] == "2023-06-01"
    assert set(request.headers) == expected
    for name, value in auth.items():
        assert request.headers[name] == value
    assert request.headers["user-agent"] == "phi-gateway"
    assert CALLER_TOKEN not in json.dumps(request.headers) + request.body.decode()
