"""Hypothesis profiles for the fuzz harnesses, chosen by ``PHI_FUZZ_PROFILE`` (default ``ci``).

``ci``: a fixed number of examples per harness, derandomized (the same examples on every run, so a CI
failure reproduces anywhere), no example database and no deadline (two shared cores are slow and uneven).
``long``: many thousands of random examples per harness for ``./dev fuzz``; failures are kept in
``.hypothesis/`` and replayed first on the next run. ``PHI_FUZZ_EXAMPLES`` overrides its count.

Each harness scales its own count from the profile with ``examples()``: the HTTP harnesses cost a socket
round trip and an fsync per example, the pure ones microseconds.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILE_ENV = "PHI_FUZZ_PROFILE"
_SLOW_INPUTS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_INPUTS,
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("PHI_FUZZ_EXAMPLES", "5000")),
    deadline=None,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
    print_blob=True,
    suppress_health_check=_SLOW_INPUTS,
)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))
