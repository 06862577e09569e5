"""``phi-gateway init``, ``serve``, ``demo``, ``status`` and ``config show``: making a home, serving it,
asking the running gateway how it is, and printing the settings.

Owns: the command line of those verbs. Never: prints a secret (``config show`` masks; the demo's token is a
throwaway demo token, printed so the demo can be tried); imports ``appliance.gateway`` at module level
(only the serving verbs need it, and it is slow to import).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from appliance import demo
from appliance.admin.client import AdminClient
from appliance.cli.options import home_option, open_home
from appliance.home import Home
from appliance.process_hardening import forbid_core_dumps
from appliance.tls import TlsMaterial

log = logging.getLogger("phi.cli")

_INSECURE_HTTP = click.option(
    "--insecure-http",
    is_flag=True,
    help="Allow plain HTTP on a non-loopback address when the home holds no certificate (setting "
    "server.insecure_http); tokens then cross the network in clear.",
)


@click.command()
@home_option
@click.option(
    "--site", required=True, help="This appliance's site id (policy bundles must name it in scope)."
)
@click.option(
    "--node",
    default=None,
    help="This node's name in its ledger's checkpoints (each node of a site its own; fixed at init).",
)
def init(home: Path | None, site: str, node: str | None) -> None:
    """Create a gateway home: vault, master key (0600), appliance signing key, settings."""
    for line in open_home(home, initialized=False).init(site, node):
        click.echo(f"created {line}")
    click.echo(
        "next: a certificate for the public port (phi-gateway tls self-signed --host NAME, or tls import "
        "CERT KEY); without one, serve refuses any address but loopback (serve --host 127.0.0.1 works)"
    )


@click.command()
@home_option
@click.option("--host", default=None, help="Listen address (default from settings: 0.0.0.0).")
@click.option("--port", type=int, default=None, help="Listen port (default from settings: 8080).")
@_INSECURE_HTTP
def serve(home: Path | None, host: str | None, port: int | None, insecure_http: bool) -> None:
    """Serve the API until SIGTERM/SIGINT, then drain in-flight requests. TLS is in force whenever the home
    holds a certificate (phi-gateway tls …); plain HTTP beyond loopback needs --insecure-http."""
    # Imported here for start-up cost only: the gateway's import is slow, and every other verb (and
    # ``--help``) would pay for it.
    from appliance.gateway import Gateway

    target = open_home(home)
    settings = target.settings()
    if insecure_http:
        settings.server.insecure_http = True
    _forbid_core_dumps()  # before the master key or any provider key is in memory
    Gateway(target, settings, audit_out=sys.stdout).run(host, port)


@click.command("demo")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-home"),
    show_default=True,
    help="Demo home (created if missing).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@_INSECURE_HTTP
def demo_cmd(home: Path, host: str, port: int, insecure_http: bool) -> None:
    """Prepare a demo home (demo key, signed demo policy, a token) and serve it."""
    from appliance.gateway import Gateway  # here, not at the top: start-up cost (see ``serve``)

    target = Home(home.resolve())
    _forbid_core_dumps()
    token, done = demo.prepare(target)
    for line in done:
        click.echo(line, err=True)
    settings = target.settings()
    if insecure_http:
        settings.server.insecure_http = True
    # Plain HTTP on loopback, unless the demo home was given a certificate (phi-gateway tls …).
    tls = TlsMaterial(target.root).present()
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    curl = f"curl -s --cacert {TlsMaterial(target.root).cert}" if tls else "curl -s"
    click.echo(
        f"\nPhi Gateway demo on {url}/v1 (home {target.root})\n"
        f"  {curl} {url}/v1/models -H 'Authorization: Bearer {token}'\n"
        f"  {curl} {url}/v1/chat/completions -H 'Authorization: Bearer {token}' "
        f'-d \'{{"model": "local/demo", "messages": [{{"role": "user", "content": "hi"}}]}}\'\n'
        f"  OpenAI SDK: OpenAI(base_url='{url}/v1', api_key='{token}')\n"
        f"token: {token}\n",
        err=True,
    )
    Gateway(target, settings, audit_out=sys.stdout).run(host, port)


def _forbid_core_dumps() -> None:
    for problem in forbid_core_dumps():
        log.warning("%s: a crash could leave secrets in a core file", problem)


@click.command("status")
@home_option
def status_cmd(home: Path | None) -> None:
    """Ask the running gateway how it is (policy, ledger, local models), through its admin socket."""
    click.echo(json.dumps(AdminClient(open_home(home).admin_socket).call("GET", "/admin/status"), indent=2))


@click.group("config")
def config_group() -> None:
    """Settings."""


@config_group.command("show")
@home_option
def config_show(home: Path | None) -> None:
    """Print the validated settings (gateway.toml plus PHI_ overrides)."""
    click.echo(open_home(home).settings().masked())
