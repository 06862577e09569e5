"""The policy reference and schema (``policy schema``), the defaults by route kind, the words of a schema
error, and which names ``GET /v1/models`` lists, as the README's policy reference documents them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from appliance.cli import main
from appliance.errors import BundleRejected
from appliance.policy import limits_schema, schema
from appliance.policy.engine import PolicyEngine
from appliance.policy.explain import explain
from appliance.policy.reference import (
    EXAMPLES,
    _sections,
    missing_descriptions,
    policy_schema,
    reference_markdown,
)
from appliance.policy.schema import DATA_CLASSES, DEFAULT_DATA_CLASSES, Policy, RouteSpec, parse_policy
from tests.policy.hospital import facts
from tests.policy.test_fixtures import DOC, NOW, SHA, doc

T = NOW.timestamp()
MODELS: dict[str, type[BaseModel]] = {
    name: value
    for module in (schema, limits_schema)
    for name, value in vars(module).items()
    if isinstance(value, type) and issubclass(value, BaseModel) and not name.startswith("_")
}


# -- the schema and the reference -------------------------------------------------------------------------


def test_the_schema_describes_every_field_and_states_what_is_required() -> None:
    document = policy_schema()
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["required"] == ["version", "issued_at", "expires_at", "scope", "routes", "organizations"]
    assert missing_descriptions(document) == []
    route = document["$defs"]["RouteSpec"]["properties"]["data_classes"]
    assert "default" not in route and route["x-default-by-kind"] == DEFAULT_DATA_CLASSES
    assert "local: all three" in route["description"] and "``" not in route["description"]


def test_a_field_without_a_docstring_is_caught() -> None:
    document = policy_schema()
    del document["$defs"]["Role"]["properties"]["priority"]["description"]
    assert missing_descriptions(document) == ["Role.priority"]
    with pytest.raises(ValueError, match=r"Role\.priority"):
        reference_markdown(document)


def test_a_new_field_changes_the_reference() -> None:
    document = policy_schema()
    document["$defs"]["Role"]["properties"]["colour"] = {"type": "string", "description": "A new field."}
    assert "| `colour` | string | no | none | A new field. |" in reference_markdown(document)
    assert reference_markdown(document) != reference_markdown()


def test_every_section_has_an_example_that_its_model_accepts() -> None:
    sections = _sections(policy_schema())
    assert set(EXAMPLES) == set(sections)
    for name, example in EXAMPLES.items():
        if name == "Policy":  # fragments of the top level: checked inside a whole document
            whole = copy.deepcopy(DOC)
            whole["models"]["local/llama-3-8b"] = {"file": "llama.gguf", "sha256": SHA}
            whole["routes"]["anthropic"]["data_classes"] = ["phi"]
            Policy.model_validate_json(json.dumps({**whole, **example}), strict=True)
        else:
            MODELS[name].model_validate_json(json.dumps(example), strict=True)


def test_every_section_is_in_the_reference_with_every_field() -> None:
    text = reference_markdown()
    for section in _sections(policy_schema()).values():
        for field in section.schema["properties"]:
            assert f"| `{field}` |" in text
    assert "| `organizations.<org>` | `roles` | `budgets`, `client_certificate` |" in text
    assert "| top level | `version`, `issued_at`, `expires_at`, `scope`, `routes`, `organizations` |" in text


def test_policy_schema_prints_json_markdown_or_a_file(tmp_path: Path) -> None:
    runner = CliRunner()
    printed = runner.invoke(main, ["policy", "schema"], catch_exceptions=False)
    assert printed.exit_code == 0 and json.loads(printed.stdout) == policy_schema()
    markdown = runner.invoke(main, ["policy", "schema", "--markdown"], catch_exceptions=False)
    assert markdown.stdout == reference_markdown() + "\n"
    out = tmp_path / "policy.schema.json"
    written = runner.invoke(main, ["policy", "schema", "--out", str(out)], catch_exceptions=False)
    assert written.exit_code == 0 and json.loads(out.read_text()) == policy_schema()


# -- defaults by route kind -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "classes", "auth"),
    [
        ({"kind": "local"}, ["phi", "deidentified", "public"], "none"),
        ({"kind": "openai", "base_url": "https://api.openai.com/v1"}, ["deidentified", "public"], "bearer"),
        (
            {"kind": "anthropic", "base_url": "https://api.anthropic.com"},
            ["deidentified", "public"],
            "x-api-key",
        ),
        ({"kind": "local", "data_classes": ["public"]}, ["public"], "none"),
        (
            {"kind": "anthropic", "base_url": "https://a.example", "data_classes": ["phi"]},
            ["phi"],
            "x-api-key",
        ),
    ],
)
def test_a_route_without_data_classes_takes_its_kinds_default(
    route: dict[str, Any], classes: list[str], auth: str
) -> None:
    spec = RouteSpec.model_validate_json(json.dumps(route), strict=True)
    assert spec.data_classes == classes and spec.auth == auth
    assert RouteSpec.model_validate(route).data_classes is not RouteSpec.model_validate(route).data_classes


def test_a_local_route_without_data_classes_takes_phi_and_a_cloud_route_does_not() -> None:
    document = doc()
    document["routes"]["local"] = {"kind": "local"}
    document["routes"]["openai"] = {"kind": "openai", "base_url": "https://api.openai.com/v1"}
    document["organizations"]["stmarys"]["roles"]["billing"]["models"] = ["local/demo", "openai/gpt-4o"]
    engine = PolicyEngine(parse_policy(json.dumps(document).encode()))
    assert engine.evaluate(facts("billing", "local/demo"), now=T).allowed
    refused = engine.evaluate(facts("billing", "openai/gpt-4o"), now=T)
    assert (refused.reason, refused.rule) == ("data_class_denied", "routes.openai.data_classes")
    allowed = engine.evaluate(facts("billing", "openai/gpt-4o", "phi"), now=T)
    assert not allowed.allowed  # declaring phi does not open a route that may not receive it
    lines = explain(engine.policy, org="stmarys", role="billing", model="local/demo", now=NOW)
    assert "route: local (local, may receive phi, deidentified, public), upstream model demo" in lines
    lines = explain(engine.policy, org="stmarys", role="billing", model="openai/gpt-4o", now=NOW)
    assert "rule: routes.openai.data_classes = deidentified, public" in lines


def test_an_unknown_kind_is_one_error_and_a_null_list_is_refused() -> None:
    document = doc()
    document["routes"]["local"] = {"kind": "vllm"}
    with pytest.raises(BundleRejected) as info:
        parse_policy(json.dumps(document).encode())
    assert "routes.local.kind: Input should be 'local', 'openai' or 'anthropic'" in str(info.value)
    assert "default factory" not in str(info.value) and str(info.value).count(";") == 0
    document["routes"]["local"] = {"kind": "local", "data_classes": None}
    with pytest.raises(BundleRejected, match=r"routes\.local\.data_classes"):
        parse_policy(json.dumps(document).encode())
    assert list(DEFAULT_DATA_CLASSES["local"]) == list(DATA_CLASSES)


# -- schema errors ----------------------------------------------------------------------------------------


def test_a_missing_required_field_is_named_and_points_to_policy_schema(tmp_path: Path) -> None:
    source = tmp_path / "policy.json"
    source.write_text(json.dumps(doc(issued_at=None)))
    runner = CliRunner()
    assert runner.invoke(main, ["policy", "keygen", "--out", str(tmp_path / "author")]).exit_code == 0
    signed = runner.invoke(
        main,
        ["policy", "sign", str(source), "--key", str(tmp_path / "author.key"), "--out", str(tmp_path / "b")],
    )
    assert signed.exit_code == 1 and not (tmp_path / "b").exists()
    message = signed.stderr
    assert "policy.json is not a valid policy" in message
    assert "issued_at: a required field is missing" in message
    assert "`phi-gateway policy schema` prints every field" in message
    assert "Field required" not in message and "pydantic" not in message


def test_an_unknown_field_lists_the_fields_of_its_place() -> None:
    document = doc()
    document["organizations"]["stmarys"]["roles"]["billing"]["budget"] = {"per_role": {"usd_per_day": 1}}
    document["organizations"]["stmarys"]["roles"]["billing"]["limits"] = {"per_caller": {"rpm": 3}}
    with pytest.raises(BundleRejected) as info:
        parse_policy(json.dumps(document).encode())
    message = str(info.value)
    assert (
        "organizations.stmarys.roles.billing.limits.per_caller.rpm: unknown field (the fields here: "
        "requests_per_min, tokens_per_min)"
    ) in message
    assert "roles.billing.budget: unknown field (the fields here: models, default_data_class," in message


# -- GET /v1/models ---------------------------------------------------------------------------------------


def _listing(document: dict[str, Any], org: str, role: str) -> list[str]:
    """What ``GET /v1/models`` answers for a role (``pipeline.police.models_listing``: models, then
    aliases)."""
    engine = PolicyEngine(parse_policy(json.dumps(document).encode()))
    return engine.allowed_models(org, role, now=T) + engine.allowed_aliases(org, role, now=T)


def test_the_models_listing_is_what_the_reference_documents() -> None:
    document = doc()
    document["aliases"] = {
        "summary": "local/tiny",
        "cloud": "openai/gpt-4o-mini",
        "claude": "anthropic/claude-x",
    }
    document["fallbacks"] = {"local/demo": ["openai/o3-mini"]}
    document["organizations"]["stmarys"]["roles"]["mixed"] = {
        "models": ["local/*", "openai/gpt-4o-mini", "openai/o*"],
    }
    # local models and priced ones the globs allow, the role's literal entries, then allowed aliases; not
    # listed: openai/o3-mini (allowed by a glob, unpriced, only a fallback target), openai/gpt-4o (priced,
    # no glob of the role allows it), the alias "claude" (its target is not allowed)
    assert _listing(document, "stmarys", "mixed") == [
        "local/demo",
        "local/tiny",
        "openai/gpt-4o-mini",
        "cloud",
        "summary",
    ]
    document["pricing"]["openai/o3-mini"] = {"input_per_mtok": 0, "output_per_mtok": 0}
    assert "openai/o3-mini" in _listing(document, "stmarys", "mixed")  # a price of 0 lists it
    assert _listing(document, "stmarys", "nobody") == []
    engine = PolicyEngine(parse_policy(json.dumps(document).encode()))
    assert engine.allowed_models("stmarys", "mixed", now=engine.expires_at.timestamp()) == []
