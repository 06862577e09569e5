"""The validator's output: one line per check, ``ok`` / ``FAIL`` / ``note``, the rule id, then the figure.

Owns the format of those lines and the failure count that becomes the exit status. A rule id is stable
(``ova.order``, ``oci.user``...) so that tests and operators can grep for it. Never raises.
"""

from __future__ import annotations

import sys
from typing import TextIO


class Report:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.failures = 0
        self.checks = 0

    def section(self, title: str) -> None:
        print(f"== {title}", file=self.out, flush=True)

    def ok(self, rule: str, text: str) -> None:
        self._line("ok", rule, text)

    def fail(self, rule: str, text: str) -> None:
        self.failures += 1
        self._line("FAIL", rule, text)

    def note(self, rule: str, text: str) -> None:
        self._line("note", rule, text)

    def detail(self, text: str) -> None:
        """An indented line under the check before it (a listing, a figure per member)."""
        print(f"       {text}", file=self.out, flush=True)

    def check(self, passed: bool, rule: str, text: str) -> bool:
        (self.ok if passed else self.fail)(rule, text)
        return passed

    def _line(self, status: str, rule: str, text: str) -> None:
        self.checks += 1
        print(f"{status:<4}  {rule:<24} {text}", file=self.out, flush=True)
