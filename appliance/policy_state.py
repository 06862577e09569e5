"""The policy in force inside a running gateway, and its atomic replacement.

Owns: the immutable ``PolicyState`` snapshot (policy, decision engine, route table) and the
``PolicyKeeper`` that notices a newly imported bundle or a changed trust file, re-verifies the stored
envelope against the current trust, and swaps the snapshot in one assignment. A request takes the
snapshot once, at its start, so requests in flight finish under the policy they began with.
Never: serves with a policy that no longer verifies or has expired (the state becomes ``None``: every API
request is refused, fail closed); builds anything per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.policy.engine import PolicyEngine
from appliance.policy.schema import Policy
from appliance.policy.store import PolicyStore, load_active
from appliance.policy.trust import TrustStore
from local_models.runtime import LocalRuntime
from routes.client import UpstreamClient
from routes.local import LocalRoute
from routes.table import Route, RouteTable

log = logging.getLogger("phi.policy")

WARN_DAYS = (14, 7, 1)
"""Remaining validity at which the gateway logs a warning that the policy in force will expire (once per
threshold and policy version): an expired policy refuses every request, so the authoring side must send a
renewed bundle before then."""


@dataclass(frozen=True, slots=True)
class PolicyState:
    policy: Policy
    engine: PolicyEngine
    routes: RouteTable

    @property
    def version(self) -> int:
        return self.policy.version


class PolicyKeeper:
    def __init__(
        self,
        store: PolicyStore,
        trust_path: Path,
        site: str,
        client: UpstreamClient,
        local: LocalRuntime | None = None,
    ) -> None:
        self._store = store
        self._local = local
        self._trust_path = trust_path
        self._site = site
        self._client = client
        self.current: PolicyState | None = None
        self.reason = "no policy imported"
        self._seen: tuple[int | None, float] = (None, -1.0)
        self._warned: tuple[int, int] | None = None  # (version, smallest threshold already warned of)
        self._task: asyncio.Task[None] | None = None

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if the stored policy or the trust file changed, or the policy expired (or ``force``).
        True if it reloaded."""
        version = self._store.current_version()
        try:
            trust_mtime = self._trust_path.stat().st_mtime
        except FileNotFoundError:
            trust_mtime = 0.0
        expired = self.current is not None and self.current.policy.expires_at <= datetime.now(UTC)
        if (version, trust_mtime) == self._seen and not expired and not force:
            return False
        try:
            policy, reason = load_active(self._store, TrustStore.load(self._trust_path), self._site)
        except Exception as exc:  # an unreadable trust file or policy row: fail closed, look again next time
            policy, reason = None, f"the policy cannot be loaded: {exc}"
        else:
            self._seen = (version, trust_mtime)
        old = self.current
        self.current = None if policy is None else self._build(policy)
        self.reason = reason
        if policy is None:
            log.warning("no policy in force (%s): every API request is refused", reason)
        elif old is None or old.version != policy.version:
            log.info("policy v%d in force (expires %s)", policy.version, policy.expires_at.isoformat())
        return True

    def remaining_s(self, now: datetime | None = None) -> float | None:
        """Seconds until the policy in force expires (None: no policy in force)."""
        state = self.current
        if state is None:
            return None
        return (state.policy.expires_at - (now or datetime.now(UTC))).total_seconds()

    def warn_of_expiry(self, now: datetime | None = None) -> str | None:
        """Log (and return) a warning when the policy in force has crossed one of ``WARN_DAYS`` since the
        last warning: at 14, 7 and 1 days left, once each per policy version (a gateway started with 5 days
        left warns once, for 7)."""
        state, left = self.current, self.remaining_s(now)
        if state is None or left is None or left <= 0:
            return None
        crossed = min((d for d in WARN_DAYS if left <= d * 86400), default=None)
        if crossed is None:
            return None
        if self._warned is not None and self._warned[0] == state.version and self._warned[1] <= crossed:
            return None
        self._warned = (state.version, crossed)
        message = (
            f"policy v{state.version} expires in {_duration(left)} ({state.policy.expires_at.isoformat()}): "
            "import a renewed bundle before then; at expiry every API request is refused"
        )
        log.warning("%s", message)
        return message

    def _build(self, policy: Policy) -> PolicyState:
        runtime = self._local
        local: Callable[[str], Route] | None = None
        if runtime is not None:
            runtime.use_policy(dict(policy.models))
            local = functools.partial(LocalRoute, runtime=runtime)
        routes = RouteTable(policy.routes, self._client, local=local)
        return PolicyState(policy=policy, engine=PolicyEngine(policy), routes=routes)

    def start(self, interval_s: float) -> None:
        self.refresh()
        self.warn_of_expiry()
        self._task = asyncio.get_running_loop().create_task(self._watch(interval_s), name="policy-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.refresh()
                self.warn_of_expiry()
            except Exception:  # a broken refresh must not kill the watcher; the old state stays
                log.exception("policy refresh failed; keeping the policy in force")


def _duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours = rest // 3600
    if days:
        return f"{days} day{'s' if days != 1 else ''} {hours} h"
    return f"{hours} h {rest % 3600 // 60} min"
