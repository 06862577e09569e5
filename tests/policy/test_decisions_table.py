"""PolicyEngine.evaluate: the table of decisions (role x model x data class x tools), organizations, expiry,
and the verdict's shape for the pipeline."""

from __future__ import annotations

import pytest

from appliance.policy.engine import INTERVENTIONS, REASONS, PolicyEngine, Verdict
from tests.policy.hospital import SM, T, facts, hospital


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(hospital())


Row = tuple[str, str, str | None, tuple[str, ...], bool, str, str | None, str, str]
TABLE: list[Row] = [
    ("radiology", "local/demo", None, (), True, "allowed", f"{SM}.radiology.models[0]", "local/demo", "phi"),
    ("radiology", "local/demo", "phi", (), True, "allowed", f"{SM}.radiology.models[0]", "local/demo", "phi"),
    (
        "radiology",
        "anthropic/claude-3-5-sonnet",
        None,
        (),
        True,
        "allowed",
        f"{SM}.radiology.models[1]",
        "anthropic/claude-3-5-sonnet",
        "phi",
    ),
    (
        "radiology",
        "openai/gpt-4o",
        None,
        (),
        False,
        "model_not_allowed",
        f"{SM}.radiology.models",
        "openai/gpt-4o",
        "phi",
    ),
    (
        "radiology",
        "local/demo",
        "public",
        (),
        False,
        "data_class_downgrade",
        f"{SM}.radiology.default_data_class",
        "local/demo",
        "public",
    ),
    (
        "radiology",
        "local/demo",
        "secret",
        (),
        False,
        "data_class_denied",
        None,
        "local/demo",
        "phi",
    ),
    (
        "radiology",
        "local/demo",
        None,
        ("dicom_fetch", "lookup_study"),
        True,
        "allowed",
        f"{SM}.radiology.models[0]",
        "local/demo",
        "phi",
    ),
    (
        "radiology",
        "local/demo",
        None,
        ("dicom_fetch", "shell"),
        False,
        "tools_denied",
        f"{SM}.radiology.tools.allow",
        "local/demo",
        "phi",
    ),
    (
        "radiology",
        "clinical-summary",
        None,
        (),
        True,
        "allowed",
        f"{SM}.radiology.models[0]",
        "local/llama-3-8b",
        "phi",
    ),
    ("radiology", "no-such-alias", None, (), False, "bad_model_name", None, "no-such-alias", "phi"),
    ("radiology", "mistral/large", None, (), False, "unknown_route", None, "mistral/large", "phi"),
    (
        "billing",
        "openai/gpt-4o-mini",
        None,
        (),
        False,
        "data_class_denied",
        "routes.openai.data_classes",
        "openai/gpt-4o-mini",
        "phi",
    ),
    (
        "billing",
        "openai/gpt-4o-mini",
        "deidentified",
        (),
        True,
        "allowed",
        f"{SM}.billing.models[1]",
        "openai/gpt-4o-mini",
        "deidentified",
    ),
    (
        "billing",
        "fast",
        "deidentified",
        (),
        True,
        "allowed",
        f"{SM}.billing.models[1]",
        "openai/gpt-4o-mini",
        "deidentified",
    ),
    (
        "billing",
        "openai/gpt-4o-mini",
        "public",
        (),
        False,
        "data_class_downgrade",
        f"{SM}.billing.declarable_data_classes",
        "openai/gpt-4o-mini",
        "public",
    ),
    (
        "billing",
        "local/demo",
        "deidentified",
        (),
        True,
        "allowed",
        f"{SM}.billing.models[0]",
        "local/demo",
        "deidentified",
    ),
    (
        "billing",
        "local/demo",
        None,
        ("icd10_lookup", "web_search"),
        True,
        "allowed",
        f"{SM}.billing.models[0]",
        "local/demo",
        "phi",
    ),
    (
        "billing",
        "clinical-summary",
        None,
        (),
        False,
        "model_not_allowed",
        f"{SM}.billing.models",
        "local/llama-3-8b",
        "phi",
    ),
    (
        "research",
        "openai/gpt-4o",
        None,
        (),
        True,
        "allowed",
        f"{SM}.research.models[0]",
        "openai/gpt-4o",
        "deidentified",
    ),
    (
        "research",
        "openai/gpt-4o",
        "phi",
        (),
        False,
        "data_class_denied",
        "routes.openai.data_classes",
        "openai/gpt-4o",
        "phi",
    ),
    (
        "research",
        "anthropic/claude-3-5-sonnet",
        "phi",
        (),
        True,
        "allowed",
        f"{SM}.research.models[3]",
        "anthropic/claude-3-5-sonnet",
        "phi",
    ),
    (
        "research",
        "openrouter/meta-llama/llama-3-70b",
        None,
        (),
        False,
        "data_class_denied",
        "routes.openrouter.data_classes",
        "openrouter/meta-llama/llama-3-70b",
        "deidentified",
    ),
    (
        "research",
        "cheap-cloud",
        "public",
        (),
        True,
        "allowed",
        f"{SM}.research.models[1]",
        "openrouter/meta-llama/llama-3-70b",
        "public",
    ),
    (
        "research",
        "local/tiny",
        None,
        ("anything",),
        True,
        "allowed",
        f"{SM}.research.models[2]",
        "local/tiny",
        "deidentified",
    ),
    (
        "public-web",
        "openai/gpt-4o-mini",
        None,
        (),
        True,
        "allowed",
        f"{SM}.public-web.models[1]",
        "openai/gpt-4o-mini",
        "public",
    ),
    (
        "public-web",
        "openai/gpt-4o-mini",
        "phi",
        (),
        False,
        "data_class_denied",
        "routes.openai.data_classes",
        "openai/gpt-4o-mini",
        "phi",
    ),
    (
        "public-web",
        "local/demo",
        None,
        (),
        False,
        "model_not_allowed",
        f"{SM}.public-web.models",
        "local/demo",
        "public",
    ),
    (
        "triage-bot",
        "openai/gpt-4o",
        None,
        (),
        True,
        "allowed",
        f"{SM}.triage-bot.models[0]",
        "local/llama-3-8b",
        "phi",
    ),
    (
        "triage-bot",
        "garbage",
        None,
        (),
        True,
        "allowed",
        f"{SM}.triage-bot.models[0]",
        "local/llama-3-8b",
        "phi",
    ),
    (
        "triage-bot",
        "local/llama-3-8b",
        None,
        ("web_search",),
        False,
        "tools_denied",
        f"{SM}.triage-bot.tools.allow",
        "local/llama-3-8b",
        "phi",
    ),
    ("nobody", "local/demo", None, (), False, "unknown_role", None, "local/demo", "phi"),
]


@pytest.mark.parametrize(
    ("role", "model", "data_class", "tools", "allowed", "reason", "rule", "used", "effective"),
    TABLE,
    ids=[f"{r[0]}:{r[1]}:{r[2]}:{','.join(r[3])}" for r in TABLE],
)
def test_decision_table(
    engine: PolicyEngine,
    role: str,
    model: str,
    data_class: str | None,
    tools: tuple[str, ...],
    allowed: bool,
    reason: str,
    rule: str | None,
    used: str,
    effective: str,
) -> None:
    verdict = engine.evaluate(facts(role, model, data_class, tools), now=T)
    assert (verdict.allowed, verdict.reason, verdict.rule) == (allowed, reason, rule)
    assert (verdict.model, verdict.data_class) == (used, effective)
    assert verdict.reason in REASONS
    assert all(i.reason in INTERVENTIONS for i in verdict.interventions)
    if allowed:
        provider, _, upstream = used.partition("/")
        assert (verdict.route_name, verdict.upstream_model) == (provider, upstream)
        assert verdict.route is engine.policy.routes[provider]
        assert verdict.data_class in verdict.route.data_classes
    else:
        assert verdict.fallbacks == [] and verdict.drop_tools == []
    assert len(verdict.message) < 200
    for glob in ("dicom_*", "local/*", "anthropic/claude-*", "cpt_*", r"\d{3}"):
        assert glob not in verdict.message  # another rule's allow-list or pattern never reaches the caller


def test_northside_is_a_separate_organization(engine: PolicyEngine) -> None:
    ok = engine.evaluate(facts("er", "local/tiny", "phi", org="northside"), now=T)
    assert (ok.allowed, ok.rule) == (True, "organizations.northside.roles.er.models[1]")
    assert engine.evaluate(facts("er", "local/tiny", org="stmarys"), now=T).reason == "unknown_role"


def test_expired_policy_denies_with_its_rule(engine: PolicyEngine) -> None:
    end = engine.expires_at.timestamp()
    assert engine.evaluate(facts("radiology", "local/demo"), now=end - 1).allowed
    verdict = engine.evaluate(facts("radiology", "local/demo"), now=end)
    assert (verdict.allowed, verdict.reason, verdict.rule) == (False, "policy_expired", "expires_at")


def test_the_allow_list_is_checked_after_aliases_and_before_the_data_class(engine: PolicyEngine) -> None:
    """The model allow-list names its rule; it sees the model an alias names, and answers first."""
    verdict = engine.evaluate(facts("billing", "openai/gpt-4o-mini", "deidentified"), now=T)
    assert (verdict.allowed, verdict.rule) == (True, f"{SM}.billing.models[1]")
    assert engine.evaluate(facts("radiology", "clinical"), now=T).reason == "bad_model_name"  # no alias
    verdict = engine.evaluate(facts("billing", "openai/gpt-4o", "public"), now=T)  # not the downgrade
    assert (verdict.reason, verdict.rule) == ("model_not_allowed", f"{SM}.billing.models")
    verdict = engine.evaluate(facts("radiology", "clinical-summary"), now=T)
    assert (verdict.allowed, verdict.rule) == (True, f"{SM}.radiology.models[0]")


def test_verdict_shape_for_the_pipeline(engine: PolicyEngine) -> None:
    verdict = engine.evaluate(
        facts("billing", "local/demo", "deidentified", ("web_search",), max_tokens=10), now=T
    )
    assert isinstance(verdict, Verdict)
    assert verdict.message == f"allowed by {SM}.billing.models[0]"
    assert verdict.max_tokens == 10 and verdict.drop_tools == ["web_search"]
