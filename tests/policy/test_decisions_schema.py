"""The policy fields the decisions read: their schema checks, deny-pattern safety (cost, scan limit,
hostile text), and the import summary of the new sections."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.errors import BundleRejected
from appliance.policy.diff import summarize_change
from appliance.policy.engine import PolicyEngine
from appliance.policy.schema import (
    MAX_PATTERN_COST,
    SCAN_BUDGET,
    check_deny_pattern,
    parse_policy,
    scan_limit,
)
from tests.policy.hospital import HOSPITAL, T, facts, hospital, role_change

# -- schema of the new fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["aliases"].update({"a/b": "local/demo"}), "aliases"),
        (
            lambda d: d["aliases"].update({"x": "mistral/large"}),
            "aliases.x: 'mistral/large' names undefined route",
        ),
        (
            lambda d: d["aliases"].update({"x": "local/ghost"}),
            "aliases.x: 'local/ghost' names a local model not",
        ),
        (lambda d: d["aliases"].update({"x": "local"}), "aliases.x: 'local' is not a valid"),
        (lambda d: d["fallbacks"].update({"local/demo": ["mistral/x"]}), "fallbacks.local/demo[0]"),
        (lambda d: d["fallbacks"].update({"local/demo": ["local/demo"]}), "distinct and differ"),
        (
            lambda d: d["fallbacks"].update({"local/demo": ["local/tiny", "local/tiny"]}),
            "distinct and differ",
        ),
        (lambda d: d["fallbacks"].update({"nope/x": []}), "fallbacks: 'nope/x' names undefined route"),
        (
            role_change("billing", force_model="anthropic/claude-3"),
            "force_model: 'anthropic/claude-3' is not allowed",
        ),
        (role_change("billing", force_model="local/ghost"), "names a local model not listed"),
        (role_change("billing", declarable_data_classes=["secret"]), "declarable_data_classes[0]"),
        (role_change("billing", tools={"allow": ["a b"]}), "is not a tool name glob"),
        (role_change("billing", tools={"allow": [], "on_violation": "warn"}), "on_violation"),
        (role_change("billing", tools={"allow": [], "extra": 1}), "tools.extra: unknown field"),
        (role_change("billing", prompt={"max_tokens": 0}), "prompt.max_tokens"),
        (role_change("billing", prompt={"max_chars": -1}), "prompt.max_chars"),
        (role_change("billing", prompt={"deny_patterns": [{"id": "a", "pattern": "x"}] * 2}), "unique"),
        (
            role_change("billing", prompt={"deny_patterns": [{"id": "a", "pattern": r"\d+"}]}),
            "unbounded repeats",
        ),
        (
            role_change("billing", limits={"per_caller": {"requests_per_min": 0}}),
            "limits.per_caller.requests_per_min",
        ),
        (role_change("billing", budgets={"per_role": {"usd_per_day": -1}}), "budgets.per_role.usd_per_day"),
        (
            lambda d: d["organizations"]["stmarys"].update(budgets={"usd_per_week": 1}),
            "usd_per_week: unknown field",
        ),
    ],
)
def test_new_fields_are_checked(mutate: Any, fragment: str) -> None:
    document = copy.deepcopy(HOSPITAL)
    mutate(document)
    with pytest.raises(BundleRejected) as info:
        parse_policy(json.dumps(document).encode())
    assert info.value.check == "schema" and fragment in str(info.value)


def test_limits_and_budgets_are_carried() -> None:
    policy = hospital()
    radiology = policy.organizations["stmarys"].roles["radiology"]
    assert radiology.limits is not None and radiology.limits.per_caller is not None
    assert radiology.limits.per_caller.requests_per_min == 60
    assert radiology.budgets is not None and radiology.budgets.per_role is not None
    assert radiology.budgets.per_role.usd_per_month == 2000
    budgets = policy.organizations["stmarys"].budgets
    assert budgets is not None and budgets.usd_per_month == 10000


def test_old_documents_still_parse_unchanged() -> None:
    from tests.policy.test_fixtures import policy as sample

    p = sample()
    assert p.aliases == {} and p.fallbacks == {} and p.trust is None
    role = p.organizations["stmarys"].roles["billing"]
    assert role.tools is None and role.prompt is None and role.force_model is None


# -- deny pattern safety --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "cost"),
    [
        (r"\b\d{3}-\d{2}-\d{4}\b", 1),
        (r"(?i)\bMRN[:#]?\s{0,4}\d{6,10}\b", 50),
        (r"(?:\d{1,3}\.){3}\d{1,3}", 81),
        (r"(?i)ignore\s{1,8}(?:all\s{1,8})?previous\s{1,8}instructions", 576),
        (r"(?=secret)\w{0,9}", 10),
        (r"x{1,4}+y", 4),
        (r"(a|b|c)", 1),  # single characters: the parser makes a class of them
        (r"(?:yes|no|maybe)", 3),
    ],
)
def test_safe_patterns_and_their_cost(pattern: str, cost: int) -> None:
    assert check_deny_pattern(pattern) == cost


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        (r"\d+\s", "unbounded repeats"),
        (r"a*b", "unbounded repeats"),
        (r"x{3,}", "unbounded repeats"),
        (r".*?x", "unbounded repeats"),
        (r"a{0,300}", "at most 256"),
        (r"(a|aa){1,64}", "backtracking cost"),
        (r"(\d{1,3}){20}", "backtracking cost"),
        (r"(?:ab|cd){0,20}", "backtracking cost"),
        (r"[a-z]{0,31}[a-z]{0,31}[a-z]{0,31}x", "backtracking cost"),
        (r"(a)\1", "backreferences"),
        (r"(?P<x>a)?(?(x)b|c)", "conditionals"),
        (r"[", "not a valid regular expression"),
        (r"(?<=a{1,3})b", "not a valid regular expression"),  # look-behind must be fixed width
    ],
)
def test_unsafe_patterns_are_refused(pattern: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        check_deny_pattern(pattern)


def test_a_role_may_not_spend_more_than_the_cost_budget() -> None:
    pattern = r"(?i)ignore\s{1,8}(?:all\s{1,8})?previous\s{1,8}instructions"  # 576 each
    prompt = {"deny_patterns": [{"id": "a", "pattern": pattern}, {"id": "b", "pattern": pattern}]}
    with pytest.raises(ValidationError, match=f"backtracking cost 1152 is above {MAX_PATTERN_COST}"):
        hospital(role_change("billing", prompt=prompt))


def test_worst_admitted_pattern_on_hostile_text_is_bounded() -> None:
    """The costliest admitted pattern over its whole scan window of worst-case text stays bounded."""
    pattern = r"[a-z]{0,31}[a-z]{0,31}x"  # cost 32 * 32 = 1024, the cap
    prompt = {"deny_patterns": [{"id": "slow", "pattern": pattern}]}
    engine = PolicyEngine(hospital(role_change("billing", prompt=prompt)))
    role = engine.role("stmarys", "billing")
    assert role is not None and role.prompt is not None
    limit = scan_limit(role.prompt)
    assert limit == SCAN_BUDGET // 1024
    started = time.perf_counter()
    verdict = engine.evaluate(facts("billing", "local/demo", text="a" * limit), now=T)
    elapsed = time.perf_counter() - started
    assert verdict.allowed and elapsed < 1.0  # ~20-60 ms; generous for slow CI machines


# -- import summary -------------------------------------------------------------------------------------


def test_summary_lists_the_new_sections() -> None:
    from tests.policy.test_fixtures import policy as sample

    lines = summarize_change(sample(), hospital())
    assert "alias added: clinical-summary (local/llama-3-8b)" in lines
    assert (
        "fallbacks added: local/llama-3-8b (anthropic/claude-3-5-sonnet, openai/gpt-4o, local/tiny)" in lines
    )
    assert "organization budgets added: stmarys ($10,000.00/month)" in lines
    assert (
        "role added: stmarys/triage-bot (models local/llama-3-8b; default data class phi; forced to "
        "local/llama-3-8b; tools allow: no tools (on violation: deny); prompt max_tokens clamp 512)"
    ) in lines
    assert any(
        line.startswith("role changed: stmarys/billing (")
        and "declarable_data_classes none -> deidentified" in line
        for line in lines
    )
