"""Signed policy bundles: format, trust, import checks, the policy store and the decision engine.

A bundle travels as one DSSE envelope (``dsse``) signed with Ed25519 keys (``keys``); the appliance
decides which keys it trusts and how many must sign (``trust``); ``importer.verify_bundle`` runs every
import check before the payload is read as a policy (``schema``); ``store`` keeps imported versions in the
vault and re-verifies the one in force at load; ``engine.PolicyEngine`` answers each request's question.

This package must never let unverified bytes become a policy, nor let the gateway run without one.
"""
