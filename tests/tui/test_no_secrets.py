"""No secret leaves the gateway except the one time it must: a token issued and provider keys set through the
console appear on no screen (all seven) and in no answer of the admin API's reads, and the console keeps no
reference to an issued token once its SecretOnceModal has closed.

The only places the token may appear: the issue answer, and the SecretOnceModal while it is open (the test
checks that it does appear there, so the search below would find it anywhere else).
"""

from __future__ import annotations

import gc
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Select

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import PROVIDER_KEYS, GatewayHarness, policy_doc
from tests.tui.conftest import wait_for
from tests.tui.fixed import ActionSource
from tests.tui.test_action_screens import (
    chat,
    issue_through_console,
    modal,
    running,
    screen_text,
    show,
    source_of,
)
from tui.app import SCREENS, PhiConsole
from tui.modals import IssueTokenModal, ProviderKeyModal, SecretInput, SecretOnceModal
from tui.screens.base import ConsoleScreen

pytestmark = pytest.mark.anyio

GETS = [
    "/admin/status",
    "/admin/activity",
    "/admin/audit",
    "/admin/callers?all=1",
    "/admin/models",
    "/admin/policy",
    "/admin/keys",
    "/admin/ledger",
    "/admin/ledger/verify",
]


@pytest.fixture
def keyless(tmp_path: Path, upstream: FakeUpstream) -> Iterator[GatewayHarness]:
    """A running gateway with a policy and no provider key yet: the console sets them."""
    h = GatewayHarness(tmp_path)
    h.import_policy(policy_doc(upstream.base_url))
    h.start()
    yield h
    h.stop()


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [secret[:12] + "…" for secret in secrets if secret in text]


async def set_key_through_console(pilot: Pilot[None], route: str, key: str) -> None:
    screen = await show(pilot, "6")
    await wait_for(pilot, lambda: any(f["route"] == route for f in screen.shown_rows))
    await pilot.press("s")
    form = await modal(pilot, ProviderKeyModal)
    form.query_one("#route", Select).value = route
    form.query_one("#key", SecretInput).focus()
    await pilot.press(*key)
    assert not leaks(screen_text(pilot), [key])
    await pilot.press("enter")
    await modal(pilot, ConsoleScreen)
    await wait_for(pilot, lambda: any(f["route"] == route and f["state"] == "set" for f in screen.shown_rows))


async def test_no_screen_and_no_answer_shows_a_secret(keyless: GatewayHarness) -> None:
    rendered: dict[str, str] = {}
    async with running(keyless) as pilot:
        token = await issue_through_console(pilot, "radiology-bot")
        secrets = [token, token.partition(":")[2], *PROVIDER_KEYS.values()]
        shown = screen_text(pilot)
        assert token in shown  # the one place it may be, while the modal is open
        await pilot.press("escape")
        await modal(pilot, ConsoleScreen)
        for route, key in PROVIDER_KEYS.items():
            await set_key_through_console(pilot, route, key)
        assert chat(keyless, token)  # traffic, so the audit and the dashboard have something to show
        for cls in SCREENS:
            await pilot.press(cls.KEY)
            await wait_for(pilot, lambda cls=cls: isinstance(pilot.app.screen, cls))
            await pilot.pause(1.5)  # a poll or two: the screen's data has arrived
            rendered[cls.TITLE] = screen_text(pilot) + pilot.app.export_screenshot()
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        rendered["help"] = screen_text(pilot)
    assert len(rendered) == len(SCREENS) + 1
    for title, text in rendered.items():
        assert not leaks(text, secrets), f"the {title} screen shows a secret"

    source = source_of(keyless)
    answers = {path: json.dumps(source.call("GET", path)) for path in GETS}
    answers["/metrics"] = source.text("/metrics")
    for path, text in answers.items():
        assert not leaks(text, secrets), f"{path} answers with a secret"
    # the console really talked to this gateway: the token and the keys it set are there, by name only
    assert '"caller": "radiology-bot"' in answers["/admin/callers?all=1"]
    assert all(f'"route": "{route}"' in answers["/admin/keys"] for route in PROVIDER_KEYS)


def console_holders(secret: str) -> list[str]:
    """Containers anywhere in this process holding a string with ``secret`` in it."""
    gc.collect()
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, dict):
            items: Any = [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset):
            items = obj
        else:
            continue
        if any(isinstance(item, str) and secret in item for item in items):
            found.append(f"{type(obj).__name__}: {str(obj)[:120]}")
    return found


class FreshSecretSource(ActionSource):
    """Issues a secret no other test drew (a snapshot test's app outlives its test, holding its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.secret = secrets.token_hex(24)

    def issue(
        self, caller: str, org: str, role: str, expires: str | None = None, note: str | None = None
    ) -> Any:
        return {**super().issue(caller, org, role, expires, note), "token": f"{caller}:{self.secret}"}


async def test_the_token_is_forgotten_when_its_modal_closes() -> None:
    source = FreshSecretSource()
    secret = source.secret
    app = PhiConsole(source, cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await show(pilot, "3")
        await pilot.press("i")
        form = await modal(pilot, IssueTokenModal)
        form.query_one("#caller", Input).value = "radiology-bot"
        form.action_submit()
        secret_modal = await modal(pilot, SecretOnceModal)
        assert secret in screen_text(pilot)
        await pilot.press("c")
        assert app.clipboard.endswith(secret)
        await pilot.press("escape")
        await modal(pilot, type(screen))
        await pilot.pause(0.2)
        assert not secret_modal.showing
        assert app.clipboard == ""
        assert secret not in screen_text(pilot)
        assert secret not in app.export_screenshot()
        for node in [app, *app.screen_stack, *app.screen.walk_children()]:
            assert not any(secret in str(v) for v in vars(node).values()), node
        assert console_holders(secret) == []

        await pilot.press("i")  # again, and quit with the token on screen: it is forgotten all the same
        form = await modal(pilot, IssueTokenModal)
        form.query_one("#caller", Input).value = "billing-bot"
        form.action_submit()
        second = await modal(pilot, SecretOnceModal)
        assert second.showing
    assert not second.showing
