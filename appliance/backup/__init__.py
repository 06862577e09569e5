"""Backups of a home: ``seal`` (the passphrase-sealed stream) and ``archive`` (what a backup holds, and the
restore that checks all of it before the new home is put in place)."""
