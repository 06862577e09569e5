"""Policy decision cost per request: ``PolicyEngine.evaluate`` with a realistic bundle.

The bundle has 50 roles in 2 organizations and 200 role rules (model globs exact, ``prefix*`` and
``?``-globs; tool globs; deny patterns), 20 aliases and 10 fallback chains, signed and imported the way
the gateway does it. Requests are a mix of allowed and denied (each reason), with ~1.5 KB of chat text
and 0-3 tools. Reported: microseconds per ``evaluate`` for each kind and for the mix with ~370
characters of chat text, against the target (issue 4: at most 20 us); then how the deny-pattern scan
grows with text (stdlib ``re`` costs ~7-15 ns per character per pattern, the rest of the decision is
flat); then the bounded worst case of deny patterns over hostile text.

    .venv/bin/python -m bench.policy [--calls 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import signing_keys
from appliance.policy import dsse
from appliance.policy.engine import PolicyEngine, RequestFacts
from appliance.policy.importer import verify_bundle
from appliance.policy.schema import scan_limit
from appliance.policy.trust import TrustStore

TARGET_US = 20.0
SITE = "bench-site"
NOW = datetime(2026, 12, 1, tzinfo=UTC)
SHA = "ab" * 32
PATTERNS = [
    r"\b\d{3}-\d{2}-\d{4}\b",
    r"(?i)\bMRN[:#]?\s{0,4}\d{6,10}\b",
    r"(?i)ignore\s{1,3}(?:all\s{1,3})?previous\s{1,3}instructions",
    r"(?i)\bDOB[:]?\s{0,3}\d{1,2}/\d{1,2}/\d{2,4}",
    r"\b[A-Z]{2}\d{6}\b",
]
TURN = (
    "You are a clinical assistant. Summarise the attached radiology report for the referring physician, "
    "highlighting incidental findings and recommended follow-up. Keep it under 200 words. "
)  # ~180 chars, one chat turn, no deny-pattern hit
TEXT = TURN * 2
LONG = TURN * 8  # ~1.5 KB


def build_document() -> dict[str, Any]:
    routes = {
        "local": {"kind": "local", "data_classes": ["phi", "deidentified", "public"]},
        "anthropic": {
            "kind": "anthropic",
            "base_url": "https://api.anthropic.com",
            "data_classes": ["phi", "deidentified", "public"],
        },
        "openai": {"kind": "openai", "base_url": "https://api.openai.com/v1"},
        "vllm": {
            "kind": "openai",
            "base_url": "http://10.0.0.5:8000/v1",
            "auth": "none",
            "data_classes": ["phi"],
        },
    }
    models = {f"local/m{i}": {"file": f"m{i}.gguf", "sha256": SHA} for i in range(20)}
    organizations: dict[str, Any] = {}
    rules = 0
    for r in range(50):
        org = organizations.setdefault(f"org{r % 2}", {"roles": {}})
        globs = [f"local/m{r % 20}", ["anthropic/claude-*", "openai/gpt-4?-mini", "vllm/*"][r % 3]]
        role: dict[str, Any] = {
            "models": globs,
            "default_data_class": ["phi", "deidentified"][r % 2],
            "tools": {"allow": [f"tool{r}_*"], "on_violation": ["deny", "drop"][r % 2]},
            "prompt": {
                "deny_patterns": [{"id": f"p{r}", "pattern": PATTERNS[r % len(PATTERNS)]}],
                "max_tokens": 1024,
                "max_messages": 100,
            },
        }
        if r % 2:
            role["declarable_data_classes"] = ["public"]
        rules += len(globs) + 1 + 1  # model globs, one tool glob, one deny pattern
        org["roles"][f"role{r}"] = role
    assert rules == 200, rules
    return {
        "version": 1,
        "issued_at": "2026-11-25T00:00:00Z",
        "expires_at": "2027-11-25T00:00:00Z",
        "scope": {"sites": [SITE]},
        "routes": routes,
        "models": models,
        "organizations": organizations,
        "aliases": {f"alias{i}": f"local/m{i}" for i in range(20)},
        "fallbacks": {
            f"local/m{i}": [f"local/m{(i + 1) % 20}", "anthropic/claude-3-5-sonnet"] for i in range(10)
        },
        "pricing": {"openai/gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
    }


def import_engine(document: dict[str, Any]) -> PolicyEngine:
    """Sign and verify the bundle as ``policy import`` would, then build the engine."""
    with tempfile.TemporaryDirectory() as tmp:
        signing_keys.generate(Path(tmp) / "signer")
        signer = signing_keys.load_signing_key(Path(tmp) / "signer.key")
        trust = TrustStore.load(Path(tmp) / "trust.json")
        trust.add(Path(tmp) / "signer.pub")
        data = dsse.sign(json.dumps(document).encode(), [signer])
        started = time.perf_counter()
        vb = verify_bundle(data, trust, site=SITE, current_version=None, now=NOW)
        engine = PolicyEngine(vb.policy)
        ms = 1000 * (time.perf_counter() - started)
        print(f"bundle {len(data)} bytes: verify + parse + compile {ms:.1f} ms")
    return engine


def facts(role: int, model: str, **kw: Any) -> RequestFacts:
    kw.setdefault("text", TEXT)
    kw.setdefault("messages_text_len", len(kw["text"]))
    kw.setdefault("message_count", 3)
    return RequestFacts(f"org{role % 2}", f"role{role}", model, **kw)


CASES: list[tuple[str, RequestFacts, str]] = [
    ("allowed, exact glob, no tools", facts(0, "local/m0"), "allowed"),
    ("allowed, alias + clamp + 2 tools", facts(2, "alias2", tools=["tool2_a", "tool2_b"]), "allowed"),
    ("allowed, ?-glob, deidentified", facts(1, "openai/gpt-4o-mini", max_tokens=100), "allowed"),
    ("allowed, tools dropped", facts(3, "local/m3", tools=["tool3_x", "shell", "web"]), "allowed"),
    ("allowed, fallbacks filtered", facts(4, "local/m4", data_class="phi"), "allowed"),
    ("denied, model not allowed", facts(5, "local/m9"), "model_not_allowed"),
    (
        "denied, data class (phi to openai)",
        facts(7, "openai/gpt-4o-mini", data_class="phi"),
        "data_class_denied",
    ),
    ("denied, downgrade", facts(0, "local/m0", data_class="public"), "data_class_downgrade"),
    ("denied, tools", facts(6, "local/m6", tools=["shell"]), "tools_denied"),
    (
        "denied, deny pattern (late in text)",
        facts(0, "local/m0", text=TEXT + " SSN 123-45-6789"),
        "prompt_denied",
    ),
    ("denied, unknown role", RequestFacts("org0", "ghost", "local/m0"), "unknown_role"),
]
SCALING: list[tuple[str, RequestFacts]] = [
    ("allowed, 1 deny pattern, no text", facts(0, "local/m0", text="")),
    ("allowed, 1 deny pattern, 370 chars", facts(0, "local/m0")),
    ("allowed, 1 deny pattern, 1.5 KB", facts(0, "local/m0", text=LONG)),
    ("allowed, 1 deny pattern, 8 KB", facts(0, "local/m0", text=TURN * 44)),
]


def per_call_us(engine: PolicyEngine, items: list[RequestFacts], calls: int, now: float) -> float:
    evaluate = engine.evaluate
    rounds = max(1, calls // len(items))
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            for f in items:
                evaluate(f, now)
        samples.append((time.perf_counter() - started) / (rounds * len(items)) * 1e6)
    return min(samples)  # the least-disturbed run; the median is printed for the mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    engine = import_engine(build_document())
    now = NOW.timestamp()
    rows = []
    for name, f, reason in CASES:
        verdict = engine.evaluate(f, now)
        assert verdict.reason == reason, (name, verdict.reason, verdict.message)
        rows.append((name, reason, per_call_us(engine, [f], args.calls, now)))
    mix = [f for _, f, _ in CASES]
    mixed = [per_call_us(engine, mix, args.calls, now) for _ in range(3)]

    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'request':<{width}}{'reason':<22}{'us/evaluate':>12}")
    for name, reason, us in rows:
        print(f"{name:<{width}}{reason:<22}{us:>12.2f}")
    share = sum(1 for _, _, r in CASES if r == "allowed")
    label = f"mix ({share} allowed / {len(CASES) - share} denied)"
    print(f"{label:<{width}}{'':<22}{statistics.median(mixed):>12.2f}")
    worst = max(r[2] for r in rows)
    outcome = "meets" if worst <= TARGET_US else "MISSES"
    print(f"\ntarget <= {TARGET_US:g} us per evaluate: {outcome} (slowest kind {worst:.2f} us)")
    print(f"\n{'deny-pattern scan vs text length':<{width}}{'':<22}{'us/evaluate':>12}")
    for name, f in SCALING:
        print(f"{name:<{width}}{'':<22}{per_call_us(engine, [f], args.calls, now):>12.2f}")

    # Bounded worst case: the costliest admitted deny pattern over its full scan window of hostile text.
    hostile = build_document()
    worst_pattern = r"[a-z]{0,31}[a-z]{0,31}x"  # cost 1024, the cap
    hostile["organizations"]["org0"]["roles"]["role0"]["prompt"]["deny_patterns"] = [
        {"id": "slow", "pattern": worst_pattern}
    ]
    slow = import_engine(hostile)
    role = slow.role("org0", "role0")
    assert role is not None and role.prompt is not None
    limit = scan_limit(role.prompt)
    text = "a" * limit
    started = time.perf_counter()
    slow.evaluate(facts(0, "local/m0", text=text), now)
    ms = (time.perf_counter() - started) * 1000
    print(f"worst admitted deny pattern (cost 1024) over its {limit}-char scan window: {ms:.1f} ms")
    typical = "1" * 65536
    started = time.perf_counter()
    engine.evaluate(facts(1, "local/m1", text=typical), now)
    ms = (time.perf_counter() - started) * 1000
    print(f"typical deny pattern (MRN, cost 50) over 64 KiB of hostile digits: {ms:.1f} ms")


if __name__ == "__main__":
    main()
