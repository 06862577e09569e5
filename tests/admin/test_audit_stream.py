"""The admin socket's live audit stream: new durable records as they commit, filtered by the gateway,
resumable by seq, a heartbeat when idle, and an end when the gateway stops."""

from __future__ import annotations

import threading
import time
from typing import Any

import openai

from appliance.admin.client import AdminClient
from tests.admin.conftest import Sdk, chat, wait_for
from tests.support.gateway import GatewayHarness


class _Tail:
    """Reads a stream in a thread, keeping what it received."""

    def __init__(self, admin: AdminClient, path: str) -> None:
        self.lines: list[dict[str, Any]] = []
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(admin, path), daemon=True)
        self._thread.start()

    def _run(self, admin: AdminClient, path: str) -> None:
        try:
            for doc in admin.stream(path):
                self.lines.append(doc)
        finally:
            self.ended.set()

    @property
    def records(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "seq" in line]


def test_the_stream_carries_new_records_of_the_filter_only_and_resumes_by_seq(
    harness: GatewayHarness, admin: AdminClient, caller: openai.OpenAI, sdk: Sdk
) -> None:
    other = sdk(harness, harness.issue("billing-bot", role="billing"))
    chat(caller)  # before the stream: not sent (a stream without ``after`` starts at the head)
    assert wait_for(lambda: [r for r in harness.audit.records() if r["type"] == "response"])
    tail = _Tail(admin, "/admin/audit/stream?caller=radiology-bot")
    wait_for(lambda: tail.lines)  # the first heartbeat: the stream is open
    for _ in range(3):
        chat(caller)
        chat(other)
    assert wait_for(lambda: len(tail.records) >= 6)
    time.sleep(0.3)
    records = tail.records
    assert len(records) == 6 and {r["claw_id"] for r in records} == {"radiology-bot"}
    assert [r["type"] for r in records] == ["request", "response"] * 3
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs)

    resumed = _Tail(admin, f"/admin/audit/stream?caller=radiology-bot&after={seqs[1]}")
    assert wait_for(lambda: len(resumed.records) >= 4)
    assert [r["seq"] for r in resumed.records] == seqs[2:]  # nothing lost, nothing twice


def test_an_idle_stream_sends_heartbeats_and_picks_up_records_another_process_wrote(
    harness: GatewayHarness, admin: AdminClient
) -> None:
    tail = _Tail(admin, "/admin/audit/stream?type=admin")
    first = wait_for(lambda: tail.lines and tail.lines[0])
    assert set(first) == {"heartbeat", "head"}
    with harness.home.open_vault() as vault:  # the CLI's process, not the gateway's writer
        vault.ledger.append_sync({"type": "admin", "detail": "token_issue org=stmarys role=billing"})
    got = wait_for(lambda: tail.records, timeout=6)
    assert [r["detail"] for r in got] == ["token_issue org=stmarys role=billing"]


def test_a_stopping_gateway_ends_its_streams(harness: GatewayHarness, admin: AdminClient) -> None:
    tail = _Tail(admin, "/admin/audit/stream")
    wait_for(lambda: tail.lines)
    started = time.monotonic()
    harness.stop()
    assert tail.ended.wait(5)
    assert time.monotonic() - started < 5
