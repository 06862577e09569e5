"""Routes: the route table, upstream adapters (OpenAI-compatible, Anthropic), usage and pricing."""
