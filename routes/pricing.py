"""Cost of one request in USD from the policy's per-million-token prices.

Owns: the arithmetic only. It must never guess a price: a model without one costs 0.0 (the audit record
says so by carrying no price).
"""

from __future__ import annotations

from typing import Protocol


class PriceLike(Protocol):
    """USD per million tokens, as the policy's ``pricing`` entries declare them."""

    @property
    def input_per_mtok(self) -> float: ...

    @property
    def output_per_mtok(self) -> float: ...


def cost_usd(price: PriceLike | None, tokens_in: int, tokens_out: int) -> float:
    """USD for ``tokens_in`` prompt and ``tokens_out`` completion tokens, rounded to 8 decimals."""
    if price is None:
        return 0.0
    total = (tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1_000_000
    return round(total, 8)
