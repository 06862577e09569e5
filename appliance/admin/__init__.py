"""The operator plane of a running gateway: a JSON API on a unix socket (``api``) and its client (``client``).

This package's own module stays empty on purpose: the console (``tui``) imports ``appliance.admin.client``,
and must not pull in the server side, which reads the ledger and the vault.
"""
