"""Test support: stand-ins for the world outside the gateway (the cloud providers)."""
