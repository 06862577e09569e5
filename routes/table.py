"""The route table: from a caller's ``provider/model`` to the route that serves it.

Owns: building one ``Route`` per policy route entry (once per policy, reused by every request) and
``RouteTable.resolve``. It must never decide whether a caller may use a model (that is the policy
engine's) and never touch provider keys (the pipeline fetches them from the vault).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from appliance.errors import NotFound
from routes.anthropic import AnthropicRoute
from routes.client import UpstreamClient
from routes.openai import OpenAIRoute
from routes.result import NO_HINTS, Hints, RouteResult
from routes.upstream import RouteSpecLike

__all__ = ["Route", "RouteSpecLike", "RouteTable"]


class Route(Protocol):
    """What the pipeline calls on a route, whatever serves it (cloud adapter or in-process model).

    The pipeline has checked ``body`` first (``stream``, when present, is a bool); routes do not again.
    """

    name: str
    kind: str

    async def chat_completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        """``/v1/chat/completions``: ``body`` is the caller's parsed JSON; the answer is OpenAI-shaped.

        ``hints`` (``routes.result.Hints``): the caller's priority and organization, for local models.
        """
        ...

    async def completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        """``/v1/completions`` (legacy text completions); routes that cannot serve it raise BadRequest."""
        ...

    async def embeddings(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        """``/v1/embeddings``; routes that cannot serve it raise BadRequest."""
        ...

    async def messages(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        """``/v1/messages`` (Anthropic Messages API); routes that cannot serve it raise BadRequest."""
        ...


class RouteTable:
    """Routes by provider name, built from the policy's ``routes`` section."""

    def __init__(
        self,
        specs: Mapping[str, RouteSpecLike],
        client: UpstreamClient,
        *,
        local: Callable[[str], Route] | None = None,
    ) -> None:
        """``local(name)`` builds the route for a policy route of kind "local" (in-process models)."""
        self._routes: dict[str, Route] = {}
        for name, spec in specs.items():
            if spec.kind == "openai":
                self._routes[name] = OpenAIRoute(name, spec, client)
            elif spec.kind == "anthropic":
                self._routes[name] = AnthropicRoute(name, spec, client)
            elif spec.kind == "local":
                if local is not None:
                    self._routes[name] = local(name)
            else:
                raise ValueError(f"route {name}: unknown kind {spec.kind!r}")
        self._local_names = frozenset(name for name, spec in specs.items() if spec.kind == "local")

    def resolve(self, model: str) -> tuple[Route, str]:
        """(route, upstream model) for ``provider/model``; the split is at the first "/"."""
        provider, slash, upstream_model = model.partition("/")
        if not slash or not provider or not upstream_model:
            raise NotFound(
                f"model {model[:200]!r} is not of the form provider/model",
                code="model_not_found",
                param="model",
            )
        route = self._routes.get(provider)
        if route is None:
            if provider in self._local_names:
                raise NotFound("local models are not available yet", code="model_not_found", param="model")
            raise NotFound(
                f"no route named {provider[:100]!r} for model {model[:200]!r}",
                code="model_not_found",
                param="model",
            )
        return route, upstream_model

    def __contains__(self, provider: object) -> bool:
        return provider in self._routes

    def __iter__(self) -> Iterator[str]:
        return iter(self._routes)
