"""Phi Gateway: the appliance process (wire, identity, policy, vault, ledger, CLI)."""

__version__ = "0.1.0"
