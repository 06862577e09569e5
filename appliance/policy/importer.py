"""The import checks a policy bundle must pass before it may be activated.

Owns: ``verify_bundle`` and the order of its checks (size, format, untrusted, unknown_key, signature,
threshold, schema, rotation, expired, not_yet_valid, scope, rollback), each failing with
``BundleRejected(check, message)`` in words an operator can act on.

Key rotation (TUF §5.3): a payload carrying ``trust`` (a new key set and threshold) passes only when it
is signed by a threshold of the keys trusted now (checked before the payload is read at all) AND by the
new set's threshold of the new keys (``rotation``). The verified set comes back as
``VerifiedBundle.new_trust``; the caller installs it with ``TrustStore.replace`` after activation. A
bundle signed only by the keys it carries fails like any bundle without the current threshold
(``unknown_key`` or ``threshold``): its payload, and so its trust set, is never read.

Must never: parse or interpret the payload before the signature threshold is met, count one key twice,
let a signature choose its own algorithm, trust a key because the bundle carries it, or change any
state (activation is ``store.PolicyStore``'s, installing a new trust set ``TrustStore.replace``'s).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from appliance.errors import BundleRejected
from appliance.policy.dsse import PAYLOAD_TYPE, Signature, parse_envelope
from appliance.policy.schema import Policy, TrustSpec, parse_policy
from appliance.policy.trust import TrustStore
from appliance.signing_keys import short_keyid
from appliance.timestamps import rfc3339

MAX_BUNDLE_BYTES = 1024 * 1024
CLOCK_SKEW = timedelta(minutes=5)
"""How far in the future ``issued_at`` may lie (the signer's and the appliance's clocks differ)."""


@dataclass(frozen=True)
class VerifiedBundle:
    policy: Policy
    payload: bytes
    envelope: bytes
    sha256: str
    """Hex SHA-256 of the envelope bytes as imported."""
    keyids: list[str]
    """The distinct trusted keys whose signatures verified, sorted."""
    new_trust: TrustSpec | None = None
    """The trust set this bundle rotates to (signed by both thresholds); install after activation."""


def verify_bundle(
    data: bytes,
    trust: TrustStore,
    *,
    site: str,
    current_version: int | None,
    now: datetime | None = None,
) -> VerifiedBundle:
    """Run every import check on ``data``; return the verified bundle or raise ``BundleRejected``."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleRejected(
            "size", f"the bundle is {len(data)} bytes; the limit is {MAX_BUNDLE_BYTES} bytes (1 MiB)"
        )
    envelope = parse_envelope(data)
    if envelope.payload_type != PAYLOAD_TYPE:
        raise BundleRejected(
            "format", f"payloadType is {envelope.payload_type!r}; a policy bundle has {PAYLOAD_TYPE!r}"
        )
    keyids = _check_signatures(envelope.pae(), envelope.signatures, trust)
    policy = parse_policy(envelope.payload)
    if policy.trust is not None:
        _check_rotation(envelope.pae(), envelope.signatures, policy.trust, trust)
    _check_freshness(policy, now)
    if site not in policy.scope.sites:
        raise BundleRejected(
            "scope",
            f"policy v{policy.version} is for site(s) {', '.join(policy.scope.sites)}, "
            f"not this site {site!r}",
        )
    if current_version is not None and policy.version <= current_version:
        relation = "the same as" if policy.version == current_version else "older than"
        raise BundleRejected(
            "rollback",
            f"policy v{policy.version} is {relation} v{current_version} in force; "
            "a new bundle needs a higher version",
        )
    return VerifiedBundle(
        policy, envelope.payload, data, hashlib.sha256(data).hexdigest(), keyids, policy.trust
    )


def _check_signatures(message: bytes, signatures: list[Signature], trust: TrustStore) -> list[str]:
    if not trust.keys:
        raise BundleRejected(
            "untrusted", "no policy signing keys are trusted on this appliance; add one with 'trust add'"
        )
    known = [s for s in signatures if trust.key(s.keyid) is not None]
    if not known:
        seen = ", ".join(sorted({short_keyid(s.keyid) for s in signatures}))
        raise BundleRejected(
            "unknown_key", f"the bundle is signed only by keys this appliance does not trust ({seen})"
        )
    valid = _valid_signers(message, known, trust, check="signature", which="key")
    if len(valid) < trust.threshold:
        raise BundleRejected(
            "threshold",
            f"the bundle has valid signatures from {len(valid)} trusted key(s); this appliance requires "
            f"{trust.threshold}",
        )
    return sorted(valid)


def _check_rotation(message: bytes, signatures: list[Signature], spec: TrustSpec, trust: TrustStore) -> None:
    """The new trust set must itself sign: ``spec.threshold`` distinct new keys, each valid."""
    new = TrustStore.from_spec(trust.path, spec)
    valid = _valid_signers(message, signatures, new, check="rotation", which="new key")
    if len(valid) < spec.threshold:
        raise BundleRejected(
            "rotation",
            f"the bundle carries a new trust set (threshold {spec.threshold} of {len(spec.keys)} keys) but "
            f"is signed by {len(valid)} of the new keys; a rotation must be signed by a threshold of the "
            "current keys and of the new keys",
        )


def _valid_signers(
    message: bytes, signatures: list[Signature], store: TrustStore, *, check: str, which: str
) -> set[str]:
    """Distinct key ids of ``store`` with a valid signature (each checked with its pinned scheme only).

    A signature by a key of ``store`` that does not verify rejects the bundle, even if enough others do;
    signatures by keys outside ``store`` are not counted.
    """
    valid: set[str] = set()
    for sig in signatures:
        key = store.key(sig.keyid)
        if key is None:
            continue
        if not key.verify(sig.sig, message):
            raise BundleRejected(
                check,
                f"signature by {which} {short_keyid(sig.keyid)} does not verify: "
                "the payload was altered or signed by another key",
            )
        valid.add(sig.keyid)
    return valid


def _check_freshness(policy: Policy, now: datetime | None) -> None:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if policy.expires_at <= now:
        raise BundleRejected(
            "expired",
            f"policy v{policy.version} expired at {_seconds(policy.expires_at)} (now {_seconds(now)})",
        )
    if policy.issued_at > now + CLOCK_SKEW:
        raise BundleRejected(
            "not_yet_valid",
            f"policy v{policy.version} is issued at {_seconds(policy.issued_at)}, more than 5 minutes "
            f"after now ({_seconds(now)}); check this appliance's clock",
        )


def _seconds(moment: datetime) -> str:
    return rfc3339(moment, seconds=True)
