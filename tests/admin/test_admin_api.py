"""The admin socket's endpoints against a real gateway: what each answers, what each action changes, and the
``admin`` record each action leaves, naming its verb and the socket peer's OS user."""

from __future__ import annotations

import getpass
import hashlib
import json
import sqlite3

import openai
import pytest

from appliance.admin.client import AdminClient
from appliance.admin.verify_job import VerifyJob
from appliance.errors import Conflict, LedgerUnavailable, OperatorError
from appliance.vault.provider_keys import fingerprint
from tests.admin.conftest import Sdk, admin_records, chat, signed_bundle, wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import PROVIDER_KEYS, GatewayHarness, policy_doc


def test_every_read_endpoint_answers_its_documented_shape(
    harness: GatewayHarness, admin: AdminClient, caller: openai.OpenAI
) -> None:
    chat(caller)
    chat(caller, stream=True)
    activity = wait_for(lambda: (a := admin.call("GET", "/admin/activity"))["totals"]["requests"] >= 2 and a)
    assert activity["window_s"] == 120
    assert {len(values) for values in activity["series"].values()} == {120}
    assert sum(activity["series"]["requests_per_s"]) == 2
    assert activity["totals"]["requests"] == 2 and activity["totals"]["errors"] == 0
    assert activity["now"]["p50_ms"] is not None and activity["now"]["in_flight"] == 0
    assert [row["caller"] for row in activity["spend_today"]["by_caller"]] == ["radiology-bot"]
    assert [row["route"] for row in activity["spend_today"]["by_route"]] == ["openai"]
    assert activity["spend_today"]["total_usd"] > 0
    assert activity["policy"]["in_force"] and activity["policy"]["version"] == 1
    assert activity["ledger"]["writable"] and activity["ledger"]["records"] >= 4

    page = admin.call("GET", "/admin/audit?limit=2")
    assert [r["type"] for r in page["records"]] == ["request", "response"]
    assert page["records"][0]["seq"] < page["records"][1]["seq"] == page["head"]
    assert set(page["records"][1]) >= {
        "ts",
        "claw_id",
        "model",
        "status_code",
        "tokens_in",
        "decision",
        "seq",
    }
    one = admin.call("GET", f"/admin/audit/record?seq={page['head']}")["record"]
    assert one == page["records"][1]

    tokens = admin.call("GET", "/admin/callers")["tokens"]
    assert [(t["caller"], t["state"]) for t in tokens] == [("radiology-bot", "active")]
    assert "token_sha256" not in tokens[0]

    policy = admin.call("GET", "/admin/policy")
    assert policy["version"] == 1 and policy["scope"] == {"sites": ["test-site"]}
    assert policy["keyids"] and policy["trust"]["threshold"] == 1
    assert {r["name"] for r in policy["summary"]["routes"]} == {"openai", "anthropic", "local"}
    assert policy["summary"]["organizations"] == [{"org": "stmarys", "roles": ["billing", "radiology"]}]
    assert policy["document"] is None  # polled once a second: the document only on request
    assert admin.call("GET", "/admin/policy?document=1")["document"]["version"] == 1

    keys = admin.call("GET", "/admin/keys")
    assert [k["route"] for k in keys["keys"]] == ["anthropic", "openai"]
    assert keys["routes_needing_keys"] == []

    ledger = admin.call("GET", "/admin/ledger")
    assert ledger["writable"] and ledger["verify"]["state"] == "idle"
    assert ledger["verifier_key"].startswith("phi-gateway.test-site/")
    assert admin.call("GET", "/admin/models") == {"models": []}


def test_filters_are_applied_by_the_gateway(
    harness: GatewayHarness, admin: AdminClient, caller: openai.OpenAI, sdk: Sdk
) -> None:
    other = sdk(harness, harness.issue("billing-bot", role="billing"))
    chat(caller)
    with pytest.raises(openai.PermissionDeniedError):
        chat(other, model="openai/gpt-4o")  # billing may use gpt-4o-mini only
    refused = admin.call("GET", "/admin/audit?caller=billing-bot&decision=denied")["records"]
    assert [(r["claw_id"], r["status_code"], r["intervention"]) for r in refused] == [
        ("billing-bot", 403, "policy_denied")
    ]
    assert (
        admin.call("GET", "/admin/audit?status=200&type=response")["records"][0]["claw_id"] == "radiology-bot"
    )
    with pytest.raises(OperatorError, match="status must be an integer"):
        admin.call("GET", "/admin/audit?status=ok")
    with pytest.raises(OperatorError, match="limit must be 1 to 1000"):
        admin.call("GET", "/admin/audit?limit=0")
    with pytest.raises(OperatorError, match="no record 999"):
        admin.call("GET", "/admin/audit/record?seq=999")


def test_callers_issue_revoke_and_expiry_each_leave_an_admin_record(
    harness: GatewayHarness, admin: AdminClient, sdk: Sdk
) -> None:
    issued = admin.call(
        "POST",
        "/admin/callers/issue",
        {"caller": "lab-bot", "org": "stmarys", "role": "billing", "expires": "30d"},
    )
    token = issued["token"]
    assert token.startswith("lab-bot:") and len(token.split(":")[1]) == 48 and issued["expires_at"]
    client = sdk(harness, token)
    chat(client)  # the token works at once
    row = next(t for t in admin.call("GET", "/admin/callers")["tokens"] if t["caller"] == "lab-bot")
    changed = admin.call("POST", "/admin/callers/expiry", {"id": row["id"], "expires": "12h"})
    assert changed["expires_at"] < issued["expires_at"]
    assert admin.call("POST", "/admin/callers/revoke", {"caller": "lab-bot"}) == {
        "revoked": 1,
        "caller": "lab-bot",
    }
    wait_for(lambda: _refused(client))
    with pytest.raises(openai.PermissionDeniedError, match="not valid"):  # revoked: 403
        chat(client)
    states = {t["caller"]: t["state"] for t in admin.call("GET", "/admin/callers?all=1")["tokens"]}
    assert states == {"lab-bot": "revoked"}
    details = [r["detail"] for r in admin_records(harness)]
    assert "token_issue org=stmarys role=billing via admin socket" in details
    assert any(d.startswith(f"token_expiry id={row['id']} expires=") for d in details)
    assert "token_revoke count=1 via admin socket" in details
    assert {r["os_user"].split()[0] for r in admin_records(harness)} == {getpass.getuser()}
    assert all(token.split(":")[1] not in json.dumps(r) for r in harness.ledger_rows())


def _refused(client: openai.OpenAI) -> bool:
    try:
        chat(client)
    except openai.PermissionDeniedError:
        return True
    return False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"caller": "x", "org": "stmarys", "role": "nurse"}, "has no role stmarys/nurse"),
        ({"caller": "x", "org": "stmarys"}, "'role' is required"),
        ({"caller": "bad id!", "org": "stmarys", "role": "billing"}, "caller id"),
        ({"caller": "x", "org": "stmarys", "role": "billing", "expires": "soon"}, "use 30d, 12h, 45m"),
        (
            {"caller": "x", "org": "stmarys", "role": "billing", "expires": "2001-01-01T00:00:00Z"},
            "in the past",
        ),
    ],
)
def test_an_issue_the_gateway_refuses_says_why(
    admin: AdminClient, body: dict[str, str], message: str
) -> None:
    with pytest.raises(OperatorError, match=message):
        admin.call("POST", "/admin/callers/issue", body)
    assert admin.call("GET", "/admin/callers?all=1")["tokens"] == []


def test_provider_keys_set_rotate_remove_never_return_a_value(
    harness: GatewayHarness, admin: AdminClient
) -> None:
    assert admin.call("POST", "/admin/keys/remove", {"route": "openai"}) == {
        "route": "openai",
        "removed": True,
    }
    assert admin.call("GET", "/admin/keys")["routes_needing_keys"] == ["openai"]
    first = admin.call("POST", "/admin/keys/set", {"route": "openai", "key": "sk-openai-0123456789abcdef"})
    assert first["rotated"] is False and first["fingerprint"].startswith("sha256:")
    second = admin.call("POST", "/admin/keys/set", {"route": "openai", "key": "sk-openai-fedcba9876543210"})
    assert second["rotated"] is True and second["fingerprint"] != first["fingerprint"]
    with pytest.raises(OperatorError, match="no key is set for that route"):
        admin.call("POST", "/admin/keys/remove", {"route": "mistral"})
    with pytest.raises(OperatorError, match="'key' is required"):
        admin.call("POST", "/admin/keys/set", {"route": "openai", "key": "  "})
    details = [r["detail"] for r in admin_records(harness)]
    assert "key_remove route=openai via admin socket" in details
    assert f"key_set route=openai {first['fingerprint']} via admin socket" in details
    assert f"key_rotate route=openai {second['fingerprint']} via admin socket" in details
    everything = json.dumps(list(harness.ledger_rows())) + json.dumps(admin.call("GET", "/admin/keys"))
    for secret in ("sk-openai-0123456789abcdef", "sk-openai-fedcba9876543210", *PROVIDER_KEYS.values()):
        assert secret not in everything


def test_a_key_pasted_into_the_route_field_is_refused_without_an_echo(
    harness: GatewayHarness, admin: AdminClient
) -> None:
    pasted = "sk-proj-PASTEDKEY0123456789"
    with pytest.raises(OperatorError, match="policy v1 has no route of that name") as refused:
        admin.call("POST", "/admin/keys/set", {"route": pasted, "key": "sk-openai-0123456789abcdef"})
    assert pasted not in str(refused.value)
    with pytest.raises(OperatorError) as not_set:
        admin.call("POST", "/admin/keys/remove", {"route": pasted})
    assert pasted not in str(not_set.value)
    assert pasted not in json.dumps(list(harness.ledger_rows())) + json.dumps(
        admin.call("GET", "/admin/keys")
    )


def test_an_action_whose_record_cannot_be_written_does_not_happen(
    harness: GatewayHarness, admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token issued, a key set or a verify started without its admin record would be an unrecorded change:
    the record commits in the change's own transaction (or the job is given back)."""
    assert harness.gateway is not None and harness.gateway.vault is not None
    ledger = harness.gateway.vault.ledger

    def broken(conn: object, record: object) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    async def refused(record: object, *, lazy: bool = False) -> int:
        raise LedgerUnavailable("the audit ledger cannot be written")

    monkeypatch.setattr(ledger, "record_in", broken)
    monkeypatch.setattr(ledger, "append", refused)
    issue = {"caller": "ghost", "org": "stmarys", "role": "billing"}
    with pytest.raises(OperatorError):
        admin.call("POST", "/admin/callers/issue", issue)
    with pytest.raises(OperatorError):
        admin.call("POST", "/admin/keys/set", {"route": "openai", "key": "sk-openai-new0123456789"})
    with pytest.raises(OperatorError):
        admin.call("POST", "/admin/ledger/verify")
    monkeypatch.undo()
    assert [t["caller"] for t in admin.call("GET", "/admin/callers?all=1")["tokens"]] == []
    fingerprints = {k["route"]: k["fingerprint"] for k in admin.call("GET", "/admin/keys")["keys"]}
    assert fingerprints["openai"] != fingerprint("sk-openai-new0123456789")
    assert admin.call("GET", "/admin/ledger/verify")["state"] == "idle"
    assert admin.call("POST", "/admin/ledger/verify")["state"] in ("running", "passed")  # not stuck


@pytest.mark.parametrize(
    "path",
    [
        "/admin/audit/record?seq=99999999999999999999999",
        "/admin/audit?before=99999999999999999999999",
        "/admin/audit?after=-1",
        "/admin/audit/stream?after=99999999999999999999999",
    ],
)
def test_out_of_range_numbers_are_refused_before_any_query(admin: AdminClient, path: str) -> None:
    with pytest.raises(OperatorError, match="must be an integer from 0 to"):
        if "stream" in path:
            next(admin.stream(path))
        else:
            admin.call("GET", path)


def test_a_bundle_is_verified_with_its_report_and_diff_before_it_is_imported(
    harness: GatewayHarness, admin: AdminClient, upstream: FakeUpstream
) -> None:
    doc = policy_doc(upstream.base_url, version=2)
    doc["organizations"]["stmarys"]["roles"]["nurse"] = {"models": ["openai/gpt-4o-mini"]}
    bundle = signed_bundle(harness, doc)
    report = admin.send_bytes("POST", "/admin/policy/verify", bundle)
    assert (
        report["ok"] and not report["imported"] and report["version"] == 2 and report["previous_version"] == 1
    )
    assert [c["check"] for c in report["checks"]] == [
        "size",
        "format",
        "signature",
        "schema",
        "rotation",
        "freshness",
        "scope",
        "rollback",
    ]
    assert any("nurse" in change["line"] for change in report["changes"])
    assert admin.call("GET", "/admin/policy")["version"] == 1  # verifying changed nothing

    with pytest.raises(OperatorError, match="not the 0000000000000000"):
        admin.send_bytes("POST", f"/admin/policy/import?sha256={'0' * 64}", bundle)
    with pytest.raises(OperatorError, match="sha256 is required"):
        admin.send_bytes("POST", "/admin/policy/import", bundle)
    digest = hashlib.sha256(bundle).hexdigest()
    imported = admin.send_bytes("POST", f"/admin/policy/import?sha256={digest}", bundle)
    assert imported["ok"] and imported["imported"] and imported["sha256"] == digest
    assert admin.call("GET", "/admin/policy")["version"] == 2  # in force at once, not at the next tick
    assert any(r["detail"].startswith("policy_import v2 ") for r in admin_records(harness))

    again = admin.send_bytes("POST", f"/admin/policy/import?sha256={digest}", bundle)
    assert again["ok"] is False and again["check"] == "rollback" and not again["imported"]
    other_site = policy_doc(upstream.base_url, version=3, scope={"sites": ["elsewhere"]})
    refused = admin.send_bytes("POST", "/admin/policy/verify", signed_bundle(harness, other_site))
    assert refused == {"ok": False, "imported": False, "check": "scope", "message": refused["message"]}
    assert "not this site 'test-site'" in refused["message"]


def test_a_record_is_proved_against_a_signed_checkpoint(
    harness: GatewayHarness, admin: AdminClient, caller: openai.OpenAI
) -> None:
    chat(caller)
    assert wait_for(lambda: [r for r in harness.audit.records() if r["type"] == "response"])  # the outcome
    head = admin.call("GET", "/admin/audit?limit=1")["head"]
    before = admin.call("GET", "/admin/ledger")
    proof = admin.call("POST", "/admin/audit/prove", {"seq": head})
    assert proof["verified"] and proof["tree_size"] >= head and proof["seq"] == head
    assert len(proof["root_sha256"]) == 64
    after = admin.call("GET", "/admin/ledger")  # a proof writes nothing: a read-only console may ask for one
    assert (after["checkpoints"], after["records"]) == (before["checkpoints"], before["records"])
    assert proof["proof"]["kind"] == "inclusion" and proof["proof"]["checkpoint"] == proof["checkpoint"]
    with pytest.raises(OperatorError, match="no record 9999"):
        admin.call("POST", "/admin/audit/prove", {"seq": 9999})
    with pytest.raises(OperatorError, match="'seq' is required"):
        admin.call("POST", "/admin/audit/prove", {"seq": "1"})


def test_ledger_verify_runs_in_the_background_and_records_its_outcome(
    harness: GatewayHarness, admin: AdminClient, caller: openai.OpenAI
) -> None:
    chat(caller)
    started = admin.call("POST", "/admin/ledger/verify")
    assert started["state"] in ("running", "passed")
    done = wait_for(lambda: (j := admin.call("GET", "/admin/ledger/verify"))["state"] != "running" and j)
    assert done["state"] == "passed" and done["checked"] >= done["total"] > 0 and "intact" in done["summary"]
    signed = admin.call("POST", "/admin/ledger/checkpoint")
    assert admin.call("GET", "/admin/ledger")["last_checkpoint"]["size"] == signed["size"]
    details = wait_for(
        lambda: (
            [r["detail"] for r in admin_records(harness) if "ledger_" in r["detail"]][2:]
            and [r["detail"] for r in admin_records(harness) if "ledger_" in r["detail"]]
        )
    )
    assert details[0] == "ledger_verify started via admin socket"
    assert any(d.startswith("ledger_verify passed via admin socket: ") for d in details)
    assert f"ledger_checkpoint size={signed['size']} via admin socket" in details


def test_one_verification_at_a_time() -> None:
    job = VerifyJob()
    job.begin(10)
    with pytest.raises(Conflict, match="already running"):
        job.begin(10)


def test_unknown_paths_and_methods_are_refused_clearly(admin: AdminClient) -> None:
    with pytest.raises(OperatorError, match="no such admin endpoint"):
        admin.call("GET", "/admin/nothing")
    with pytest.raises(OperatorError, match="accepts POST only"):
        admin.call("GET", "/admin/keys/set")
    with pytest.raises(OperatorError, match="accepts GET or POST only"):
        admin.call("DELETE", "/admin/ledger/verify")
    with pytest.raises(OperatorError, match="must be a JSON object"):
        admin.send_bytes("POST", "/admin/keys/set", b"[1,2]")
