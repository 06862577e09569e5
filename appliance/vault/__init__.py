"""The vault: one SQLite file holding sealed provider keys, hashed identity tokens, policies and the ledger."""
