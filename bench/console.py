"""Console responsiveness: key press to repaint, with the gateway idle and at full load, in one run.

Starts, on loopback only, a fast fake upstream and a real gateway (each its own process, as in
``bench/gateway.py``), then runs the console headless (``App.run_test``) in this process, talking to the
gateway's admin socket like an operator's console over SSH. It measures two kinds of key press:

* ``switch``: a number key (1 -> 2 -> 7 -> 1 …) until the compositor has painted the new screen;
* ``filter``: a letter typed into the audit screen's filter until the painted update shows it.

Each is measured with the gateway idle, then again while ``bench/loadgen.py`` (its own process) drives the
gateway at full load, so the audit tail streams thousands of records a second into the console. The
repaint is timestamped where Textual hands the compositor's update to the terminal driver (``App._display``;
headless, nothing is written, everything before it is done). Bounded: about a minute in all.

    .venv/bin/python -m bench.console [--seconds 12] [--connections 16]

Target: p99 <= 100 ms, with and without load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from textual.screen import Screen
from textual.widgets import Input

from bench.drill_gateway import free_port, wait_port
from bench.gateway import CHAT, ROOT, _cpus, _gateway_cmd, _prepare_home, _process
from tui.app import PhiConsole
from tui.client import AdminSource

TARGET_P99_MS = 100.0
SWITCH_KEYS = ("2", "7", "1")
LETTERS = "radiologybilling"


class RepaintClock:
    """Wraps ``app._display`` so a measurement can wait for the next painted update that satisfies it."""

    def __init__(self, app: PhiConsole) -> None:
        self._app = app
        self._waiting: tuple[Callable[[Screen[Any]], bool], asyncio.Future[float]] | None = None
        original = app._display

        def display(screen: Screen[Any], renderable: Any) -> None:
            original(screen, renderable)
            if renderable is not None and self._waiting is not None:
                condition, future = self._waiting
                if not future.done() and condition(screen):
                    future.set_result(time.perf_counter())

        app._display = display  # type: ignore[method-assign]

    def expect(self, condition: Callable[[Screen[Any]], bool]) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting = (condition, future)
        return future


async def _measure(app: PhiConsole, clock: RepaintClock, seconds: float) -> dict[str, list[float]]:
    """Alternate screen switches and filter letters for ``seconds``; returns milliseconds per kind."""
    samples: dict[str, list[float]] = {"switch": [], "filter": []}
    stop_at = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < stop_at:
        turn += 1
        key = SWITCH_KEYS[turn % len(SWITCH_KEYS)]
        target = app.get_screen(key)
        samples["switch"].append(await _press(app, clock, key, lambda screen, t=target: screen is t))
        await asyncio.sleep(0.05)
        if key == "2":  # on the audit screen: type into its filter, then leave it empty again
            samples["filter"] += await _type_filter(app, clock, target, LETTERS[turn % 8 : turn % 8 + 4])
        await asyncio.sleep(0.05)
    return samples


async def _type_filter(app: PhiConsole, clock: RepaintClock, audit: Screen[Any], letters: str) -> list[float]:
    field = audit.query_one("#filter", Input)
    await _press(app, clock, "slash", lambda screen: field.has_focus)
    samples = []
    for letter in letters:
        typed = field.value + letter
        samples.append(
            await _press(app, clock, letter, lambda screen, v=typed: screen is audit and field.value == v)
        )
        await asyncio.sleep(0.03)
    field.value = ""
    await _press(app, clock, "escape", lambda screen: not field.has_focus)
    return samples


async def _press(
    app: PhiConsole, clock: RepaintClock, key: str, painted: Callable[[Screen[Any]], bool]
) -> float:
    future = clock.expect(painted)
    start = time.perf_counter()
    app.simulate_key(key)
    done = await asyncio.wait_for(future, timeout=5.0)
    return (done - start) * 1000


async def _console_run(
    socket: Path, phases: list[tuple[str, Callable[[], Any], float]]
) -> list[tuple[str, dict[str, list[float]]]]:
    app = PhiConsole(AdminSource(socket, timeout=30), cursor_blink=False, tune_gc=True)
    results: list[tuple[str, dict[str, list[float]]]] = []
    async with app.run_test(size=(120, 40)) as pilot:
        clock = RepaintClock(app)
        await pilot.press("2")  # start the audit tail: it follows the gateway through every phase
        await pilot.pause(1.0)
        for name, start_phase, seconds in phases:
            with start_phase():
                await pilot.pause(1.0)  # let the load (or the quiet) settle in
                results.append((name, await _measure(app, clock, seconds)))
    return results


@contextmanager
def _quiet() -> Iterator[None]:
    yield


def _loadgen(
    port: int, token: str, connections: int, seconds: float, cpus: set[int] | None
) -> Callable[[], Any]:
    args = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--connections",
            str(connections), "--seconds", str(seconds), "--body", CHAT % ("openai/gpt-4o", ""),
            "--header", f"Authorization: Bearer {token}"]  # fmt: skip

    @contextmanager
    def loaded() -> Iterator[None]:
        with _process(args, cpus):
            yield

    return loaded


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12.0, help="duration of each phase")
    ap.add_argument("--connections", type=int, default=16, help="load generator connections")
    args = ap.parse_args()
    gw_cpus, other_cpus = _cpus()
    up_port, gw_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="phi-bench-console-") as tmp:
        home, token = _prepare_home(Path(tmp), up_port)
        upstream_cmd = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(up_port), "--fast"]
        audit = open(Path(tmp) / "audit.jsonl", "w")
        with _process(upstream_cmd, other_cpus):
            wait_port(up_port, timeout=30.0)
            with _process(_gateway_cmd(home, gw_port), gw_cpus, stdout=audit):
                wait_port(gw_port, timeout=30.0)
                load = _loadgen(gw_port, token, args.connections, args.seconds + 3, other_cpus)
                phases = [
                    ("idle", _quiet, args.seconds),
                    (f"load {args.connections} conn", load, args.seconds),
                ]
                results = asyncio.run(_console_run(home.admin_socket, phases))
        audit.close()
        records = sum(1 for _ in open(Path(tmp) / "audit.jsonl"))
    _print(results, records, args.seconds)


def _print(results: list[tuple[str, dict[str, list[float]]]], records: int, seconds: float) -> None:
    print(f"console key press -> repaint (120x40, audit tail live; {records:,} audit records in the run)")
    print(
        f"{'phase':<18}{'key':<8}{'samples':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  target p99 <= 100 ms"
    )
    for phase, samples in results:
        for kind, values in samples.items():
            p50, p99 = statistics.median(values) if values else float("nan"), _pct(values, 99)
            verdict = "ok" if p99 <= TARGET_P99_MS else "MISSED"
            worst = max(values, default=0.0)
            print(f"{phase:<18}{kind:<8}{len(values):>8}{p50:>9.1f}{p99:>9.1f}{worst:>9.1f}  {verdict}")
    print(f"(each phase {seconds:.0f} s; load from bench/loadgen.py in its own process)")


if __name__ == "__main__":
    main()
