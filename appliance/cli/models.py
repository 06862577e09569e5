"""``phi-gateway models …``: the local GGUF models the policy in force pins (files in <home>/models).

Owns: the command line of those verbs. Never: loads a file whose SHA-256 differs from its pin (the
running gateway verifies before it loads); changes a pin (only a policy import does).
"""

from __future__ import annotations

from pathlib import Path

import click

from appliance.admin.client import AdminClient
from appliance.cli.options import home_option, open_home
from appliance.errors import OperatorError
from appliance.policy import dsse
from appliance.policy.schema import Policy
from local_models.registry import ModelRegistry


@click.group("models")
def models_group() -> None:
    """Local GGUF models, pinned by SHA-256 in the policy, files in <home>/models."""


def _registry(home: Path | None) -> ModelRegistry:
    target = open_home(home)
    with target.open_vault() as vault:
        active = vault.policies.current()
    if active is None:
        raise OperatorError("no policy has been imported: no local model is pinned")
    policy = Policy.model_validate_json(dsse.parse_envelope(active.envelope).payload)
    return ModelRegistry(target.models_dir, dict(policy.models))


@models_group.command("list")
@home_option
def models_list(home: Path | None) -> None:
    """The local models the policy in force pins, and whether their files are present."""
    for row in _registry(home).listing():
        size = f"{row['size_bytes']} bytes" if row["present"] else "MISSING"
        click.echo(f"{row['name']}\t{row['file']}\t{size}\tsha256 {row['sha256']}")


@models_group.command("verify")
@home_option
def models_verify(home: Path | None) -> None:
    """Hash every pinned file; exit 1 if any is missing or differs from its pin."""
    results = _registry(home).verify_all()
    for model, outcome in results:
        click.echo(f"{model}: {outcome}")
    if any(outcome != "ok" for _, outcome in results):
        raise OperatorError("some local models do not match the policy's pins")


@models_group.command("load")
@home_option
@click.argument("model")
def models_load(home: Path | None, model: str) -> None:
    """Verify and load MODEL (local/<name>) in the running gateway."""
    _model_verb(home, model, "load")


@models_group.command("unload")
@home_option
@click.argument("model")
def models_unload(home: Path | None, model: str) -> None:
    """Unload MODEL from the running gateway (it loads again on its next request)."""
    _model_verb(home, model, "unload")


def _model_verb(home: Path | None, model: str, verb: str) -> None:
    doc = AdminClient(open_home(home).admin_socket).call("POST", f"/admin/models/{verb}", {"model": model})
    click.echo(f"{doc['model']} {verb}ed")
