"""PolicyEngine decisions, the /v1/models listing, prices, expiry, and the import change summary."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from appliance.policy.diff import summarize_change
from appliance.policy.engine import PolicyEngine, RequestFacts
from appliance.policy.schema import Policy, Price
from tests.policy.test_fixtures import DOC, NOW, doc, policy

T = NOW.timestamp()
ROLE = "organizations.stmarys.roles"
BILLING = RequestFacts("stmarys", "billing", "local/demo")


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(policy())


def open_routes(**changes: Any) -> Policy:
    """The sample policy with every route able to receive every data class: the model allow-list decides."""
    routes = copy.deepcopy(DOC["routes"])
    for route in routes.values():
        route["data_classes"] = ["phi", "deidentified", "public"]
    return policy(routes=routes, **changes)


@pytest.fixture(scope="module")
def allow_list() -> PolicyEngine:
    return PolicyEngine(open_routes())


# (org, role, model) -> (allowed, reason, rule, route_name, upstream_model), by the model allow-list alone
DECISIONS: list[tuple[str, str, str, bool, str, str | None, str | None, str | None]] = [
    ("stmarys", "radiology", "local/demo", True, "allowed", f"{ROLE}.radiology.models[0]", "local", "demo"),
    ("stmarys", "radiology", "local/other", True, "allowed", f"{ROLE}.radiology.models[0]", "local", "other"),
    (
        "stmarys",
        "radiology",
        "anthropic/claude-3-5-sonnet",
        True,
        "allowed",
        f"{ROLE}.radiology.models[1]",
        "anthropic",
        "claude-3-5-sonnet",
    ),
    (
        "stmarys",
        "radiology",
        "anthropic/Claude-3",
        False,
        "model_not_allowed",
        f"{ROLE}.radiology.models",
        "anthropic",
        "Claude-3",
    ),
    (
        "stmarys",
        "radiology",
        "openai/gpt-4o",
        False,
        "model_not_allowed",
        f"{ROLE}.radiology.models",
        "openai",
        "gpt-4o",
    ),
    ("stmarys", "billing", "local/demo", True, "allowed", f"{ROLE}.billing.models[0]", "local", "demo"),
    (
        "stmarys",
        "billing",
        "local/tiny",
        False,
        "model_not_allowed",
        f"{ROLE}.billing.models",
        "local",
        "tiny",
    ),
    (
        "stmarys",
        "billing",
        "local/demo2",
        False,
        "model_not_allowed",
        f"{ROLE}.billing.models",
        "local",
        "demo2",
    ),
    (
        "stmarys",
        "research",
        "openai/gpt-4o",
        True,
        "allowed",
        f"{ROLE}.research.models[0]",
        "openai",
        "gpt-4o",
    ),
    (
        "stmarys",
        "research",
        "openai/o1-mini",
        True,
        "allowed",
        f"{ROLE}.research.models[2]",
        "openai",
        "o1-mini",
    ),
    (
        "stmarys",
        "research",
        "openai/o1x-mini",
        True,
        "allowed",
        f"{ROLE}.research.models[3]",
        "openai",
        "o1x-mini",
    ),
    ("stmarys", "research", "anthropic/x", True, "allowed", f"{ROLE}.research.models[3]", "anthropic", "x"),
    ("stmarys", "research", "mistral/large", False, "unknown_route", None, None, None),
    ("stmarys", "nobody", "local/demo", False, "unknown_role", None, None, None),
    ("northside", "radiology", "local/demo", False, "unknown_role", None, None, None),
    ("stmarys", "radiology", "demo", False, "bad_model_name", None, None, None),
    ("stmarys", "radiology", "local/", False, "bad_model_name", None, None, None),
    ("stmarys", "radiology", "/demo", False, "bad_model_name", None, None, None),
    ("stmarys", "radiology", "local/../demo", False, "bad_model_name", None, None, None),
    ("stmarys", "radiology", "local/a b", False, "bad_model_name", None, None, None),
    ("stmarys", "radiology", "local/" + "x" * 200, False, "bad_model_name", None, None, None),
    (
        "northside",
        "er",
        "anthropic/claude-3-5-sonnet",
        True,
        "allowed",
        "organizations.northside.roles.er.models[0]",
        "anthropic",
        "claude-3-5-sonnet",
    ),
    (
        "northside",
        "er",
        "openai/meta-llama/llama-3-70b",
        True,
        "allowed",
        "organizations.northside.roles.er.models[1]",
        "openai",
        "meta-llama/llama-3-70b",
    ),
    (
        "northside",
        "er",
        "anthropic/claude-3-opus",
        False,
        "model_not_allowed",
        "organizations.northside.roles.er.models",
        "anthropic",
        "claude-3-opus",
    ),
]


@pytest.mark.parametrize(
    ("org", "role", "model", "allowed", "reason", "rule", "route_name", "upstream"),
    DECISIONS,
    ids=[f"{d[0]}/{d[1]}:{d[2][:30]}" for d in DECISIONS],
)
def test_model_allow_list(
    allow_list: PolicyEngine,
    org: str,
    role: str,
    model: str,
    allowed: bool,
    reason: str,
    rule: str | None,
    route_name: str | None,
    upstream: str | None,
) -> None:
    decision = allow_list.evaluate(RequestFacts(org, role, model), T)
    assert (decision.allowed, decision.reason, decision.rule) == (allowed, reason, rule)
    assert (decision.route_name, decision.upstream_model) == (route_name, upstream)
    if route_name is not None:
        assert decision.route is allow_list.policy.routes[route_name]
    if not allowed:
        globs = {g for o in DOC["organizations"].values() for r in o["roles"].values() for g in r["models"]}
        assert not any(g in decision.message for g in globs if "*" in g or "?" in g)
    assert len(decision.message) < 200


def test_first_glob_in_policy_order_is_the_rule() -> None:
    roles = {
        "wide_first": {"models": ["openai/*", "openai/gpt-4o"]},
        "exact_first": {"models": ["openai/gpt-4o", "openai/*"]},
        "regex_after_exact": {"models": ["openai/gpt-4o", "open*/gpt-4?"]},
    }
    with pytest.raises(ValueError, match="provider must be a route name"):
        policy(organizations={"o": {"roles": roles}})
    del roles["regex_after_exact"]
    roles["question_first"] = {"models": ["openai/gpt-4?", "openai/gpt-4o"]}
    eng = PolicyEngine(open_routes(organizations={"o": {"roles": roles}}))
    rules = {name: eng.evaluate(RequestFacts("o", name, "openai/gpt-4o"), T).rule for name in roles}
    assert rules == {
        "wide_first": "organizations.o.roles.wide_first.models[0]",
        "exact_first": "organizations.o.roles.exact_first.models[0]",
        "question_first": "organizations.o.roles.question_first.models[0]",
    }


def test_role_lookup(engine: PolicyEngine) -> None:
    role = engine.role("stmarys", "radiology")
    assert (
        role is not None
        and role.models == ["local/*", "anthropic/claude-*"]
        and role.default_data_class == "phi"
    )
    assert engine.role("stmarys", "er") is None and engine.role("northside", "er") is not None


@pytest.mark.parametrize(
    ("org", "role", "expected"),
    [
        ("stmarys", "radiology", ["anthropic/claude-3-5-haiku", "local/demo", "local/tiny"]),
        ("stmarys", "billing", ["local/demo"]),
        ("stmarys", "research", ["anthropic/claude-3-5-haiku", "local/demo", "local/tiny", "openai/gpt-4o"]),
        ("northside", "er", ["anthropic/claude-3-5-sonnet", "openai/gpt-4o"]),
        ("northside", "nobody", []),
    ],
)
def test_allowed_models(engine: PolicyEngine, org: str, role: str, expected: list[str]) -> None:
    assert engine.allowed_models(org, role, now=T) == expected


def test_price(engine: PolicyEngine) -> None:
    assert engine.price("openai/gpt-4o") == Price(input_per_mtok=2.5, output_per_mtok=10.0)
    assert engine.price("local/demo") is None and engine.price("gpt-4o") is None


def test_attributes(engine: PolicyEngine) -> None:
    assert engine.version == 7 and engine.expires_at == datetime(2027, 2, 25, tzinfo=UTC)


def test_expiry_denies_everything_on_the_wall_clock() -> None:
    now = datetime.now(UTC)
    live = PolicyEngine(
        policy(issued_at=_iso(now - timedelta(days=1)), expires_at=_iso(now + timedelta(hours=1)))
    )
    assert live.evaluate(BILLING).allowed
    assert live.allowed_models("stmarys", "billing") == ["local/demo"]
    dead = PolicyEngine(
        policy(issued_at=_iso(now - timedelta(days=2)), expires_at=_iso(now - timedelta(seconds=1)))
    )
    decision = dead.evaluate(BILLING)
    assert (decision.allowed, decision.reason, decision.rule) == (False, "policy_expired", "expires_at")
    assert "expired" in decision.message and dead.allowed_models("stmarys", "billing") == []


def test_expiry_boundary(engine: PolicyEngine) -> None:
    end = engine.expires_at.timestamp()
    assert engine.evaluate(BILLING, now=end - 0.001).allowed
    assert engine.evaluate(BILLING, now=end).reason == "policy_expired"


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_summarize_first_policy() -> None:
    lines = summarize_change(None, policy())
    assert lines[:3] == [
        "version: none -> v7 (first policy)",
        "expires: 2027-02-25T00:00:00Z",
        "sites: stmarys-main, stmarys-annex",
    ]
    assert (
        "route added: local (local in-process; auth none; receives phi, deidentified, public; timeout 2 min)"
        in lines
    )
    assert "role added: stmarys/billing (models local/demo; default data class phi)" in lines
    assert "price added: openai/gpt-4o ($2.50 in / $10.00 out per Mtok)" in lines


def test_summarize_changes() -> None:
    new: dict[str, Any] = doc(version=8, expires_at="2027-03-01T00:00:00Z")
    del new["routes"]["anthropic"]
    new["routes"]["openai"]["base_url"] = "https://llm.stmarys.local/v1"
    new["routes"]["vllm"] = {"kind": "openai", "base_url": "http://10.0.0.5:8000/v1", "auth": "none"}
    new["organizations"]["stmarys"]["roles"]["radiology"]["models"] = ["local/*", "vllm/*"]
    del new["organizations"]["northside"]
    new["organizations"]["stmarys"]["roles"]["billing"]["default_data_class"] = "deidentified"
    new["pricing"] = {"openai/gpt-4o": {"input_per_mtok": 2.0, "output_per_mtok": 8.0}}
    new["models"]["local/tiny"]["n_ctx"] = 4096
    assert summarize_change(policy(), Policy.model_validate(new)) == [
        "version: v7 -> v8",
        "expires: 2027-02-25T00:00:00Z -> 2027-03-01T00:00:00Z",
        "route removed: anthropic",
        "route changed: openai (base_url https://api.openai.com/v1 -> https://llm.stmarys.local/v1)",
        "route added: vllm (openai http://10.0.0.5:8000/v1; auth none; receives deidentified, public; "
        "timeout 2 min)",
        "local model changed: local/tiny (n_ctx 2048 -> 4096)",
        "role removed: northside/er",
        "role changed: stmarys/billing (default_data_class phi -> deidentified)",
        "role changed: stmarys/radiology (models local/*, anthropic/claude-* -> local/*, vllm/*)",
        "price removed: anthropic/claude-3-5-haiku",
        "price changed: openai/gpt-4o (input_per_mtok $2.50 -> $2.00; output_per_mtok $10.00 -> $8.00)",
    ]


def test_summarize_same_content_new_version() -> None:
    assert summarize_change(policy(), policy(version=8)) == ["version: v7 -> v8"]
