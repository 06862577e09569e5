"""The policy's limits and budgets as the bundle states them (counted in ``appliance.pipeline.limits``).

Owns: the optional ``limits`` and ``budgets`` sections of a role and the ``budgets`` of an organization:

    "roles": {"radiology": {
        "limits":  {"per_caller": {"requests_per_min": 60, "tokens_per_min": 20000},
                    "per_role":   {"requests_per_min": 600}},
        "budgets": {"per_caller": {"usd_per_day": 5}, "per_role": {"usd_per_month": 2000}}}}
    "organizations": {"stmarys": {"budgets": {"usd_per_month": 10000}, "roles": {...}}}

Never: counts anything; every field is optional, and an absent one means no limit.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    # The docstring under each field is its JSON Schema description (``policy schema``, the README).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


class Rate(_Frozen):
    """Rate caps over a sliding minute; a request above one is refused (429 ``rate_limited``)."""

    requests_per_min: int | None = Field(None, ge=1)
    """Requests admitted in any 60-second window."""
    tokens_per_min: int | None = Field(None, ge=1)
    """Prompt plus completion tokens in any 60-second window."""


class Spend(_Frozen):
    """Spend caps in USD, from ``pricing``; a request that would pass one is refused (429
    ``budget_exceeded``)."""

    usd_per_day: float | None = Field(None, ge=0)
    """Spend from the pricing table per UTC calendar day."""
    usd_per_month: float | None = Field(None, ge=0)
    """Spend from the pricing table per UTC calendar month."""


class RoleLimits(_Frozen):
    """A role's rate caps, per caller and for the role as a whole."""

    per_caller: Rate | None = None
    """Applies to each caller of the role separately."""
    per_role: Rate | None = None
    """Applies to all callers of the role together."""


class RoleBudgets(_Frozen):
    """A role's spend caps, per caller and for the role as a whole."""

    per_caller: Spend | None = None
    """Applies to each caller of the role separately."""
    per_role: Spend | None = None
    """Applies to all callers of the role together."""
