"""Widgets the console's screens share: the filter bar, the key/value panel, in-place table updates.

Owns: nothing but the package. Never: talks to the gateway (widgets draw what screens give them).
"""
