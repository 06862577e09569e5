"""What every ``phi-gateway`` verb module shares: the ``--home`` option, opening the home, the ``admin``
ledger record of an operator's change (naming the OS user who made it), and the group that turns an
operator error into ``error: …`` and exit status 1.

Owns: those four things, nothing verb-specific. Never: prints a secret; imports a verb module or
``appliance.cli`` itself (every verb module imports this one, so this one imports none of them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.errors import GatewayError, OperatorError
from appliance.home import Home, Vault, resolve_home
from appliance.os_user import this_os_user

F = TypeVar("F", bound=Callable[..., Any])


class ErrorReportingGroup(click.Group):
    """A group whose verbs' operator errors print ``error: …`` on standard error and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OperatorError, GatewayError) as exc:  # GatewayError: the vault cannot be written, say
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except sqlite3.Error as exc:
            click.echo(f"error: the vault database failed: {exc}", err=True)
            ctx.exit(1)


def home_option(fn: F) -> F:
    return click.option(
        "--home",
        envvar="PHI_HOME",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Gateway home directory (env PHI_HOME; default /var/lib/phi-gateway).",
    )(fn)


def open_home(path: Path | None, *, initialized: bool = True) -> Home:
    """The home ``--home`` names (or PHI_HOME, or the default); refuses one ``init`` has not made."""
    home = Home(resolve_home(path))
    if initialized:
        home.require_initialized()
    return home


def record_admin(vault: Vault, detail: str, claw_id: str | None = None) -> None:
    """Write the ``admin`` ledger record of an operator's change (``detail`` never holds a secret), naming
    the OS user who ran the command."""
    record = {"type": "admin", "claw_id": claw_id, "detail": detail, "os_user": this_os_user()}
    vault.ledger.append_sync(record)
