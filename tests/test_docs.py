"""The README is the operator's manual: every command, setting and audit field must appear in it."""

from __future__ import annotations

import re
from pathlib import Path

import click
from pydantic import BaseModel

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
