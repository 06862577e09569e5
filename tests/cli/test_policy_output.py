"""What ``policy explain``, ``policy verify`` and ``policy import`` print: words for people (no Python reprs,
for a policy that sets every field of the document) and, with ``--json``, the documented JSON documents."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pydantic import BaseModel

from appliance.cli import main
from appliance.policy.diff import changes, summarize_change
from appliance.policy.explain import explain, explain_request
from appliance.policy.reference import policy_schema
from appliance.policy.schema import Policy
from tests.policy.hospital import HOSPITAL
from tests.policy.test_fixtures import NOW, policy

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
SITE = "stmarys-main"
REPR = re.compile(r"None|True|False|\{'|\['|\[\]|\{\}|\[(?!\d+\])")
"""Python reprs (``None``, ``{'allow': …}``, ``['a']``) and a ``[`` that is no index of a rule path."""

EXPLAIN_KEYS = {
    "decision",
    "reason",
    "rule",
    "rule_value",
    "message",
    "policy",
    "caller",
    "model",
    "route",
    "data_class",
    "interventions",
    "tools_dropped",
    "max_tokens",
    "fallbacks",
    "role",
    "organization",
}
BUNDLE_KEYS = {
    "ok",
    "imported",
    "version",
    "previous_version",
    "sha256",
    "keyids",
    "trust_rotation",
    "changes",
}
CHANGE_KEYS = {"section", "name", "change", "before", "after", "fields"}


def every_field(trust: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """The hospital policy with every field of the document set somewhere (checked below)."""
    doc = copy.deepcopy(HOSPITAL)
    now = datetime.now(UTC)
    doc["issued_at"] = (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc["expires_at"] = (now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc["routes"]["anthropic"].update(auth="x-api-key", timeout_s=90)
    doc["models"]["local/llama-3-8b"]["slots"] = 2
    stmarys = doc["organizations"]["stmarys"]
    stmarys["client_certificate"] = {"required": False, "subjects": []}
    radiology = stmarys["roles"]["radiology"]
    radiology["priority"] = -10
    radiology["limits"]["per_role"] = {"requests_per_min": 600}
    radiology["client_certificate"] = {"required": True, "subjects": ["CN=radiology-bot,O=St Marys"]}
    doc["pricing"]["anthropic/claude-3-5-sonnet"] = {"input_per_mtok": 3, "output_per_mtok": 15}
    doc["trust"] = trust or {
        "threshold": 1,
        "keys": {
            "561fcc2ebed33c57538178a4020fd0b6c66d2a0f6f70ac4f4b1fa4ccf9a48c1a": {
                "keytype": "ed25519",
                "scheme": "ed25519",
                "public": "17535f758bff2b765e600d3e33ead56431e796d27bef4fbe913a418e487b42d5",
                "keyid": "561fcc2ebed33c57538178a4020fd0b6c66d2a0f6f70ac4f4b1fa4ccf9a48c1a",
            }
        },
    }
    doc.update(changes)
    return doc


def changed_everywhere(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with a changed value in every section an import summary reports."""
    new = copy.deepcopy(doc)
    new["version"] += 1
    new["expires_at"] = "2099-01-01T00:00:00Z"
    new["scope"]["sites"].append("stmarys-annex")
    new["routes"]["anthropic"].update(timeout_s=30, data_classes=["phi"], auth="bearer")
    new["models"]["local/llama-3-8b"].update(n_ctx=4096, sha256="cd" * 32, slots=4)
    org = new["organizations"]["stmarys"]
    org["budgets"] = {"usd_per_day": 400.5}
    org["client_certificate"] = {"required": True, "subjects": ["CN=a", "CN=b"]}
    radiology = org["roles"]["radiology"]
    radiology.update(
        priority=5,
        default_data_class="deidentified",
        declarable_data_classes=["public"],
        tools={"allow": ["web_search", "calc"], "on_violation": "deny"},
        prompt={"max_chars": 100, "deny_patterns": [{"id": "ssn", "pattern": "[0-9]{3}"}]},
        limits={"per_caller": {"tokens_per_min": 5}},
        budgets={"per_role": {"usd_per_day": 12.5}},
        client_certificate=None,
    )
    org["roles"]["triage-bot"]["force_model"] = "local/tiny"
    org["roles"]["triage-bot"]["models"] = ["local/tiny"]
    new["pricing"]["openai/gpt-4o"] = {"input_per_mtok": 0.075, "output_per_mtok": 1250}
    new["aliases"]["fast"] = "local/demo"
    new["fallbacks"]["local/llama-3-8b"] = ["local/tiny"]
    new["trust"]["threshold"] = 1
    return new


def _fields_set(model: BaseModel, seen: set[str]) -> None:
    for name in model.model_fields_set:
        seen.add(f"{type(model).__name__}.{name}")
    for value in model.__dict__.values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                _fields_set(item, seen)


def _no_reprs(lines: list[str], policy: Policy) -> None:
    patterns = [
        p.pattern
        for o in policy.organizations.values()
        for r in o.roles.values()
        if r.prompt
        for p in r.prompt.deny_patterns
    ]
    for line in lines:
        text = line
        for pattern in patterns:  # the operator's own regex text may hold brackets
            text = text.replace(pattern, "")
        assert REPR.search(text) is None, f"a Python repr in: {line!r}"


def test_the_fixture_sets_every_field_of_the_document() -> None:
    seen: set[str] = set()
    _fields_set(Policy.model_validate_json(json.dumps(every_field()), strict=True), seen)
    schema = policy_schema()
    everything = {f"Policy.{name}" for name in schema["properties"]} | {
        f"{model}.{name}" for model, spec in schema["$defs"].items() for name in spec["properties"]
    }
    assert everything - seen == set(), "extend every_field() so the output tests see the new field"


def test_the_import_summary_has_no_reprs() -> None:
    first = Policy.model_validate_json(json.dumps(every_field()), strict=True)
    second = Policy.model_validate_json(json.dumps(changed_everywhere(every_field())), strict=True)
    for old, new in ((None, first), (policy(), first), (first, second), (second, first)):
        _no_reprs(summarize_change(old, new), new)
    lines = summarize_change(first, second)
    assert (
        "organization budgets changed: stmarys (usd_per_day none -> $400.50; "
        "usd_per_month $10,000.00 -> none)"
    ) in lines
    assert "sites: stmarys-main -> stmarys-main, stmarys-annex" in lines
    assert (
        "role changed: stmarys/radiology (default_data_class phi -> deidentified; priority -10 -> 5; "
        "declarable_data_classes none -> public; tools allow: dicom_*, lookup_study (on violation: deny) -> "
        "allow: web_search, calc (on violation: deny); prompt max 50 messages, max_tokens clamp 2048 -> "
        "deny patterns: ssn, max 100 chars; limits per caller 60 requests/min, 20000 tokens/min and per role "
        "600 requests/min -> per caller 5 tokens/min; budgets per caller $5.00/day and per role "
        "$2,000.00/month -> per role $12.50/day; client_certificate required, CN=radiology-bot,O=St Marys "
        "-> none)"
    ) in lines
    assert (
        "route changed: anthropic (auth x-api-key -> bearer; data_classes phi, deidentified, public -> phi; "
        "timeout_s 90 s -> 30 s)"
    ) in lines
    assert (
        "local model changed: local/llama-3-8b (sha256 "
        + "ab" * 32
        + " -> "
        + "cd" * 32
        + "; n_ctx 8192 -> 4096; slots 2 -> 4)"
        in lines
    )
    assert (
        "price changed: openai/gpt-4o (input_per_mtok $2.50 -> $0.075; output_per_mtok $10.00 -> $1,250.00)"
        in lines
    )
    assert (
        "organization client certificate changed: stmarys (required no -> yes; subjects none -> CN=a, CN=b)"
        in lines
    )


@pytest.mark.parametrize(
    ("role", "model", "extra"),
    [
        ("radiology", "clinical-summary", {}),
        ("radiology", "local/llama-3-8b", {"tools": ["dicom_view", "web_search"]}),
        ("billing", "openai/gpt-4o-mini", {}),
        ("billing", "local/demo", {"tools": ["web_search"], "text": "SSN 123-45-6789"}),
        ("research", "openrouter/meta-llama/llama-3-70b", {"data_class": "public"}),
        ("research", "local/demo", {"data_class": "public"}),
        ("triage-bot", "fast", {"max_tokens": 4000}),
        ("public-web", "cheap-cloud", {}),
        ("ghost", "local/demo", {}),
        ("radiology", "nowhere/model", {}),
        ("radiology", "not a model", {}),
    ],
)
def test_explain_has_no_reprs(role: str, model: str, extra: dict[str, Any]) -> None:
    doc = every_field()
    doc["issued_at"], doc["expires_at"] = "2026-11-25T00:00:00Z", "2027-02-25T00:00:00Z"
    current = Policy.model_validate_json(json.dumps(doc), strict=True)
    lines = explain(current, org="stmarys", role=role, model=model, now=NOW, **extra)
    _no_reprs(lines, current)
    document = explain_request(current, org="stmarys", role=role, model=model, now=NOW, **extra).document()
    assert set(document) == EXPLAIN_KEYS and json.loads(json.dumps(document)) == document


def test_explain_words_a_role_of_every_section() -> None:
    doc = every_field()
    doc["issued_at"], doc["expires_at"] = "2026-11-25T00:00:00Z", "2027-02-25T00:00:00Z"
    current = Policy.model_validate_json(json.dumps(doc), strict=True)
    lines = explain(current, org="stmarys", role="radiology", model="local/llama-3-8b", now=NOW)
    assert "role queue priority: -10 (lower runs sooner on local models)" in lines
    assert "role limits: per caller 60 requests/min, 20000 tokens/min and per role 600 requests/min" in lines
    assert "role budgets: per caller $5.00/day and per role $2,000.00/month" in lines
    assert "role client certificate: required, CN=radiology-bot,O=St Marys" in lines
    assert "organization budgets: $10,000.00/month" in lines
    assert "organization client certificate: optional, any certificate the site's client CA signed" in lines


# -- the command line --------------------------------------------------------------------------------------


def _run(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _sign(tmp_path: Path, doc: dict[str, Any], name: str, *keys: Path) -> Path:
    source = tmp_path / f"{name}.json"
    source.write_text(json.dumps(doc))
    bundle = tmp_path / f"{name}.bundle"
    key_args = [arg for key in keys for arg in ("--key", f"{key}.key")]
    _run("policy", "sign", str(source), *key_args, "--out", str(bundle))
    return bundle


@pytest.fixture
def home_and_keys(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """A home trusting ``author``, and a rotation of its trust to ``successor`` (the ``trust`` field)."""
    home = tmp_path / "home"
    _run("init", "--home", str(home), "--site", SITE)
    author, successor = tmp_path / "author", tmp_path / "successor"
    _run("policy", "keygen", "--out", str(author))
    _run("policy", "keygen", "--out", str(successor))
    _run("trust", "add", f"{author}.pub", "--home", str(home))
    pub = json.loads(Path(f"{successor}.pub").read_text())
    trust = {
        "threshold": 1,
        "keys": {pub["keyid"]: {"keytype": "ed25519", "scheme": "ed25519", "public": pub["public"]}},
    }
    return home, author, successor, trust


def test_import_verify_and_explain_print_words_or_json(
    tmp_path: Path, home_and_keys: tuple[Path, Path, Path, dict[str, Any]]
) -> None:
    home, author, successor, trust = home_and_keys
    with (home / "gateway.toml").open("a", encoding="utf-8") as settings:  # a gateway that asks for them
        settings.write('\n[server.tls]\nclient_ca_file = "tls/client-ca.pem"\n')
    first = every_field(trust, scope={"sites": [SITE]})
    bundle = _sign(tmp_path, first, "v12", author, successor)
    checked = json.loads(_run("policy", "verify", str(bundle), "--json", "--home", str(home)).stdout)
    assert set(checked) == BUNDLE_KEYS and checked["ok"] is True and checked["imported"] is False
    assert checked["previous_version"] is None and checked["changes"][0]["section"] == "version"
    assert all(set(change) == CHANGE_KEYS for change in checked["changes"])
    imported = _run("policy", "import", str(bundle), "--home", str(home)).stdout
    _no_reprs(imported.splitlines(), Policy.model_validate_json(json.dumps(first)))
    assert (
        "  route added: local (local in-process; auth none; receives phi, deidentified, public; "
        "timeout 2 min)\n"
    ) in imported
    assert "  trust: rotates to 1 key(s)" in imported

    second = changed_everywhere(first)
    second["scope"] = {"sites": [SITE]}
    bundle2 = _sign(tmp_path, second, "v13", successor)
    verified = _run("policy", "verify", str(bundle2), "--home", str(home)).stdout
    assert (
        verified.startswith("ok: policy v13")
        and "importing it would change:\n  version: v12 -> v13\n" in verified
    )
    _no_reprs(verified.splitlines()[1:], Policy.model_validate_json(json.dumps(second)))
    document = json.loads(_run("policy", "import", str(bundle2), "--json", "--home", str(home)).stdout)
    assert (
        set(document) == BUNDLE_KEYS and document["imported"] is True and document["previous_version"] == 12
    )
    successor_keyid = json.loads(Path(f"{successor}.pub").read_text())["keyid"]
    assert document["keyids"] == [successor_keyid]
    assert document["trust_rotation"] == {"threshold": 1, "keyids": [successor_keyid]}
    radiology = next(
        c for c in document["changes"] if c["section"] == "roles" and c["name"] == "stmarys/radiology"
    )
    assert radiology["change"] == "changed" and radiology["before"]["priority"] == -10
    assert radiology["after"]["tools"] == {"allow": ["web_search", "calc"], "on_violation": "deny"}
    assert "client_certificate" in radiology["fields"] and "models" not in radiology["fields"]
    assert {c["section"] for c in document["changes"]} >= {
        "version",
        "expires_at",
        "routes",
        "models",
        "roles",
        "pricing",
        "aliases",
        "fallbacks",
        "organizations.budgets",
        "organizations.client_certificate",
    }

    rollback = _run("policy", "import", str(bundle), "--json", "--home", str(home), ok=False)
    refusal = json.loads(rollback.stdout)
    assert rollback.exit_code == 1 and refusal["ok"] is False and refusal["check"] == "rollback"
    assert set(refusal) == {"ok", "check", "message"}

    explained = json.loads(
        _run(
            "policy",
            "explain",
            "--org",
            "stmarys",
            "--role",
            "billing",
            "--model",
            "openai/gpt-4o-mini",
            "--client-cert",
            "CN=a",  # the organization's rule after the import: CN=a or CN=b
            "--json",
            "--home",
            str(home),
        ).stdout
    )
    assert set(explained) == EXPLAIN_KEYS
    assert explained["decision"] == "denied" and explained["rule"] == "routes.openai.data_classes"
    assert explained["rule_value"] == ["deidentified", "public"]
    assert explained["data_class"] == {"class": "phi", "source": "role_default"}
    words = _run(
        "policy",
        "explain",
        "--org",
        "stmarys",
        "--role",
        "radiology",
        "--model",
        "clinical-summary",
        "--tools",
        "dicom_x,web_search",
        "--client-cert",
        "CN=b",
        "--home",
        str(home),
    ).stdout
    _no_reprs(words.splitlines(), Policy.model_validate_json(json.dumps(second)))
    assert "decision: denied (tools_denied)" in words


def test_the_json_documents_keys_are_in_the_readme() -> None:
    scripts = README.partition("**Output for scripts.**")[2].partition("\n### ")[0]
    for key in sorted(EXPLAIN_KEYS | BUNDLE_KEYS | CHANGE_KEYS):
        assert f"`{key}`" in scripts, f"README's 'Output for scripts' lacks {key}"
    sections = {c.section for c in changes(None, Policy.model_validate_json(json.dumps(every_field())))}
    sections |= {"expires_at", "scope.sites"}
    for section in sorted(sections):
        assert f"`{section}`" in scripts, f"README's 'Output for scripts' lacks the change section {section}"


def test_tiny_prices_and_values_that_read_alike_stay_readable() -> None:
    from appliance.policy.display import money

    assert [money(v) for v in (12.5, 2000, 0.075, 0.0000015, 1e-9)] == [
        "$12.50",
        "$2,000.00",
        "$0.075",
        "$0.0000015",
        "$0.000000001",
    ]
    before = every_field()
    after = every_field(version=before["version"] + 1)
    before["organizations"]["stmarys"]["roles"]["radiology"]["declarable_data_classes"] = []
    after["organizations"]["stmarys"]["roles"]["radiology"]["declarable_data_classes"] = None
    lines = [
        change.line()
        for change in changes(
            Policy.model_validate_json(json.dumps(before)), Policy.model_validate_json(json.dumps(after))
        )
    ]
    assert any("declarable_data_classes empty -> not set" in line for line in lines), lines
    assert not any("none -> none" in line for line in lines)


def test_a_change_inside_a_section_or_below_the_words_precision_is_named() -> None:
    from appliance.policy.diff import _field_change
    from appliance.policy.schema import PromptRules

    before = PromptRules(deny_patterns=[{"id": "ssn", "pattern": "a"}], max_chars=4000)  # type: ignore[list-item]
    after = PromptRules(deny_patterns=[{"id": "ssn", "pattern": "b"}], max_chars=4000)  # type: ignore[list-item]
    assert _field_change("prompt", before, after).endswith("(deny_patterns[0].pattern changed)")
    assert _field_change("timeout_s", 90, 90.0000001) == "timeout_s 90 -> 90.0000001"
