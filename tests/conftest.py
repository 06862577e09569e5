"""Shared fixtures: a fake cloud provider on loopback, a running gateway in front of it, and the generated
tiny models (for the tests that serve ``local/`` models)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from local_models.tiny import write_tiny_model
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


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("models")
    return {
        name: (folder / f"{name}.gguf", write_tiny_model(folder / f"{name}.gguf", seed=seed))
        for name, seed in (("tiny", 0), ("tiny2", 1))
    }
