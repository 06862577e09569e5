"""The Dashboard screen (key 1): what the gateway is doing now, from ``/admin/activity`` once a second.

Owns: the sparklines (requests/s, error rate, p50/p99 latency, tokens/s) with their current values, today's
spend by caller and by route, the local models' queues, and the ledger and policy at a glance.
Never: rebuilds a widget on refresh (data and cells are updated in place, so nothing flickers); reads the
clock (ages and countdowns are the gateway's own numbers); changes anything.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, Sparkline, Static

from tui.screens.base import Action, ConsoleScreen
from tui.widgets import numbers as fmt
from tui.widgets.panels import KeyValue
from tui.widgets.tables import ColumnsTable, sync_rows

TOP_N = 8
NUMBERS_WIDTH = 25  # "requests" and "spend" columns with their padding, and the cell padding of the name
SERIES = (
    ("requests_per_s", "requests/s", fmt.rate),
    ("error_rate", "error rate", fmt.percent),
    ("p50_ms", "latency p50", fmt.millis),
    ("p99_ms", "latency p99", fmt.millis),
    ("tokens_per_s", "tokens/s", fmt.rate),
)


class DashboardScreen(ConsoleScreen):
    TITLE = "Dashboard"
    KEY = "1"
    ACTIONS: ClassVar[list[Action]] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="series"):
            for name, label, _ in SERIES:
                with Horizontal(classes="series-row"):
                    yield Label(label, classes="series-label")
                    yield Label(fmt.DASH, id=f"now-{name}", classes="series-value")
                    yield Sparkline([], id=f"spark-{name}", classes="series-spark")
        yield Static(id="totals")
        with Horizontal(classes="dash-row"):
            yield _table("spend-caller", "spend today by caller", ("caller", "requests", "spend"))
            yield _table("spend-route", "by route", ("route", "requests", "spend"))
        with Horizontal(classes="dash-row"):
            yield _table("local", "local models", ("model", "state", "queue", "active", "slots", "tok/s"))
            yield KeyValue("ledger and policy", id="ledger-policy")

    def refresh_data(self) -> None:
        self.fetch("activity", lambda source: source.activity(), self.show_activity)

    def show_activity(self, doc: dict[str, Any]) -> None:
        series, now = doc.get("series", {}), doc.get("now", {})
        for name, _, write in SERIES:
            self.query_one(f"#now-{name}", Label).update(write(now.get(name)))
            self.query_one(f"#spark-{name}", Sparkline).data = [v or 0.0 for v in series.get(name, [])]
        self.query_one("#totals", Static).update(_totals_line(now, doc.get("totals", {})))
        spend = doc.get("spend_today", {})
        self._spend("spend-caller", "caller", spend.get("by_caller", []))
        self._spend("spend-route", "route", spend.get("by_route", []))
        title = f"spend today {fmt.usd(spend.get('total_usd'))}  by caller"
        table = self.query_one("#spend-caller")
        if table.border_title != title:
            table.border_title = title
        local = [
            (
                m["model"],
                (
                    m.get("state", ""),
                    fmt.count(m.get("queue_depth")),
                    fmt.count(m.get("active")),
                    fmt.count(m.get("slots")),
                    fmt.rate(m.get("tokens_per_s"), ""),
                ),
            )
            for m in doc.get("local", [])
        ]
        sync_rows(self.query_one("#local", DataTable), [(k, (k, *cells)) for k, cells in local])
        ledger, policy = doc.get("ledger", {}), doc.get("policy", {})
        self.query_one("#ledger-policy", KeyValue).show(
            [
                ("records", fmt.count(ledger.get("records"))),
                ("writable", "yes" if ledger.get("writable") else "NO — requests are refused"),
                ("owed outcomes", fmt.count(ledger.get("owed_outcomes"))),
                ("checkpoint", fmt.age(ledger.get("last_checkpoint_age_s"))),
                ("policy", _policy_line(policy)),
                ("expires", fmt.expiry(policy.get("expires_in_s"))),
            ]
        )

    def _spend(self, table_id: str, field: str, rows: list[dict[str, Any]]) -> None:
        table = self.query_one(f"#{table_id}", DataTable)
        room = max(8, table.scrollable_content_region.width - NUMBERS_WIDTH)  # names give way to numbers
        cells = [
            (str(i), (fmt.clip(str(row.get(field) or "(none)"), room), fmt.count(row.get("requests")),
                      fmt.usd(row.get("cost_usd"))))
            for i, row in enumerate(rows[:TOP_N])
        ]  # fmt: skip
        sync_rows(table, cells)


def _totals_line(now: dict[str, Any], totals: dict[str, Any]) -> str:
    tokens_in, tokens_out = fmt.tokens(totals.get("tokens_in")), fmt.tokens(totals.get("tokens_out"))
    return (
        f"in flight {fmt.count(now.get('in_flight'))}  ·  {fmt.count(totals.get('requests'))} requests, "
        f"{fmt.count(totals.get('errors'))} errors, {fmt.count(totals.get('refusals'))} refused  ·  "
        f"tokens {tokens_in} in / {tokens_out} out  ·  {fmt.usd(totals.get('cost_usd'))} since start"
    )


def _policy_line(policy: dict[str, Any]) -> str:
    if not policy.get("in_force"):
        return f"NONE IN FORCE — {policy.get('reason') or 'fail closed'}"
    return f"version {policy.get('version')}"


def _table(table_id: str, title: str, columns: tuple[str, ...]) -> ColumnsTable:
    table = ColumnsTable(columns, id=table_id, cursor_type="none", classes="dash-table")
    table.border_title = title
    return table
