"""How many examples a harness runs under the profile in force (see ``conftest``)."""

from __future__ import annotations

import os

from hypothesis import settings


def examples(ci: int, long_share: float = 1.0) -> settings:
    """``ci`` examples in CI; in the long profile its count, times ``long_share`` for costly harnesses."""
    if os.environ.get("PHI_FUZZ_PROFILE", "ci") == "ci":
        return settings(max_examples=ci)
    return settings(max_examples=max(ci, int(settings.default.max_examples * long_share)))
