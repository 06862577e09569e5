"""Fixtures of the console's tests: the console over fixed data, and a real gateway with a little traffic.

The real gateway is the ``harness`` of ``tests/conftest.py`` (a FakeUpstream behind it); ``busy_gateway``
adds a caller and a few real requests through the OpenAI SDK, so the console has records to show.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from openai import OpenAI
from textual.pilot import Pilot

from tests.support.gateway import GatewayHarness
from tui.client import AdminSource

REQUESTS = 3


async def wait_for(pilot: Pilot[None], condition: Callable[[], bool], within: float = 10.0) -> None:
    """Let the app run until ``condition()`` holds (the console's data arrives from worker threads)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await pilot.pause(0.05)
    await pilot.pause(0.1)  # one more refresh so what is drawn matches the data


@dataclass
class BusyGateway:
    harness: GatewayHarness
    token: str

    def source(self) -> AdminSource:
        return AdminSource(self.harness.home.admin_socket, timeout=30)

    def chat(self, text: str = "hello") -> None:
        client = OpenAI(base_url=self.harness.base_url, api_key=self.token, max_retries=0)
        messages = [{"role": "user", "content": text}]
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=messages)  # type: ignore[arg-type]


@pytest.fixture
def busy_gateway(harness: GatewayHarness) -> BusyGateway:
    busy = BusyGateway(harness, harness.issue("console-test", role="billing"))
    for i in range(REQUESTS):
        busy.chat(f"request number {i}")
    # an answer's outcome record is written just after the answer: wait until the gateway counts them all
    deadline = time.monotonic() + 10
    while busy.source().activity()["totals"]["requests"] < REQUESTS:
        assert time.monotonic() < deadline, "the gateway never counted the requests"
        time.sleep(0.05)
    return busy
