"""Deny patterns a policy may hold: the check that keeps a site's regular expression from costing a request
more than a bounded search, and the bounds themselves.

Owns: ``check_deny_pattern`` (compile-check a pattern and measure its backtracking cost, read from the
stdlib's own regex parser) and the caps a role's patterns live under (length, count, cost, the characters
a role may scan).
Never: runs a pattern over text (the engine does); accepts backreferences, conditionals or unbounded
repeats.
"""

from __future__ import annotations

import re
import re._constants as _sre_constants  # the stdlib's own regex parser, read-only, to inspect patterns
import re._parser as _sre_parser
from typing import Any

__all__ = [
    "MAX_DENY_PATTERNS",
    "MAX_PATTERN_COST",
    "MAX_PATTERN_LENGTH",
    "MAX_REPEAT",
    "SCAN_BUDGET",
    "SCAN_LIMIT",
    "check_deny_pattern",
]

SCAN_LIMIT = 64 * 1024
"""Hard cap on the characters of message text the deny patterns of one request may scan."""
SCAN_BUDGET = 1 << 22
"""Backtracking steps one request's deny patterns may cost: a role scans ``SCAN_BUDGET // cost`` chars."""
MAX_PATTERN_COST = 1024
"""Largest total backtracking cost of one role's deny patterns (the role then scans 4 KiB)."""
MAX_REPEAT = 256
MAX_PATTERN_LENGTH = 512
MAX_DENY_PATTERNS = 64
_REPEATS = (_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT, _sre_constants.POSSESSIVE_REPEAT)


def check_deny_pattern(pattern: str) -> int:
    """Compile-check ``pattern`` and return its backtracking cost; ``ValueError`` if it is unsafe.

    The cost bounds the paths a match attempt at one position can take: a sequence multiplies its items'
    costs, an alternation adds its branches', a repeat ``{m,n}`` of a body costing ``c`` counts
    ``c**m + ... + c**n`` (its range, ``n - m + 1``, when ``c`` is 1). Nested and alternated repeats, the
    classic catastrophic shapes, blow through the cap and are refused; search time is about
    text length x cost.
    """
    try:
        parsed = _sre_parser.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{pattern[:70]!r} is not a valid regular expression: {exc}") from exc
    return _cost(parsed, pattern)


def _cost(items: Any, pattern: str) -> int:
    total = 1
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            if high == _sre_constants.MAXREPEAT:
                raise ValueError(
                    f"{pattern[:70]!r}: unbounded repeats (*, +, {{n,}}) take quadratic time over a "
                    "long prompt; give an upper bound, e.g. {0,64}"
                )
            if high > MAX_REPEAT:
                raise ValueError(f"{pattern[:70]!r}: a repeat may allow at most {MAX_REPEAT}")
            inner = _cost(body, pattern)
            if inner == 1:
                total *= high - low + 1
            else:
                paths = 0
                for k in range(low, high + 1):
                    paths += inner**k
                    if paths > MAX_PATTERN_COST:
                        break
                total *= paths
        elif op is _sre_constants.BRANCH:
            total *= sum(_cost(branch, pattern) for branch in av[1])
        elif op is _sre_constants.SUBPATTERN:
            total *= _cost(av[3], pattern)
        elif op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
            total *= _cost(av[1], pattern)
        elif op is _sre_constants.ATOMIC_GROUP:
            total *= _cost(av, pattern)
        elif op in (_sre_constants.GROUPREF, _sre_constants.GROUPREF_EXISTS):
            raise ValueError(f"{pattern[:70]!r}: backreferences and conditionals are not allowed")
        if total > MAX_PATTERN_COST:
            raise ValueError(
                f"{pattern[:70]!r}: backtracking cost above {MAX_PATTERN_COST} (nested, alternated or "
                "wide repeats); narrow the {m,n} ranges or use a character class"
            )
    return total
