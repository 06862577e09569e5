"""What the serving process does to itself so that its secrets cannot leave through a crash or a debugger.

Owns: ``forbid_core_dumps``: a core file size limit of zero (a crash writes no image of memory holding
the master key, provider keys or prompts), and on Linux ``PR_SET_DUMPABLE`` 0 (no core even where a
``core_pattern`` pipe ignores the limit; no ptrace attach or ``/proc/<pid>/mem`` read by other processes
of the same user).
Never: raises because a platform lacks one of these (it says what it could not do); loosens a limit.
"""

from __future__ import annotations

import ctypes
import os
import sys

_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> list[str]:
    """Forbid core dumps of this process; returns a line for each step the platform refused (else [])."""
    problems: list[str] = []
    try:
        import resource
    except ImportError:  # Windows: no rlimits, and no core files either
        return problems
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        problems.append(f"cannot set the core file size limit to 0: {exc}")
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                problems.append(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")
        except (OSError, AttributeError) as exc:
            problems.append(f"prctl is not available: {exc}")
    return problems
