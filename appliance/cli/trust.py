"""``phi-gateway trust …``: the policy-authoring keys this appliance trusts, and the signature threshold.

Owns: the command line of those verbs and their ``admin`` records. Never: holds or prints a private key
(only public keys are pinned); changes the trust file without recording it in the ledger.
"""

from __future__ import annotations

from pathlib import Path

import click

from appliance import files
from appliance.cli.options import home_option, open_home, record_admin
from appliance.home import Home


@click.group("trust")
def trust_group() -> None:
    """Policy-authoring keys this appliance trusts."""


@trust_group.command("add")
@home_option
@click.argument("pubfile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def trust_add(home: Path | None, pubfile: Path) -> None:
    """Pin an authoring public key."""
    files.require_regular(pubfile, files.KEY_FILE)  # the trust store opens it itself: no FIFO may block
    target = open_home(home)
    trust = target.trust()
    keyid = trust.add(pubfile)
    trust.save()
    _record_change(target, f"trust_add {keyid[:16]}")
    click.echo(f"trusted key {keyid} (threshold {trust.threshold} of {len(trust.keys)})")


@trust_group.command("remove")
@home_option
@click.argument("keyid")
def trust_remove(home: Path | None, keyid: str) -> None:
    """Unpin an authoring key, by its id or a unique prefix of 8+ digits (a policy it alone signed stops
    verifying: running gateways then refuse requests)."""
    target = open_home(home)
    trust = target.trust()
    keyid = trust.resolve(keyid)
    trust.remove(keyid)
    trust.save()
    _record_change(target, f"trust_remove {keyid[:16]}")
    click.echo(f"removed key {keyid}")


@trust_group.command("threshold")
@home_option
@click.argument("n", type=int)
def trust_threshold(home: Path | None, n: int) -> None:
    """Require N distinct trusted signatures on every bundle."""
    target = open_home(home)
    trust = target.trust()
    trust.set_threshold(n)
    trust.save()
    _record_change(target, f"trust_threshold {n}")
    click.echo(f"threshold {n} of {len(trust.keys)}")


@trust_group.command("list")
@home_option
def trust_list(home: Path | None) -> None:
    """List trusted keys and the threshold."""
    trust = open_home(home).trust()
    click.echo(f"threshold {trust.threshold}")
    for keyid in trust.keys:
        click.echo(keyid)


def _record_change(home: Home, detail: str, claw_id: str | None = None) -> None:
    with home.open_vault() as vault:
        record_admin(vault, detail, claw_id)
