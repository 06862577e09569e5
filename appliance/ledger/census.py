"""Which requests a set of verified ledgers holds: every request of a site behind a load balancer must be
in exactly one node's ledger (a request in two ledgers was replayed or copied; a request with no outcome
record was cut off: the gateway died, or the export ends between its two records).

Owns: ``census`` and ``Census``. Never: counts a bundle that did not verify (the caller passes only those
that did); reads anything but the export lines it is given.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Census:
    per_origin: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    in_several: dict[str, list[str]] = field(default_factory=dict)
    """request_id -> the origins whose ledgers each hold it (more than one: a problem)."""

    @property
    def ok(self) -> bool:
        return not self.in_several

    def describe(self) -> str:
        counts = ", ".join(f"{origin} {count}" for origin, count in sorted(self.per_origin.items()))
        if self.ok:
            return (
                f"requests: {self.requests} distinct across {len(self.per_origin)} ledger(s) ({counts}); "
                "each is in exactly one ledger"
            )
        sample = "; ".join(f"{rid} in {' and '.join(o)}" for rid, o in list(self.in_several.items())[:3])
        return f"requests: {len(self.in_several)} request id(s) are in more than one ledger: {sample}"


def census(bundles: Iterable[tuple[str, Path]]) -> Census:
    """``bundles``: (origin, export lines file) of bundles that verified. Records of one request in one
    ledger (its intent and its outcome) count once; the same origin's overlapping exports too."""
    where: dict[str, set[str]] = defaultdict(set)
    for origin, path in bundles:
        with path.open("rb") as handle:
            for line in handle:
                request_id = json.loads(line).get("request_id")
                if isinstance(request_id, str):
                    where[request_id].add(origin)
    result = Census(requests=len(where))
    for request_id, origins in where.items():
        for origin in origins:
            result.per_origin[origin] = result.per_origin.get(origin, 0) + 1
        if len(origins) > 1:
            result.in_several[request_id] = sorted(origins)
    return result
