"""The vault: one SQLite file with sealed provider keys, hashed tokens, policies and the ledger."""
