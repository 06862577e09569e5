"""A running gateway: the parts assembled around one HTTP server, and their start and orderly stop.

Owns: the assembly (TLS of the listener, vault, policy keeper, upstream client, pipeline, API, server), the
audit record of what the server itself refused (431/413/408/400/503 before any handler ran), and the
shutdown order: stop listening, drain in-flight requests, stop watching the certificate and the policy,
close upstream connections, and only then close the vault, whose writer finishes every queued record first.
Never: serves before the vault is open; serves plain HTTP beyond loopback unless the operator chose it
(``appliance.tls.listener_tls`` decides, before anything opens); leaves the ledger writer with records it
has not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from prometheus_client import CollectorRegistry

from appliance.activity import Activity
from appliance.admin import live
from appliance.admin.api import AdminApi, AdminContext
from appliance.admin.endpoints import all_routes
from appliance.admin.verify_job import VerifyJob
from appliance.api import Api
from appliance.config import Settings
from appliance.errors import LedgerUnavailable, StorageUnavailable, Unavailable
from appliance.home import Home, Vault
from appliance.http import HttpLimits, HttpServer
from appliance.http.server import Rejection, install_event_loop_policy
from appliance.ledger.checkpoints import HEAD_INTERVAL_S
from appliance.ledger.follow import ExportFollower
from appliance.metrics import CONTENT_TYPE, GatewayMetrics
from appliance.pipeline import Pipeline
from appliance.pipeline.limits import LimitKeeper
from appliance.policy.importer import MAX_BUNDLE_BYTES
from appliance.policy_state import PolicyKeeper
from appliance.tls import ServerTls, is_loopback, listener_tls, plain_transport
from local_models.runtime import LocalRuntime
from routes.client import UpstreamClient

log = logging.getLogger("phi.gateway")


class Gateway:
    def __init__(
        self, home: Home, settings: Settings | None = None, *, audit_out: TextIO | None = None
    ) -> None:
        home.require_initialized()
        self.home = home
        self.settings = settings or home.settings()
        self._audit_out = audit_out
        self.vault: Vault | None = None
        self.server: HttpServer | None = None
        self.keeper: PolicyKeeper | None = None
        self._client: UpstreamClient | None = None
        self.admin: HttpServer | None = None
        self._started = time.monotonic()
        self.local: LocalRuntime | None = None
        self._preload: asyncio.Task[None] | None = None
        self.limits: LimitKeeper | None = None
        self.pipeline: Pipeline | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._exporter: ExportFollower | None = None
        self.tls: ServerTls | None = None
        self._transport: Callable[[], dict[str, Any]] | None = None  # what /health says of the listener
        self._metrics: GatewayMetrics | None = None
        self.registry = CollectorRegistry(auto_describe=False)  # activity's counters and the scrape's gauges
        self.activity = Activity(self.registry)
        self._admin_context: AdminContext | None = None

    async def start(
        self, host: str | None = None, port: int | None = None, *, sock: socket.socket | None = None
    ) -> HttpServer:
        settings = self.settings
        listen_host = _listen_host(host or settings.server.host, sock)
        # Before anything opens: a home whose certificate cannot be served, or plain HTTP on the network
        # that the operator did not ask for, stops the start with a message saying what to run.
        self.tls = tls = listener_tls(self.home.root, settings.server, listen_host)
        self.vault = vault = self.home.open_vault(audit_out=self._audit_out)
        activity = self.activity
        activity.bind(asyncio.get_running_loop())
        vault.ledger.watch(activity.take)
        await asyncio.to_thread(lambda: activity.rebuild(vault.db.reader()))
        if settings.audit.export_file is not None:  # relative: under the home
            export_file = self.home.root / settings.audit.export_file
            export_file.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._exporter = ExportFollower(self.home.vault_path, export_file).start_thread()
            log.info("audit lines are also appended to %s (continuous export)", export_file)
        self._client = UpstreamClient(
            max_per_origin=settings.upstream.max_connections_per_origin,
            connect_timeout_s=settings.upstream.connect_timeout_s,
            ca_file=settings.upstream.ca_file,
        )
        self.local = LocalRuntime(self.home.models_dir, settings.local)
        self.keeper = keeper = PolicyKeeper(
            vault.policies, self.home.trust_path, settings.site, self._client, self.local
        )
        keeper.start(settings.policy.reload_interval_s)
        self.limits = LimitKeeper()
        rebuilt = await asyncio.to_thread(self.limits.rebuild, vault.db)
        log.info("limits and budgets rebuilt from %d outcome records of this month", rebuilt)
        self.pipeline = pipeline = Pipeline(
            vault.tokens,
            vault.keys,
            vault.ledger,
            keeper,
            self.limits,
            max_in_flight_per_caller=settings.server.max_in_flight_per_caller,
            flood_window_s=settings.audit.flood_window_s,
            client_ca=tls is not None and tls.client_ca is not None,
            on_first_chunk=activity.first_byte,
        )
        self._transport = transport = (
            tls.transport if tls is not None else functools.partial(plain_transport, listen_host)
        )
        api = Api(
            pipeline,
            keeper,
            vault.ledger,
            self.local,
            transport=transport,
            metrics=self.metrics if settings.server.public_metrics else None,
        )
        self.server = server = HttpServer(
            api.handle,
            settings.server.limits,
            on_reject=self._record_rejection,
            # /health says whether this node can serve (policy, ledger), not how busy it is this instant:
            # a load balancer must not drop a node because its request slots are momentarily full.
            exempt=lambda request: request.path == "/health" and request.method in ("GET", "HEAD"),
        )
        await server.start(
            host or settings.server.host,
            settings.server.port if port is None else port,
            sock=sock,
            ssl=tls.context if tls is not None else None,
        )
        if tls is not None:
            tls.start_watching()
        self._metrics = GatewayMetrics(
            keeper,
            vault.ledger,
            lambda: server.in_flight,
            transport,
            registry=self.registry,
            activity=activity,
            local=self.local.status,
            last_checkpoint=lambda: live.last_checkpoint_of(vault),
        )
        await self._start_admin()
        self._ticker = asyncio.get_running_loop().create_task(self._sign_ledger_head(), name="ledger-head")
        if settings.local.preload:
            self._preload = asyncio.get_running_loop().create_task(self.local.preload(), name="preload")
        state = keeper.current
        log.info(
            "phi-gateway listening on %s:%d; policy %s",
            host or settings.server.host,
            server.port,
            f"v{state.version} in force" if state else f"NOT in force ({keeper.reason}): refusing requests",
        )
        if tls is not None:
            info = tls.info
            log.info(
                "TLS in force (%s or newer): certificate %s, %s, expires %s; client certificates %s",
                f"TLSv{settings.server.tls.min_version}",
                info.subject,
                info.fingerprint,
                info.not_after.isoformat(),
                f"verified against {tls.client_ca}" if tls.client_ca else "not asked for",
            )
        elif not is_loopback(listen_host):
            log.warning(
                "PLAIN HTTP on %s by the operator's choice (insecure_http): tokens and prompts cross the "
                "network in clear; phi-gateway tls self-signed --host NAME makes a certificate",
                listen_host,
            )
        return server

    async def _start_admin(self) -> None:
        path = self.home.admin_socket
        if sys.platform == "win32":  # pragma: no cover - no unix sockets under the Windows event loop
            log.warning("no admin socket on Windows: the operator verbs that need one will say so")
            return
        assert self.vault is not None and self.keeper is not None and self.local is not None
        server = self.server
        self._admin_context = context = AdminContext(
            home=self.home,
            vault=self.vault,
            keeper=self.keeper,
            local=self.local,
            activity=self.activity,
            status=self.status,
            metrics=self.metrics,
            in_flight=lambda: server.in_flight if server is not None else 0,
            verify_job=VerifyJob(),
            started=self._started,
        )
        # A body is at most a policy bundle (verify, import); a stream holds one of the 16 slots.
        limits = HttpLimits(max_concurrency=16, max_body_bytes=MAX_BUNDLE_BYTES + 4096)
        self.admin = HttpServer(AdminApi(context, all_routes()).handle, limits)
        try:
            await self.admin.start_unix(str(path))
        except OSError as exc:  # a read-only home, say: say so rather than print a traceback
            raise StorageUnavailable(f"cannot create the admin socket {path}: {exc}") from exc
        log.info("admin API on %s (0600)", path)

    # -- what the admin socket reads ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        keeper, vault, server = self.keeper, self.vault, self.server
        state = keeper.current if keeper else None
        return {
            "uptime_s": round(time.monotonic() - self._started, 1),
            "site": self.settings.site,
            "policy": {
                "in_force": state is not None,
                "version": state.version if state else None,
                "expires_at": state.policy.expires_at.isoformat() if state else None,
                "expires_in_s": round(keeper.remaining_s() or 0) if state and keeper else None,
                "reason": keeper.reason if keeper else "not started",
            },
            "ledger": {
                "writable": vault.ledger.healthy if vault else False,
                "records": vault.ledger.count() if vault else None,
                "stdout_lines_dropped": vault.ledger.dropped_lines if vault else 0,
                "export_error": self._exporter.last_error if self._exporter else None,
            },
            "http": {"in_flight": server.in_flight if server else 0},
            "transport": self._transport() if self._transport is not None else None,
            "local_models": self.local.status() if self.local else {},
            "cpu_backend": self.local.cpu_backend() if self.local else None,
        }

    def metrics(self) -> tuple[bytes, str]:
        if self._metrics is None:
            raise Unavailable("the gateway is not serving")
        return self._metrics.render(), CONTENT_TYPE

    async def _sign_ledger_head(self) -> None:
        """Once a second, sign the ledger head if records came since: a quiet moment's records are signed
        within a second, not at the next busy one (and a stored checkpoint is written when one is due)."""
        while self.vault is not None:
            await asyncio.sleep(HEAD_INTERVAL_S)
            self.activity.drain()  # the counters stay current with nobody reading them
            if self.local is not None:
                self.activity.local_rates(self.local.status())
            try:
                await self.vault.ledger.tick()
            except (StorageUnavailable, LedgerUnavailable, sqlite3.Error) as exc:
                log.warning("the ledger head could not be signed: %s", exc)

    async def stop(self) -> None:
        if self._admin_context is not None:  # the audit streams end rather than wait out the drain
            self._admin_context.stopping.set()
            self.activity.wake_all()
        if self.admin is not None:
            await self.admin.shutdown()
            with contextlib.suppress(FileNotFoundError):
                self.home.admin_socket.unlink()
        if self.server is not None:
            await self.server.shutdown()
        if self.tls is not None:
            await self.tls.stop_watching()
        if self.keeper is not None:
            await self.keeper.stop()
        if self._preload is not None:
            self._preload.cancel()
        if self.local is not None:
            await self.local.close()
        if self._client is not None:
            await self._client.aclose()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.pipeline is not None:  # the count of unidentified refusals of the last window
            self.pipeline.record.flood.flush()
        if self.vault is not None:
            try:  # what the gateway recorded, signed and kept as it stops
                await asyncio.to_thread(self.vault.ledger.checkpoint, "shutdown")
            except (StorageUnavailable, LedgerUnavailable, sqlite3.Error) as exc:
                log.error("no shutdown checkpoint could be written: %s", exc)
            self.vault.close()
            self.vault = None
        if self._exporter is not None:  # after the vault: the shutdown records are exported too
            self._exporter.stop()
            self._exporter = None

    def _record_rejection(self, rejection: Rejection) -> None:
        if self.vault is None or self.pipeline is None:
            return
        record = {
            "type": "error",
            "request_id": rejection.request_id,
            "status_code": rejection.status,
            "decision": "denied",
            "detail": rejection.code,
        }
        self.pipeline.record.unidentified(record)

    def run(self, host: str | None = None, port: int | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain and stop (blocking)."""
        loop_name = install_event_loop_policy()
        log.info("event loop: %s", loop_name)
        asyncio.run(self._serve(host, port))

    async def _serve(self, host: str | None, port: int | None) -> None:
        server = await self.start(host, port)
        try:
            await server.serve_until_signalled()
        finally:
            await self.stop()


def _listen_host(host: str, sock: socket.socket | None) -> str:
    """The address the listener is on: an already bound socket's own, else the one asked for."""
    if sock is not None:
        address = sock.getsockname()
        if isinstance(address, tuple):
            return str(address[0])
    return host
