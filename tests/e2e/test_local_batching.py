"""End to end with the real OpenAI SDK: one local model serving many streams at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from appliance.admin.client import AdminClient
from tests.e2e.test_local import _client, _start, _until_idle
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness

# </s> and <|end|> of the generated vocabulary, banned so that every stream runs to max_tokens.
NO_EOG = {"2": -100, "262": -100}


@pytest.fixture
def eight(
    tmp_path: Path, upstream: FakeUpstream, tiny_models: dict[str, tuple[Path, str]]
) -> Iterator[GatewayHarness]:
    h = _start(tmp_path, upstream, tiny_models, slots={"tiny": 8})
    yield h
    h.stop()


def _stream(client: openai.OpenAI, text: str, max_tokens: int) -> openai.Stream:  # type: ignore[type-arg]
    return client.chat.completions.create(
        model="local/tiny",
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        logit_bias=NO_EOG,  # type: ignore[arg-type]
        stream=True,
    )


def test_eight_streams_all_progress_at_once(eight: GatewayHarness) -> None:
    token = eight.issue("radiology-bot")
    firsts: dict[int, float] = {}
    ends: dict[int, float] = {}
    counts: dict[int, int] = {}
    start = threading.Barrier(8)

    def one(i: int) -> None:
        with _client(eight, token) as client:
            start.wait()
            n = 0
            for chunk in _stream(client, f"Report {i}: summarise.", 80):
                if chunk.choices and chunk.choices[0].delta.content:
                    n += 1
                    firsts.setdefault(i, time.monotonic())
            ends[i] = time.monotonic()
            counts[i] = n

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ends) == 8 and all(counts[i] > 0 for i in range(8))
    assert max(firsts.values()) < min(ends.values()), "a stream started only after another had finished"


def test_a_closed_stream_frees_its_slot_while_the_others_continue(
    tmp_path: Path, upstream: FakeUpstream, tiny_models: dict[str, tuple[Path, str]]
) -> None:
    h = _start(tmp_path, upstream, tiny_models, slots={"tiny": 2})
    try:
        token = h.issue("radiology-bot")
        with _client(h, token) as a_client, _client(h, token) as b_client, _client(h, token) as c_client:
            a = _stream(a_client, "First.", 400)
            b = iter(_stream(b_client, "Second.", 400))
            next(iter(a))
            next(b)
            a.close()  # the client leaves: its slot must be free for c now
            c = c_client.chat.completions.create(
                model="local/tiny", messages=[{"role": "user", "content": "Third."}], max_tokens=5
            )
            assert c.choices[0].message.content is not None
            row = AdminClient(h.home.admin_socket).call("GET", "/admin/status")["local_models"]["local/tiny"]
            assert row["slots"] == 2 and row["active"] <= 1  # a's slot is free; b may still be going
            assert sum(1 for _ in b) > 0
        _until_idle(h)
    finally:
        h.stop()
