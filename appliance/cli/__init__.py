"""``phi-gateway``: the operator's command line (the documented interface runbooks are written against).

Owns: the ``main`` group (version, logging) and which verb groups it holds; each group lives in its own
module (``setup``, ``policy``, ``trust``, ``models``, ``keys``, ``tokens``, ``audit``, ``tls``, ``console``,
``backup``), built on the shared ``options`` module. Across them: exit codes (0 ok, 1 operator error, 2
usage), and an ``admin`` ledger record of every change an operator makes (init, policy import, trust, keys,
tokens, tls, backup).
Never: echoes a provider key; prints a token except once, on its own last line, at ``token issue``;
writes the vault except through the vault's single writer. The verb modules never import this one.
"""

from __future__ import annotations

import logging
import sys

import click

from appliance import __version__
from appliance.cli.audit import audit_group
from appliance.cli.backup import backup_cmd, restore_cmd
from appliance.cli.console import console_cmd, top_cmd
from appliance.cli.keys import keys_group
from appliance.cli.models import models_group
from appliance.cli.options import ErrorReportingGroup
from appliance.cli.policy import policy_group
from appliance.cli.setup import config_group, demo_cmd, init, serve, status_cmd
from appliance.cli.tls import tls_group
from appliance.cli.tokens import token_group
from appliance.cli.trust import trust_group


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phi-gateway")
def main() -> None:
    """Phi Gateway: an air-gapped AI gateway for protected health data."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


main.add_command(init)
main.add_command(serve)
main.add_command(demo_cmd)
main.add_command(status_cmd)
main.add_command(config_group)
main.add_command(policy_group)
main.add_command(models_group)
main.add_command(trust_group)
main.add_command(keys_group)
main.add_command(token_group)
main.add_command(audit_group)
main.add_command(tls_group)
main.add_command(console_cmd)
main.add_command(top_cmd)
main.add_command(backup_cmd)
main.add_command(restore_cmd)
