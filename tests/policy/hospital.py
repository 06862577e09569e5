"""The hospital policy the decision tests share: five stmarys roles (radiology, billing, research,
triage-bot, public-web) and northside's er, over local, anthropic, openai and openrouter routes, with
aliases, fallbacks, tools, prompt rules, limits and budgets; and builders for its variants and requests."""

from __future__ import annotations

import copy
import json
from typing import Any

from appliance.policy.engine import RequestFacts
from appliance.policy.schema import Policy
from tests.policy.test_fixtures import NOW, SHA, SITE

T = NOW.timestamp()
SM = "organizations.stmarys.roles"

HOSPITAL: dict[str, Any] = {
    "version": 12,
    "issued_at": "2026-11-25T00:00:00Z",
    "expires_at": "2027-02-25T00:00:00Z",
    "scope": {"sites": [SITE]},
    "routes": {
        "local": {"kind": "local", "data_classes": ["phi", "deidentified", "public"]},
        "anthropic": {
            "kind": "anthropic",
            "base_url": "https://api.anthropic.com",
            "data_classes": ["phi", "deidentified", "public"],
        },
        "openai": {
            "kind": "openai",
            "base_url": "https://api.openai.com/v1",
            "data_classes": ["deidentified", "public"],
        },
        "openrouter": {
            "kind": "openai",
            "base_url": "https://openrouter.ai/api/v1",
            "data_classes": ["public"],
        },
    },
    "models": {
        "local/demo": {"file": "demo.gguf", "sha256": SHA},
        "local/tiny": {"file": "tiny.gguf", "sha256": SHA},
        "local/llama-3-8b": {"file": "llama-3-8b.gguf", "sha256": SHA, "n_ctx": 8192},
    },
    "aliases": {
        "clinical-summary": "local/llama-3-8b",
        "fast": "openai/gpt-4o-mini",
        "cheap-cloud": "openrouter/meta-llama/llama-3-70b",
    },
    "fallbacks": {
        "local/llama-3-8b": ["anthropic/claude-3-5-sonnet", "openai/gpt-4o", "local/tiny"],
        "anthropic/claude-3-5-sonnet": ["local/llama-3-8b", "openai/gpt-4o"],
    },
    "organizations": {
        "stmarys": {
            "budgets": {"usd_per_month": 10000},
            "roles": {
                "radiology": {
                    "models": ["local/*", "anthropic/claude-*"],
                    "default_data_class": "phi",
                    "tools": {"allow": ["dicom_*", "lookup_study"]},
                    "prompt": {"max_tokens": 2048, "max_messages": 50},
                    "limits": {"per_caller": {"requests_per_min": 60, "tokens_per_min": 20000}},
                    "budgets": {"per_caller": {"usd_per_day": 5}, "per_role": {"usd_per_month": 2000}},
                },
                "billing": {
                    "models": ["local/demo", "openai/gpt-4o-mini"],
                    "declarable_data_classes": ["deidentified"],
                    "tools": {"allow": ["icd10_lookup", "cpt_*"], "on_violation": "drop"},
                    "prompt": {
                        "deny_patterns": [{"id": "ssn", "pattern": r"\b\d{3}-\d{2}-\d{4}\b"}],
                        "max_chars": 4000,
                    },
                },
                "research": {
                    "models": ["openai/*", "openrouter/*", "local/*", "anthropic/*"],
                    "default_data_class": "deidentified",
                    "declarable_data_classes": ["public"],
                    "prompt": {
                        "deny_patterns": [
                            {"id": "mrn", "pattern": r"(?i)\bMRN[:#]?\s{0,4}\d{6,10}\b"},
                            {
                                "id": "injection",
                                "pattern": r"(?i)ignore\s{1,3}(?:all\s{1,3})?previous\s{1,3}instructions",
                            },
                        ]
                    },
                },
                "triage-bot": {
                    "models": ["local/llama-3-8b"],
                    "force_model": "local/llama-3-8b",
                    "tools": {"allow": []},
                    "prompt": {"max_tokens": 512},
                },
                "public-web": {
                    "models": ["openrouter/*", "openai/gpt-4o-mini"],
                    "default_data_class": "public",
                },
            },
        },
        "northside": {"roles": {"er": {"models": ["anthropic/claude-3-5-sonnet", "local/*"]}}},
    },
    "pricing": {"openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
}


def hospital(mutate: Any = None) -> Policy:
    document = copy.deepcopy(HOSPITAL)
    if mutate is not None:
        mutate(document)
    return Policy.model_validate_json(json.dumps(document), strict=True)


def facts(
    role: str, model: str, data_class: str | None = None, tools: tuple[str, ...] = (), **kw: Any
) -> RequestFacts:
    org = kw.pop("org", "stmarys")
    return RequestFacts(org, role, model, data_class, list(tools), **kw)


def role_change(name: str, **changes: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["organizations"]["stmarys"]["roles"][name].update(changes)

    return mutate
