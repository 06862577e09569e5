"""The README is the operator's manual: every command, setting and audit field must appear in it."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from pydantic import BaseModel

from appliance.admin.endpoints import all_routes
from appliance.cli import main
from appliance.config import Settings
from appliance.ledger.store import Ledger

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            names += _commands(command, f"{prefix}{name} ")
        else:
            names.append(f"{prefix}{name}")
    return names


def _settings(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _settings(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_cli_command_is_documented() -> None:
    missing = [c for c in _commands(main) if f"`{c}" not in README and f"phi-gateway {c}" not in README]
    assert not missing, f"README lacks: {missing}"


def test_every_admin_endpoint_is_documented() -> None:
    section = README.partition("### The admin API")[2].partition("\n### Metrics")[0]
    missing = [f"{method} {path}" for method, path in all_routes() if f"`{method} {path}" not in section]
    assert not missing, f"README's admin API lacks: {missing}"


def test_every_metric_is_documented() -> None:
    section = README.partition("\n### Metrics")[2].partition("\n### ")[0]
    samples = [re.split(r"[ {]", line, maxsplit=1)[0] for line in _metrics_text().splitlines()]
    names = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for name in samples
        if name.startswith("phi_") and not name.endswith("_created")
    }
    missing = sorted(name for name in names if f"`{name}`" not in section)
    assert not missing, f"README's metrics lack: {missing}"


def _metrics_text() -> str:
    """Every metric the gateway can expose: its activity's families and its gauges, a local model included."""
    from prometheus_client import CollectorRegistry, generate_latest

    from appliance.activity import Activity
    from appliance.metrics import GatewayMetrics

    class _Keeper:
        current = None
        reason = "none"

        def remaining_s(self) -> None:
            return None

    class _Ledger:
        healthy, owed_outcomes, dropped_lines = True, 0, 0

        def count(self) -> int:
            return 1

    registry = CollectorRegistry(auto_describe=False)
    activity = Activity(registry)
    activity.take([({"type": "response", "decision": "allowed", "status_code": 200, "latency_ms": 1.0}, 1)])
    activity.take([({"type": "error", "decision": "denied", "status_code": 401}, 2)])
    activity.first_byte("openai", 0.1)
    row = {
        "state": "ready",
        "queue_depth": 0,
        "active": 0,
        "slots": 1,
        "generated_tokens": 1,
        "prompt_tokens": 1,
    }
    metrics = GatewayMetrics(
        _Keeper(),  # type: ignore[arg-type]
        _Ledger(),  # type: ignore[arg-type]
        lambda: 0,
        lambda: {"tls": True, "not_after": "2030-01-01T00:00:00Z"},
        registry=registry,
        activity=activity,
        local=lambda: {"local/tiny": row},
        last_checkpoint=lambda: {"size": 1, "at": "2026-01-01T00:00:00.000Z", "reason": "manual"},
    )
    activity.tokens_in.labels("openai", "m").inc()
    activity.tokens_out.labels("openai", "m").inc()
    activity.cost.labels("openai", "m").inc()
    return bytes(generate_latest(metrics.registry)).decode()


def test_every_setting_is_documented() -> None:
    missing = [
        k
        for k in _settings(Settings)
        if f"`{k}`" not in README and not re.search(rf"`{re.escape(k)}`", README)
    ]
    assert not missing, f"README lacks settings: {missing}"


def test_every_audit_field_is_documented() -> None:
    missing = [f for f in (*Ledger.FIELDS, "seq") if f"`{f}`" not in README]
    assert not missing, f"README lacks audit fields: {missing}"


def test_readme_has_exactly_two_setup_commands() -> None:
    blocks = re.findall(r"```\n(\./dev \w+)\n```", README)
    assert blocks == ["./dev demo", "./dev test"]


def test_the_code_map_names_every_package_and_module() -> None:
    root = Path(__file__).resolve().parent.parent
    code_map = README.partition("## Code map")[2].partition("\n## ")[0]
    packages = [p for p in (root / "appliance").iterdir() if (p / "__init__.py").exists()]
    missing = [f"appliance/{p.name}/" for p in packages if f"`appliance/{p.name}/`" not in code_map]
    for package in ("ledger", "pipeline", "cli", "http"):
        for module in sorted((root / "appliance" / package).glob("*.py")):
            if module.stem != "__init__" and f"`{module.stem}`" not in code_map:
                missing.append(f"appliance/{package}/{module.name}")
    for module in sorted((root / "appliance").glob("*.py")):
        if module.stem not in ("__init__", "__main__") and f"`{module.stem}`" not in code_map:
            if f"`appliance/{module.name}`" not in code_map:
                missing.append(f"appliance/{module.name}")
    assert not missing, f"README's code map lacks: {missing}"


# -- the policy reference and the README's policies -------------------------------------------------------


def test_the_policy_reference_is_generated_from_the_schema() -> None:
    from appliance.policy import reference

    block = reference.block_in(README)
    assert block is not None, f"README.md lacks the policy reference markers {reference.START!r}"
    assert block == reference.reference_markdown(), (
        f"README.md's policy reference differs from the policy schema: run {reference.REGENERATE} "
        "(python -m appliance.policy.reference README.md) and commit the result"
    )


def test_every_policy_field_has_a_description() -> None:
    from appliance.policy.reference import missing_descriptions

    missing = missing_descriptions()
    assert not missing, (
        f"policy fields without a docstring (write one under each field in appliance/policy/schema.py or "
        f"limits_schema.py, then run ./dev docs): {missing}"
    )


def readme_policies() -> tuple[str, str]:
    """The two policy documents of "### The policy bundle": the first site's, then the fuller one."""
    section = README.partition("### The policy bundle")[2].partition("\n### ")[0]
    blocks = re.findall(r"```json\n(.*?)\n```", section, flags=re.DOTALL)
    assert len(blocks) == 2, "the policy bundle section should show exactly two policy documents"
    return blocks[0], blocks[1]


FIRST_SITE_SHA256 = '"<sha256sum of the file>"'
"""The first site's only placeholder besides the dates (``issued_at``, ``expires_at``: set to now)."""


def test_the_readme_policies_are_valid_as_written() -> None:
    from appliance.policy.schema import parse_policy

    first, fuller = readme_policies()
    assert first.count(FIRST_SITE_SHA256) == 1
    parse_policy(first.replace(FIRST_SITE_SHA256, '"' + "ab" * 32 + '"').encode())
    policy = parse_policy(fuller.replace("<64 hex>", "ab" * 32).encode())
    for field in ("aliases", "fallbacks", "pricing"):
        assert getattr(policy, field), f"the fuller README policy should show {field}"
    stmarys = policy.organizations["stmarys"]
    radiology = stmarys.roles["radiology"]
    assert stmarys.budgets and radiology.limits and radiology.budgets and radiology.client_certificate
    assert "data_classes" not in json.loads(fuller)["routes"]["openai"]  # shows the cloud default
    assert policy.routes["openai"].data_classes == ["deidentified", "public"]
    assert policy.routes["local"].data_classes == ["phi", "deidentified", "public"]


def test_the_first_site_policy_works_as_written(tmp_path: Path) -> None:
    """The README's first-site policy, its two dates and its hash filled in, goes through the README's own
    commands (keygen, sign, trust add, import, token issue, serve) and a PHI request to it is answered."""
    import openai
    from click.testing import CliRunner

    from local_models.tiny import write_tiny_model
    from tests.support.subprocess_gateway import GatewayProcess

    def run(*args: str) -> str:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    first, _ = readme_policies()
    doc = json.loads(first)
    site = doc["scope"]["sites"][0]
    ((model, pin),) = doc["models"].items()
    home = tmp_path / "home"
    run("init", "--home", str(home), "--site", site)
    sha = write_tiny_model(home / "models" / pin["file"])
    now = datetime.now(UTC)
    source = tmp_path / "policy.json"
    filled = json.loads(first.replace(FIRST_SITE_SHA256, f'"{sha}"'))
    filled["issued_at"] = (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    filled["expires_at"] = (now + timedelta(days=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    source.write_text(json.dumps(filled, indent=2))
    author = tmp_path / "author"
    run("policy", "keygen", "--out", str(author))
    run("policy", "sign", str(source), "--key", f"{author}.key", "--out", str(tmp_path / "site.bundle"))
    run("trust", "add", f"{author}.pub", "--home", str(home))
    assert "imported" in run("policy", "import", str(tmp_path / "site.bundle"), "--home", str(home))
    ((org, spec),) = doc["organizations"].items()
    ((role, _),) = spec["roles"].items()
    issued = run("token", "issue", "--caller", "first-app", "--org", org, "--role", role, "--home", str(home))
    token = issued.strip().splitlines()[-1]

    gateway = GatewayProcess(home, tmp_path)
    try:
        port = gateway.start()
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=60
        )
        assert [m.id for m in client.models.list()] == [model]
        reply = client.chat.completions.create(  # no X-Phi-Data-Class: the role's default, phi
            model=model, messages=[{"role": "user", "content": "Summarise: MRN 1234567."}], max_tokens=8
        )
        assert reply.choices and reply.usage is not None and reply.usage.completion_tokens > 0
    finally:
        gateway.stop()
