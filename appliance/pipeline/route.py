"""Phase 3, Route: the verdict's ``provider/model`` is served by its adapter, falling back when allowed.

Owns: resolving the model to a route and upstream model name, swapping the caller's token for the route's
sealed provider key, calling the adapter for the endpoint, and trying the verdict's fallbacks in order when
a route is busy or down before it answers. Never: lets the provider key reach a log line, a record or an
error message (an unsealable key is reported by route name only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance.errors import GatewayError, OperatorError, RateLimited, Unavailable, UpstreamError
from appliance.pipeline.exchange import Exchange
from appliance.vault.provider_keys import ProviderKeys
from routes.result import Hints, RouteResult

log = logging.getLogger("phi.pipeline")

# The adapter method that serves each model endpoint.
_METHODS: dict[str, str] = {
    "chat": "chat_completions",
    "messages": "messages",
    "completions": "completions",
    "embeddings": "embeddings",
}

FallbackSeen = Callable[[str, str, GatewayError], None]
"""Told ``(from_model, to_model, error)`` when a route failed and the next allowed one is tried."""


class Route:
    def __init__(self, keys: ProviderKeys) -> None:
        self._keys = keys

    async def __call__(self, ex: Exchange, on_fallback: FallbackSeen) -> RouteResult:
        """Serve the verdict's model; if its route is busy or down before answering, the next fallback."""
        assert ex.verdict is not None
        models = [ex.verdict.model, *ex.verdict.fallbacks]
        for index, model in enumerate(models):
            try:
                result = await self._serve(ex, model)
            except (RateLimited, UpstreamError, Unavailable) as error:
                if index + 1 == len(models):
                    raise
                on_fallback(model, models[index + 1], error)
                continue
            ex.served = model
            return result
        raise AssertionError("unreachable: the last model's error is raised")

    async def _serve(self, ex: Exchange, model: str) -> RouteResult:
        assert ex.state is not None and ex.payload is not None
        route, upstream_model = ex.state.routes.resolve(model)
        spec = ex.state.policy.routes.get(route.name)
        key = None if spec is None or spec.auth == "none" else self._sealed_key(route.name)
        role = ex.state.engine.role(ex.caller.org, ex.caller.role) if ex.caller else None
        serve = getattr(route, _METHODS[ex.endpoint])
        result: RouteResult = await serve(
            ex.payload,
            upstream_model=upstream_model,
            key=key,
            # A local model's queue order, and the organization it shares cached prompts within.
            hints=Hints(role.priority if role else 0, ex.caller.org if ex.caller else ""),
        )
        return result

    def _sealed_key(self, name: str) -> str | None:
        try:
            return self._keys.get(name)
        except OperatorError as exc:  # wrong master key or an altered vault row: an operator must look
            log.error("the sealed provider key for route %s cannot be opened", name)
            message = f"the provider key for route {name} cannot be unsealed"
            raise GatewayError(message, code="vault_error") from exc
