"""Shared fixtures: a fake cloud provider on loopback and a running gateway in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start_in_thread()
    yield fake
    fake.stop_thread()


@pytest.fixture
def harness(tmp_path: Path, upstream: FakeUpstream) -> Iterator[GatewayHarness]:
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    h.set_provider_keys()
    h.start()
    yield h
    h.stop()
