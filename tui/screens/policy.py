"""``PolicyScreen`` (key 5): the signed policy in force and its summary, importing a new bundle, reloading.

Owns: how the policy in force is shown (version, sha256, signers, scope, issued/expires with a countdown taken
from the gateway's ``expires_in_s``, trust threshold and keys) and its summary (routes, models,
organizations), and the import (m) and reload (r) actions.
Never: reads a bundle itself or activates one unverified (``tui.policy_import`` owns that flow); computes
the countdown from the local clock (the gateway's answer is the one truth, and snapshots stay stable).
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll

from tui.client import Document
from tui.policy_import import ImportBundleModal, import_outcome
from tui.screens.action_screen import ActionScreen
from tui.widgets.panels import KeyValue


def countdown(seconds: object) -> str:
    """``2592000`` -> ``in 30d 0h``; negative -> ``expired 3h 5m ago``."""
    if not isinstance(seconds, int | float):
        return ""
    left = abs(int(seconds))
    days, rest = divmod(left, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        span = f"{days}d {hours}h"
    elif hours:
        span = f"{hours}h {minutes}m"
    else:
        span = f"{minutes}m {secs}s"
    return f"in {span}" if seconds >= 0 else f"expired {span} ago"


def scope_text(scope: Any) -> str:
    if not isinstance(scope, dict):
        return "-"
    return "; ".join(
        f"{name} {', '.join(str(v) for v in value) if isinstance(value, list) else value}"
        for name, value in scope.items()
    )


def in_force_pairs(doc: Document) -> list[tuple[str, object]]:
    trust = doc.get("trust") or {}
    trust_keys = [
        f"{k.get('keyid')}"
        + (f" ({k.get('algorithm') or k['scheme']})" if k.get("algorithm") or k.get("scheme") else "")
        for k in trust.get("keys", [])
    ]
    expires = doc.get("expires_at")
    return [
        ("in force", "yes" if doc.get("in_force") else f"NO: {doc.get('reason') or 'no policy'}"),
        ("version", doc.get("version") if doc.get("version") is not None else "-"),
        ("sha256", doc.get("sha256") or "-"),
        ("signed by", ", ".join(str(k) for k in doc.get("keyids", [])) or "-"),
        ("scope", scope_text(doc.get("scope"))),
        ("issued", doc.get("issued_at") or "-"),
        ("expires", f"{expires} ({countdown(doc.get('expires_in_s'))})" if expires else "-"),
        ("trust", f"{trust.get('threshold', '-')} signature(s) of {len(trust_keys)} key(s)"),
        *((("trusted key" if i == 0 else ""), key) for i, key in enumerate(trust_keys)),
    ]


def summary_pairs(doc: Document) -> tuple[list[tuple[str, object]], list[tuple[str, object]]]:
    summary = doc.get("summary") or {}
    routes: list[tuple[str, object]] = [
        (str(r.get("name")), f"{r.get('kind')} · {', '.join(str(c) for c in r.get('data_classes', []))}")
        for r in summary.get("routes", [])
    ]
    models = [str(m) for m in summary.get("models", [])]
    rest: list[tuple[str, object]] = [("models", ", ".join(models) or "none pinned")]
    for org in summary.get("organizations", []):
        rest.append((f"org {org.get('org')}", "roles: " + ", ".join(str(r) for r in org.get("roles", []))))
    return routes, rest


class PolicyScreen(ActionScreen):
    """The policy in force: import a bundle (m), reload (r)."""

    TITLE = "Policy"
    KEY = "5"
    ACTIONS = [
        ("m", "import_bundle", "Import a signed policy bundle", True),
        ("r", "reload", "Reload the policy from the vault", True),
    ]
    BINDINGS = [Binding("m", "import_bundle", "Import"), Binding("r", "reload", "Reload")]
    DEFAULT_CSS = """
    PolicyScreen #policy-body { height: 1fr; }
    PolicyScreen KeyValue { border: round $panel; height: auto; padding: 0 1; }
    """

    def __init__(self, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.doc: Document | None = None
        """The last ``/admin/policy`` answer shown."""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="policy-body"):
            yield KeyValue("Policy in force", id="in-force")
            yield KeyValue("Routes", id="routes")
            yield KeyValue("Models and organizations", id="summary")

    def refresh_data(self) -> None:
        self.fetch("policy", lambda source: source.policy(), self._show)

    def _show(self, doc: Document) -> None:
        self.doc = doc
        self.query_one("#in-force", KeyValue).show(in_force_pairs(doc))
        routes, rest = summary_pairs(doc)
        self.query_one("#routes", KeyValue).show(routes or [("", "no routes")])
        self.query_one("#summary", KeyValue).show(rest)

    def action_import_bundle(self) -> None:
        if not self.guard_action("import"):
            return

        def done(report: Document | None) -> None:
            if report is not None:
                self.notify(import_outcome(report), title="import", timeout=6)
            self.refresh_data()

        self.app.push_screen(ImportBundleModal(self.source), done)

    def action_reload(self) -> None:
        if not self.guard_action("reload"):
            return
        self.act_and_report("reload", lambda source: source.reload_policy(), _reload_outcome)


def _reload_outcome(answer: Document) -> str:
    version = answer.get("version")
    return f"Policy reloaded: v{version} in force." if version is not None else "Policy reloaded."
