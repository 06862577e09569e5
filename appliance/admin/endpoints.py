"""Every endpoint of the admin socket, gathered from the modules that own them (the table ``api`` serves)."""

from __future__ import annotations

from appliance.admin import audit, callers, keys, ledger, live, policy
from appliance.admin.api import Handler


def all_routes() -> dict[tuple[str, str], Handler]:
    return {**live.ROUTES, **audit.ROUTES, **callers.ROUTES, **policy.ROUTES, **keys.ROUTES, **ledger.ROUTES}
