"""``phi-gateway keys …``: provider keys, sealed in the vault (the applications never hold them).

Owns: the command line of those verbs and their ``admin`` records. Never: echoes, prints or records a
provider key: it is read from standard input (hidden at a terminal), and only its fingerprint is shown.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.cli.options import home_option, open_home, record_admin
from appliance.errors import OperatorError


@click.group("keys")
def keys_group() -> None:
    """Provider keys, sealed in the vault (the applications never hold them)."""


@keys_group.command("set")
@home_option
@click.argument("route")
def keys_set(home: Path | None, route: str) -> None:
    """Seal the provider key for ROUTE, read from standard input (never echoed)."""
    if sys.stdin.isatty():
        secret = click.prompt(f"provider key for {route}", hide_input=True)
    else:
        secret = sys.stdin.read()
    if not secret.strip():
        raise OperatorError("no key on standard input; usage: phi-gateway keys set ROUTE < key.txt")
    with open_home(home).open_vault() as vault:
        fingerprint = vault.keys.set(route, secret)
        record_admin(vault, f"key_set route={route} {fingerprint}")
    click.echo(f"key for route {route} sealed ({fingerprint})")


@keys_group.command("list")
@home_option
def keys_list(home: Path | None) -> None:
    """List provider keys: route names and fingerprints only."""
    with open_home(home).open_vault() as vault:
        rows = vault.keys.list()
    for row in rows:
        click.echo(f"{row['name']}\t{row['fingerprint']}\tupdated {row['updated_at']}")


@keys_group.command("remove")
@home_option
@click.argument("route")
def keys_remove(home: Path | None, route: str) -> None:
    """Delete the provider key for ROUTE."""
    with open_home(home).open_vault() as vault:
        if not vault.keys.remove(route):
            raise OperatorError(f"no key is set for route {route}")
        record_admin(vault, f"key_remove route={route}")
    click.echo(f"key for route {route} removed")
