"""Mutual TLS as a policy decides it: whether a caller's connection must have presented a client
certificate, and whose.

Owns: ``Certificate`` (what the handshake says of the client's certificate) and ``check`` (the role's
``client_certificate`` rule, else its organization's, against it). The pipeline's Police calls it before
the body is read; ``PolicyEngine.evaluate`` applies it for ``policy explain``: one decision for both.
Never: trusts a subject the handshake did not verify; decides for a role the policy lacks (the engine's
role check refuses that, with its own reason).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.policy.schema import Policy

__all__ = ["Certificate", "check"]


@dataclass(frozen=True, slots=True)
class Certificate:
    """What the connection's TLS handshake says of a client certificate."""

    presented: bool
    """A certificate was presented and verified against the site's client CA."""
    subject: str | None = None
    """Its RFC 4514 subject (``appliance.x509_names``' canonical form)."""
    client_ca: bool = True
    """The gateway asks clients for certificates at all (``server.tls.client_ca_file`` is set)."""


def check(policy: Policy, org: str, role: str, certificate: Certificate) -> tuple[str, str, str] | None:
    """The role's ``client_certificate`` rule (else its organization's) against the certificate the
    connection's TLS handshake verified: None when it passes (or neither has a rule), else the refusal's
    reason, the rule's path and the message for the caller."""
    organization = policy.organizations.get(org)
    spec = None if organization is None else organization.roles.get(role)
    if organization is None or spec is None:
        return None  # an unknown role is refused by the role check, with its own reason
    rule, path = organization.client_certificate, f"organizations.{org}.client_certificate"
    if spec.client_certificate is not None:
        rule, path = spec.client_certificate, f"organizations.{org}.roles.{role}.client_certificate"
    if rule is None:
        return None
    # Without a client CA the gateway asks for no certificate, so none can ever be presented.
    if not (certificate.presented and certificate.client_ca):
        if not rule.required:
            return None
        if not certificate.client_ca:
            return (
                "client_certificate_required",
                path,
                "this caller's role requires a client certificate (mutual TLS), but this gateway asks "
                "clients for none: its operator must set server.tls.client_ca_file",
            )
        return (
            "client_certificate_required",
            path,
            "this caller's role requires a client certificate (mutual TLS); the connection presented none",
        )
    if rule.subjects and certificate.subject not in rule.subjects:
        return (
            "client_certificate_not_allowed",
            path,
            "the client certificate's subject is not one this caller's role accepts",
        )
    return None
