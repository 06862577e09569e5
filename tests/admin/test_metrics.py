"""``/metrics`` parsed by prometheus_client's own parser: every family the console issue names is there, and
after a known set of requests the counters agree with the ledger."""

from __future__ import annotations

import http.client
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from appliance.activity import is_answer
from appliance.admin.client import AdminClient
from tests.admin.conftest import Sdk, chat, wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc

FAMILIES = {
    "phi_requests",
    "phi_request_duration_seconds",
    "phi_time_to_first_token_seconds",
    "phi_input_tokens",
    "phi_output_tokens",
    "phi_cost_usd",
    "phi_refusals",
    "phi_ledger_append_lag_seconds",
    "phi_ledger_records",
    "phi_ledger_last_checkpoint_timestamp_seconds",
    "phi_policy_version",
    "phi_policy_expiry_timestamp_seconds",
    "phi_local_queue_depth",
    "phi_local_running_requests",
    "phi_local_generated_tokens_per_second",
    "phi_local_generated_tokens",
}


def _samples(text: str) -> dict[str, list[Sample]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _total(samples: list[Sample], suffix: str = "_total", **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def local_harness(
    tmp_path: Path, upstream: FakeUpstream, tiny_models: dict[str, tuple[Path, str]]
) -> Iterator[GatewayHarness]:
    h = GatewayHarness(tmp_path)
    path, sha = tiny_models["tiny"]
    shutil.copy(path, h.home.models_dir / path.name)
    doc = policy_doc(upstream.base_url)
    doc["models"] = {"local/tiny": {"file": path.name, "sha256": sha, "n_ctx": 512}}
    doc["organizations"]["stmarys"]["roles"]["radiology"]["models"].append("local/*")
    h.import_policy(doc)
    h.set_provider_keys()
    h.start()
    yield h
    h.stop()


def test_metrics_agree_with_the_ledger_after_known_requests(local_harness: GatewayHarness, sdk: Sdk) -> None:
    h = local_harness
    admin = AdminClient(h.home.admin_socket, timeout=60)
    radiology = sdk(h, h.issue("radiology-bot"))
    billing = sdk(h, h.issue("billing-bot", role="billing"))
    for _ in range(3):
        chat(radiology)
    for _ in range(2):
        chat(radiology, stream=True)
    radiology.chat.completions.create(
        model="local/tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=False
    )
    with pytest.raises(openai.PermissionDeniedError):
        chat(billing, model="openai/gpt-4o")
    with pytest.raises(openai.AuthenticationError):
        chat(sdk(h, "not-a-token"))
    answers = wait_for(lambda: len([r for r in h.audit.records() if is_answer(r)]) >= 8 and h.audit.records())
    answers = [r for r in answers if is_answer(r)]
    assert len(answers) == 8
    admin.call("POST", "/admin/ledger/checkpoint")

    text = admin.text("/metrics")
    samples = _samples(text)
    assert FAMILIES <= set(samples), sorted(FAMILIES - set(samples))

    requests = samples["phi_requests"]
    assert _total(requests) == len(answers) == 8
    assert _total(requests, route="openai", model="openai/gpt-4o-mini", status="200", decision="allowed") == 5
    assert _total(requests, route="local", model="local/tiny", status="200") == 1
    assert _total(requests, decision="denied") == 2
    refusals = samples["phi_refusals"]
    assert _total(refusals, intervention="policy_denied", status="403") == 1
    assert _total(refusals, intervention="none", status="401") == 1
    assert _total(samples["phi_request_duration_seconds"], "_count") == 8
    assert _total(samples["phi_time_to_first_token_seconds"], "_count", route="openai") == 2
    for family, field in (("phi_input_tokens", "tokens_in"), ("phi_output_tokens", "tokens_out")):
        assert _total(samples[family]) == sum(r.get(field) or 0 for r in answers) > 0
    assert _total(samples["phi_cost_usd"]) == pytest.approx(sum(r.get("cost_usd") or 0 for r in answers))
    assert _total(samples["phi_ledger_append_lag_seconds"], "_count") > 0
    assert _total(samples["phi_ledger_records"], "") == admin.call("GET", "/admin/ledger")["records"]
    assert _total(samples["phi_policy_version"], "") == 1
    assert _total(samples["phi_local_generated_tokens"], model="local/tiny") > 0
    assert _total(samples["phi_local_queue_depth"], "", model="local/tiny") == 0
    for secret in (radiology.api_key, billing.api_key):
        assert secret.split(":")[1] not in text


@pytest.mark.parametrize("enabled", [False, True])
def test_metrics_reach_the_public_port_only_when_the_operator_enables_them(
    tmp_path: Path, upstream: FakeUpstream, enabled: bool
) -> None:
    h = GatewayHarness(tmp_path)
    if enabled:
        with h.home.settings_path.open("a") as settings:
            settings.write("\n[server]\npublic_metrics = true\n")
    h.import_policy(policy_doc(upstream.base_url))
    h.start()
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        answer = conn.getresponse()
        body = answer.read().decode()
    finally:
        conn.close()
        h.stop()
    if enabled:
        assert answer.status == 200 and "phi_policy_in_force 1.0" in body
        assert answer.getheader("content-type", "").startswith("text/plain")
        assert not [r for r in h.ledger_rows() if r["type"] != "admin"]  # unrecorded, like /health
    else:  # an unknown endpoint to a caller without a token
        assert answer.status == 404 and "phi_" not in body
