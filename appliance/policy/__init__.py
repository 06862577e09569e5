"""Signed policy bundles: format, trust, import checks and the decision engine."""
