"""The action screens (Callers, Models, Policy, Keys) driven with Pilot against a real gateway: each action
through its modal, its effect on the gateway (seen with the real OpenAI SDK where it matters), its ``admin``
ledger record, and a read-only console that refuses every one of them.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Button, Input, Select

from appliance import signing_keys
from appliance.policy import dsse
from local_models.tiny import write_tiny_model
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc
from tests.tui.conftest import wait_for
from tui.app import PhiConsole
from tui.client import AdminSource
from tui.modals import (
    ConfirmModal,
    ExpiryModal,
    IssueTokenModal,
    ProviderKeyModal,
    SecretInput,
    SecretOnceModal,
)
from tui.policy_import import ImportBundleModal
from tui.screens.action_screen import ActionScreen

pytestmark = pytest.mark.anyio

# -- helpers (test_no_secrets uses them too) --


def source_of(harness: GatewayHarness) -> AdminSource:
    return AdminSource(harness.home.admin_socket, timeout=30)


@asynccontextmanager
async def running(harness: GatewayHarness, read_only: bool = False) -> AsyncIterator[Pilot[None]]:
    app = PhiConsole(source_of(harness), read_only=read_only, cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        yield pilot


def screen_text(pilot: Pilot[None]) -> str:
    """What the terminal shows now, as plain text (the screen with any modal over it)."""
    app = pilot.app
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def show(pilot: Pilot[None], key: str, row: str | None = None) -> ActionScreen:
    """Show screen ``key`` and wait for its data (and for row ``row``, then select it)."""
    await pilot.press(key)
    screen = pilot.app.screen
    assert isinstance(screen, ActionScreen) and screen.KEY == key
    if key == "5":
        await wait_for(pilot, lambda: getattr(screen, "doc", None) is not None)
    else:
        await wait_for(pilot, lambda: bool(screen.shown_rows) or row is None)
    if row is not None:
        await wait_for(pilot, lambda: any(_key_of(f) == row for f in screen.shown_rows))
        screen.select_row(next(_row_key(screen, row)))
    return screen


def _key_of(fields: Any) -> str:
    return str(fields.get("caller") or fields.get("model") or fields.get("route"))


def _row_key(screen: ActionScreen, name: str) -> Iterator[str]:
    for key, fields, _cells in screen._rows:
        if _key_of(fields) == name:
            yield key


async def modal(pilot: Pilot[None], kind: type) -> Any:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, kind))
    return pilot.app.screen


def admin_details(harness: GatewayHarness) -> list[str]:
    return [str(r.get("detail")) for r in harness.ledger_rows() if r.get("type") == "admin"]


async def wait_gateway(pilot: Pilot[None], condition: Callable[[], bool], within_s: float = 15.0) -> None:
    """Wait for the gateway's state (read with blocking calls) while the console keeps running."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        await pilot.pause(0.1)


def chat(harness: GatewayHarness, token: str) -> str:
    with openai.OpenAI(base_url=harness.base_url, api_key=token, max_retries=0, timeout=10) as client:
        reply = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    return reply.choices[0].message.content or ""


async def issue_through_console(pilot: Pilot[None], caller: str, role: str = "radiology") -> str:
    """Issue a token with the form; return it as the SecretOnceModal shows it (the modal left open)."""
    await show(pilot, "3")
    await pilot.press("i")
    form = await modal(pilot, IssueTokenModal)
    form.query_one("#caller", Input).value = caller
    form.query_one("#role", Select).value = role
    note = form.query_one("#note", Input)
    note.value = "issued by the console test"
    note.focus()
    await pilot.press("enter")  # Enter in the last field submits
    secret_modal = await modal(pilot, SecretOnceModal)
    return str(secret_modal.query_one("#secret").content)


def write_bundle(harness: GatewayHarness, path: Path, doc: dict[str, Any]) -> Path:
    key = signing_keys.load_signing_key(Path(f"{harness.author}.key"))
    path.write_bytes(dsse.sign(json.dumps(doc).encode(), [key]))
    return path


async def verify_in_modal(pilot: Pilot[None], path: Path) -> ImportBundleModal:
    await show(pilot, "5")
    await pilot.press("m")
    dialog = await modal(pilot, ImportBundleModal)
    await pilot.press(*str(path), "enter")
    await wait_for(pilot, lambda: dialog.report is not None or dialog.problem is not None)
    return dialog


# -- Callers --


async def test_issue_shows_the_token_once_and_it_works(harness: GatewayHarness) -> None:
    async with running(harness) as pilot:
        token = await issue_through_console(pilot, "radiology-bot")
        caller, _, secret = token.partition(":")
        assert caller == "radiology-bot" and len(secret) == 48
        assert chat(harness, token)  # the real SDK, through the gateway, with the token the modal showed
        await pilot.press("c")
        assert pilot.app.clipboard == token
        assert "shown once" in screen_text(pilot)
        await pilot.press("escape")
        screen = await modal(pilot, ActionScreen)
        assert pilot.app.clipboard == ""
        await wait_for(pilot, lambda: any(f["caller"] == "radiology-bot" for f in screen.shown_rows))
        assert secret not in screen_text(pilot)
    issued = [t for t in source_of(harness).callers()["tokens"] if t["caller"] == "radiology-bot"]
    assert [(t["org"], t["role"], t["note"]) for t in issued] == [
        ("stmarys", "radiology", "issued by the console test")
    ]
    assert any(d.startswith("token_issue org=stmarys role=radiology") for d in admin_details(harness))


async def test_revoke_asks_first_and_cancel_changes_nothing(harness: GatewayHarness) -> None:
    token = harness.issue("radiology-bot")
    async with running(harness) as pilot:
        await show(pilot, "3", row="radiology-bot")
        await pilot.press("x")
        confirm = await modal(pilot, ConfirmModal)
        assert "Revoke every token of radiology-bot?" in screen_text(pilot)
        assert pilot.app.focused is confirm.query_one("#cancel", Button)
        await pilot.press("enter")  # Enter on the focused Cancel
        await modal(pilot, ActionScreen)
        assert chat(harness, token)

        await pilot.press("x")
        await modal(pilot, ConfirmModal)
        await pilot.press("y")
        await wait_gateway(pilot, lambda: not source_of(harness).callers()["tokens"])
    with pytest.raises((openai.AuthenticationError, openai.PermissionDeniedError)):
        chat(harness, token)
    assert any(d.startswith("token_revoke count=1") for d in admin_details(harness))


async def test_show_revoked_and_change_expiry(harness: GatewayHarness) -> None:
    harness.issue("radiology-bot")
    harness.issue("old-bot")
    harness.revoke("old-bot")
    async with running(harness) as pilot:
        screen = await show(pilot, "3", row="radiology-bot")
        assert [f["caller"] for f in screen.shown_rows] == ["radiology-bot"]
        await pilot.press("a")
        await wait_for(pilot, lambda: any(f["state"] == "revoked" for f in screen.shown_rows))
        await pilot.press("slash", *"state=revoked", "enter")
        await wait_for(pilot, lambda: [f["caller"] for f in screen.shown_rows] == ["old-bot"])
        screen.query_one("#filter", Input).value = ""
        await wait_for(pilot, lambda: len(screen.shown_rows) == 2)
        screen.select_row(next(_row_key(screen, "radiology-bot")))
        await pilot.press("e")
        form = await modal(pilot, ExpiryModal)
        form.query_one("#expires", Input).value = "yesterday"
        await pilot.press("enter")
        await modal(pilot, ActionScreen)  # the gateway refuses; its own words reach the operator
        await wait_for(pilot, lambda: any("expiry failed" in n.message for n in pilot.app._notifications))
        assert any("use 30d, 12h, 45m" in n.message for n in pilot.app._notifications)
        await pilot.press("e")
        form = await modal(pilot, ExpiryModal)
        form.query_one("#expires", Input).value = "12h"
        await pilot.press("enter")
        await wait_gateway(
            pilot,
            lambda: any(t["expires_at"] for t in source_of(harness).callers()["tokens"]),
        )
        await wait_for(pilot, lambda: any(f["expires"] for f in screen.shown_rows))
    assert any(d.startswith("token_expiry id=") for d in admin_details(harness))


# -- Keys --


async def test_provider_keys_remove_set_and_rotate(harness: GatewayHarness, upstream: FakeUpstream) -> None:
    before = {k["route"]: k["fingerprint"] for k in source_of(harness).keys()["keys"]}
    async with running(harness) as pilot:
        screen = await show(pilot, "6", row="anthropic")
        await pilot.press("d")
        await modal(pilot, ConfirmModal)
        assert "Remove the provider key of anthropic?" in screen_text(pilot)
        await pilot.press("y")
        await wait_for(pilot, lambda: any(f["state"] == "missing" for f in screen.shown_rows))
        assert "anthropic" in source_of(harness).keys()["routes_needing_keys"]

        await pilot.press("s")
        form = await modal(pilot, ProviderKeyModal)
        assert form.query_one("#route", Select).value == "anthropic"
        field = form.query_one("#key", SecretInput)
        form.query_one("#key", SecretInput).focus()
        await pilot.press(*"sk-ant-new-key-0001")
        assert "sk-ant-new-key-0001" not in screen_text(pilot)  # a password field: dots only
        await pilot.press("enter")
        await modal(pilot, ActionScreen)
        assert field.value == ""
        await wait_for(pilot, lambda: all(f["state"] == "set" for f in screen.shown_rows))

        screen.select_row("openai")
        await pilot.press("o")
        await modal(pilot, ConfirmModal)
        await pilot.press("y")
        form = await modal(pilot, ProviderKeyModal)
        form.query_one("#key", SecretInput).focus()
        await pilot.press(*"sk-openai-rotated-0002", "enter")
        await wait_gateway(
            pilot,
            lambda: (
                {k["route"]: k["fingerprint"] for k in source_of(harness).keys()["keys"]}.get("openai")
                != before["openai"]
            ),
        )
    token = harness.issue("radiology-bot")
    chat(harness, token)
    assert upstream.requests[-1].headers.get("authorization") == "Bearer sk-openai-rotated-0002"
    details = admin_details(harness)
    for verb in ("key_remove route=anthropic", "key_set route=anthropic", "key_rotate route=openai"):
        assert any(d.startswith(verb) for d in details), verb


# -- Policy --


async def test_import_a_newer_bundle(harness: GatewayHarness, upstream: FakeUpstream, tmp_path: Path) -> None:
    doc = policy_doc(upstream.base_url, version=2)
    doc["organizations"]["stmarys"]["roles"]["nurses"] = {"models": ["openai/gpt-4o-mini"]}
    bundle = write_bundle(harness, tmp_path / "policy-v2.dsse.json", doc)
    async with running(harness) as pilot:
        dialog = await verify_in_modal(pilot, bundle)
        assert dialog.report is not None and dialog.report["ok"], dialog.report
        text = screen_text(pilot)
        assert "Policy v2 (verified, not imported yet); in force now: v1" in text
        for check in ("signature", "scope", "rollback"):
            assert f"✓ {check}" in text
        assert any(
            c["section"] == "roles" and c["name"] == "stmarys/nurses" for c in dialog.report["changes"]
        )
        assert source_of(harness).policy()["version"] == 1  # verified, not imported
        dialog.query_one("#activate", Button).press()
        await modal(pilot, ConfirmModal)
        assert "Activate policy v2 in place of v1?" in screen_text(pilot)
        await pilot.press("y")
        screen = await modal(pilot, ActionScreen)
        await wait_for(pilot, lambda: (getattr(screen, "doc", None) or {}).get("version") == 2)
    assert source_of(harness).policy()["version"] == 2
    assert any(d.startswith("policy_import v2") for d in admin_details(harness))


@pytest.mark.parametrize(
    ("overrides", "check"),
    [({"scope": {"sites": ["another-site"]}, "version": 3}, "scope"), ({"version": 1}, "rollback")],
    ids=["wrong-site", "same-version"],
)
async def test_a_refused_bundle_changes_nothing(
    harness: GatewayHarness, upstream: FakeUpstream, tmp_path: Path, overrides: dict[str, Any], check: str
) -> None:
    bundle = write_bundle(harness, tmp_path / "bundle.json", policy_doc(upstream.base_url, **overrides))
    imports_before = [d for d in admin_details(harness) if d.startswith("policy_import")]
    async with running(harness) as pilot:
        dialog = await verify_in_modal(pilot, bundle)
        report = dialog.report
        assert report is not None and not report["ok"] and report["check"] == check
        text = screen_text(pilot)
        assert f"REFUSED by the check '{check}'" in text and "Nothing was changed." in text
        assert dialog.query_one("#activate", Button).disabled
        await pilot.press("escape")
        await modal(pilot, ActionScreen)
    assert source_of(harness).policy()["version"] == 1
    assert [d for d in admin_details(harness) if d.startswith("policy_import")] == imports_before


async def test_reload(harness: GatewayHarness) -> None:
    async with running(harness) as pilot:
        await show(pilot, "5")
        await pilot.press("r")
        await wait_gateway(pilot, lambda: any(d.startswith("policy_reload") for d in admin_details(harness)))


# -- Models --


@pytest.fixture
def local_gateway(tmp_path: Path, upstream: FakeUpstream) -> Iterator[GatewayHarness]:
    folder = tmp_path / "models"
    folder.mkdir()
    sha = write_tiny_model(folder / "tiny.gguf", seed=0)
    h = GatewayHarness(tmp_path)
    shutil.copy(folder / "tiny.gguf", h.home.models_dir / "tiny.gguf")
    doc = policy_doc(upstream.base_url)
    doc["models"] = {"local/tiny": {"file": "tiny.gguf", "sha256": sha, "n_ctx": 512}}
    h.import_policy(doc)
    h.set_provider_keys()
    h.start()
    yield h
    h.stop()


def model_state(harness: GatewayHarness) -> str:
    return str(source_of(harness).models()["models"][0]["state"])


async def test_load_and_unload_a_local_model(local_gateway: GatewayHarness) -> None:
    async with running(local_gateway) as pilot:
        screen = await show(pilot, "4", row="local/tiny")
        assert model_state(local_gateway) == "not loaded"
        await pilot.press("l")
        await wait_gateway(pilot, lambda: model_state(local_gateway) == "ready", within_s=60)
        await wait_for(pilot, lambda: screen.shown_rows[0]["state"] == "ready")
        await pilot.press("u")
        await modal(pilot, ConfirmModal)
        assert "Unload local/tiny?" in screen_text(pilot)
        await pilot.press("n")
        await modal(pilot, ActionScreen)
        assert model_state(local_gateway) == "ready"
        await pilot.press("u")
        await modal(pilot, ConfirmModal)
        await pilot.press("y")
        await wait_gateway(pilot, lambda: model_state(local_gateway) == "not loaded")
    details = admin_details(local_gateway)
    assert any(d.startswith("model_load local/tiny") for d in details)
    assert any(d.startswith("model_unload local/tiny") for d in details)


# -- read-only --

ACTION_KEYS = {"3": "ixe", "4": "lu", "5": "mr", "6": "sod"}


def gateway_state(harness: GatewayHarness) -> list[Any]:
    source = source_of(harness)
    models = [{k: m[k] for k in ("model", "state")} for m in source.models()["models"]]
    return [source.callers(all=True), source.keys(), source.policy()["sha256"], models]


async def test_read_only_refuses_every_action(harness: GatewayHarness) -> None:
    harness.issue("radiology-bot")
    before, records = gateway_state(harness), admin_details(harness)
    async with running(harness, read_only=True) as pilot:
        app = pilot.app
        assert isinstance(app, PhiConsole)
        assert not [e for e in app.catalog() if e.changes]  # the palette lists none of them
        for key, keys in ACTION_KEYS.items():
            screen = await show(pilot, key)
            changing = screen.changing_actions()
            assert changing and len(changing) == len(keys)
            shown = {b.binding.action for b in app.active_bindings.values() if b.binding.show and b.enabled}
            assert not shown & changing  # nor the footer
            footer = screen_text(pilot).splitlines()[-1]
            for letter, action, _description, changes in screen.ACTIONS:
                binding = next(b for b in screen.BINDINGS if getattr(b, "action", None) == action)
                if changes:
                    assert f"{letter} {binding.description}" not in footer  # type: ignore[union-attr]
            if key == "3":
                screen.select_row(screen._rows[0][0])
            for letter in keys:
                await pilot.press(letter)
                await pilot.pause(0.1)
                assert app.screen is screen, f"{letter} opened {app.screen}"
            messages = [n.message for n in app._notifications]
            assert sum("read-only console" in m for m in messages) >= len(keys), messages
        await pilot.press("ctrl+p", *"revoke")  # the palette: nothing that changes something
        await pilot.pause(0.5)
        assert "Revoke the selected" not in screen_text(pilot)
        await pilot.press("escape")
    assert gateway_state(harness) == before
    assert admin_details(harness) == records
