"""``phi-gateway console`` (the operator console, a Textual app) and ``phi-gateway top`` (one screen of the
dashboard's numbers, printed, for scripts and for a terminal too small for the console).

Owns: those two verbs' command lines and the plain-text layout of ``top`` (80 columns). Both talk to the
running gateway over ``<home>/admin.sock`` only.
Never: starts a gateway (when none answers they say so and exit 1); opens the vault or the ledger; imports
Textual for any verb but ``console``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from appliance.admin.client import AdminClient
from appliance.cli.options import home_option, open_home
from appliance.errors import OperatorError
from tui.widgets import numbers as fmt

TOP_N = 5


@click.command("console")
@home_option
@click.option(
    "--read-only", is_flag=True, help="Look, never change: every action that changes something is refused."
)
def console_cmd(home: Path | None, read_only: bool) -> None:
    """The operator console: live dashboard, audit tail, callers, models, policy, keys and ledger (keys 1-7;
    ? for help). Works over SSH at 80x24. It never starts the gateway."""
    from tui.app import PhiConsole  # Textual loads for this verb only: the other verbs stay quick to start
    from tui.client import AdminSource

    PhiConsole(AdminSource(open_home(home).admin_socket), read_only=read_only, tune_gc=True).run()


@click.command("top")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the /admin/activity document as JSON instead.")
def top_cmd(home: Path | None, as_json: bool) -> None:
    """One screen of what the gateway is doing now (requests/s, errors, latency, tokens, spend today, local
    models, ledger, policy), printed once; exit 1 when no gateway answers."""
    socket_path = open_home(home).admin_socket
    try:
        doc = AdminClient(socket_path, timeout=10).call("GET", "/admin/activity")
    except OperatorError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from exc
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    click.echo("\n".join(top_lines(doc, str(socket_path))))


def top_lines(doc: dict[str, Any], where: str) -> list[str]:
    """The ``top`` screen: at most 80 columns a line."""
    now, totals = doc.get("now", {}), doc.get("totals", {})
    spend, ledger, policy = doc.get("spend_today", {}), doc.get("ledger", {}), doc.get("policy", {})
    requests, tokens = fmt.rate(now.get("requests_per_s")), fmt.rate(now.get("tokens_per_s"))
    errors = fmt.percent(now.get("error_rate"))
    p50, p99 = fmt.millis(now.get("p50_ms")), fmt.millis(now.get("p99_ms"))
    tokens_in, tokens_out = fmt.tokens(totals.get("tokens_in")), fmt.tokens(totals.get("tokens_out"))
    lines = [
        f"Phi Gateway  {where}  up {fmt.duration(doc.get('uptime_s'))}",
        "",
        f"now (last 10 s)  {requests} requests   errors {errors}   p50 {p50}   p99 {p99}",
        f"                 {tokens} tokens   in flight {fmt.count(now.get('in_flight'))}",
        f"since start      {fmt.count(totals.get('requests'))} requests   {fmt.count(totals.get('errors'))} "
        f"errors   {fmt.count(totals.get('refusals'))} refused   {fmt.usd(totals.get('cost_usd'))}",
        f"                 tokens {tokens_in} in / {tokens_out} out",
        "",
        f"spend today ({spend.get('date', fmt.DASH)})  {fmt.usd(spend.get('total_usd'))}",
    ]
    lines += _spend_rows("caller", spend.get("by_caller", []))
    lines += _spend_rows("route", spend.get("by_route", []))
    local = doc.get("local", [])
    if local:
        lines += ["", f"  {'local model':<26}{'state':<12}{'queue':>6}{'active':>7}{'slots':>6}{'tok/s':>9}"]
        for m in local[:TOP_N]:
            lines.append(
                f"  {fmt.clip(str(m.get('model')), 25):<26}{fmt.clip(str(m.get('state')), 11):<12}"
                f"{fmt.count(m.get('queue_depth')):>6}{fmt.count(m.get('active')):>7}"
                f"{fmt.count(m.get('slots')):>6}{fmt.rate(m.get('tokens_per_s'), ''):>9}"
            )
    writable = "writable" if ledger.get("writable") else "NOT WRITABLE (requests are refused)"
    version = f"version {policy.get('version')}" if policy.get("in_force") else "NONE IN FORCE"
    lines += [
        "",
        f"ledger  {fmt.count(ledger.get('records'))} records, {writable}, last checkpoint "
        f"{fmt.age(ledger.get('last_checkpoint_age_s'))}",
        f"policy  {version}, expires {fmt.expiry(policy.get('expires_in_s'))}"
        + ("" if policy.get("in_force") else f" ({policy.get('reason')})"),
    ]
    return [fmt.clip(line, 80) for line in lines]


def _spend_rows(field: str, rows: list[dict[str, Any]]) -> list[str]:
    out = [f"  by {field:<30}{'requests':>12}{'spend':>14}"] if rows else []
    for row in rows[:TOP_N]:
        name = fmt.clip(str(row.get(field) or "(none)"), 32)
        out.append(f"  {name:<33}{fmt.count(row.get('requests')):>12}{fmt.usd(row.get('cost_usd')):>14}")
    return out
