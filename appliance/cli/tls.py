"""``phi-gateway tls …``: the certificate of the public port (import, self-signed, show).

Owns: the command line of those verbs and their ``admin`` records. A running gateway serves a new
certificate to new connections within ``server.tls.reload_interval_s``, without a restart; open
connections keep the one they began with.
Never: prints, echoes or records key material (only subjects, names, dates and fingerprints); installs a
pair that ``appliance.tls`` refuses.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from appliance import files
from appliance.cli.options import home_option, open_home, record_admin
from appliance.errors import OperatorError
from appliance.home import Home
from appliance.tls import CertificateInfo, TlsMaterial, certificates
from appliance.tls.material import PEM_FILE, Pair

_FILE = click.Path(dir_okay=False, path_type=Path)


@click.group("tls")
def tls_group() -> None:
    """TLS on the public port: its certificate, and client certificates (mutual TLS)."""


@tls_group.command("import")
@home_option
@click.argument("cert", type=_FILE)
@click.argument("key", type=_FILE)
@click.option("--chain", type=_FILE, default=None, help="PEM intermediates, issuer of CERT first.")
def tls_import(home: Path | None, cert: Path, key: Path, chain: Path | None) -> None:
    """Install CERT (PEM, optionally followed by its chain) and its unencrypted KEY for the public port."""
    target = open_home(home)
    certificate_pem = files.read_bytes(cert, PEM_FILE)
    key_pem = files.read_bytes(key, PEM_FILE)
    chain_pem = files.read_bytes(chain, PEM_FILE) if chain is not None else None
    with target.open_vault() as vault:  # opened first: a home whose ledger cannot be written changes nothing
        replaced = _current(target)
        pair = TlsMaterial(target.root).install(certificate_pem, key_pem, chain_pem)
        record_admin(vault, _detail("tls_import", pair, replaced))
    _installed(target, pair, replaced)


@tls_group.command("self-signed")
@home_option
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="A name or IP address clients use to reach the gateway (repeat for each); the first is the CN.",
)
@click.option("--days", type=int, default=365, show_default=True, help="Validity in days.")
def tls_self_signed(home: Path | None, hosts: tuple[str, ...], days: int) -> None:
    """Make a self-signed ECDSA P-256 certificate for the public port (first boot); prints the fingerprint
    clients pin."""
    target = open_home(home)
    certificate_pem, key_pem = certificates.self_signed(list(hosts), days)
    with target.open_vault() as vault:
        replaced = _current(target)
        pair = TlsMaterial(target.root).install(certificate_pem, key_pem)
        record_admin(vault, _detail("tls_self_signed", pair, replaced))
    _installed(target, pair, replaced)
    material = TlsMaterial(target.root)
    port = target.settings().server.port
    click.echo(
        f"\nclients verify it with a copy of {material.cert} as their CA file (it holds no secret), or pin "
        f"{pair.info.fingerprint}:\n"
        f"  OpenAI(base_url='https://{_url_host(hosts[0])}:{port}/v1', api_key=TOKEN,\n"
        f"         http_client=httpx.Client(verify=ssl.create_default_context(cafile='cert.pem')))"
    )


@tls_group.command("show")
@home_option
def tls_show(home: Path | None) -> None:
    """The certificate the public port serves: subject, names, issuer, expiry, fingerprint; client CA."""
    target = open_home(home)
    material = TlsMaterial(target.root)
    settings = target.settings().server.tls
    if not material.present():
        click.echo(
            f"no certificate in {material.dir}: the public port speaks plain HTTP, and serve allows that on "
            "loopback only (or with --insecure-http).\n"
            "make one: phi-gateway tls self-signed --host NAME, or phi-gateway tls import CERT KEY"
        )
    else:
        click.echo(f"certificate: {material.cert} (key {material.key.name})")
        for line in material.describe().lines():
            click.echo(line)
        click.echo(f"min version: TLS {settings.min_version}")
    if settings.client_ca_file is None:
        click.echo("client certificates: not asked for (server.tls.client_ca_file is not set)")
    else:
        ca = target.root / settings.client_ca_file
        try:
            count = len(certificates.parse_certificates(files.read_bytes(ca, PEM_FILE), "client CA file"))
            click.echo(f"client certificates: asked for, verified against {ca} ({count} CA certificate(s))")
        except OperatorError as exc:  # shown, not raised: show is how an operator finds what is wrong
            click.echo(f"client certificates: server.tls.client_ca_file {ca} is unusable: {exc}")


def _current(home: Home) -> CertificateInfo | None:
    """The certificate being replaced, if one parses (a broken one is replaced all the same)."""
    material = TlsMaterial(home.root)
    if not material.cert.exists():
        return None
    try:
        return material.describe()
    except OperatorError:  # whatever is there now is being replaced: it need not parse
        return None


def _detail(verb: str, pair: Pair, replaced: CertificateInfo | None) -> str:
    info = pair.info
    detail = f"{verb} {info.fingerprint} not_after={info.not_after.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    if replaced is not None:
        detail += f" replaced={replaced.fingerprint}"
    return detail


def _installed(home: Home, pair: Pair, replaced: CertificateInfo | None) -> None:
    material = TlsMaterial(home.root)
    click.echo(f"certificate installed: {material.cert} (key {material.key}, 0600)")
    for line in pair.info.lines():
        click.echo(line)
    if replaced is not None:
        click.echo(f"replaced:    {replaced.fingerprint}")
    click.echo(
        "a running gateway serves it to new connections within server.tls.reload_interval_s; open "
        "connections keep the certificate they began with"
    )


def _url_host(host: str) -> str:
    """``host`` as a URL's authority writes it: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
