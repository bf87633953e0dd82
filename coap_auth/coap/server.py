"""The running server: the aiocoap site on UDP only, the key schedule and the change feed.

`Server.start()` binds, `Server.stop()` releases everything; the CLI and the tests share it.
Every tick (the change-poll interval) applies what the key schedule and the TRL expiry say is
due, then notifies observers of whatever changed in the store, from this process or another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiocoap

from coap_auth import config
from coap_auth.addresses import authority
from coap_auth.coap.blockwise import BlockwiseUploads
from coap_auth.coap.edhoc import EdhocResource
from coap_auth.coap.endpoint import Endpoint
from coap_auth.coap.observers import Observers
from coap_auth.coap.options import OptionCheckingSite
from coap_auth.coap.resources import KeysResource, TokenResource, WellKnownCore
from coap_auth.coap.revocation import IntrospectResource, RevokeResource, TrlResource
from coap_auth.echo import AmplificationGuard, EchoValues, VerifiedAddresses
from coap_auth.errors import StoreUnavailable
from coap_auth.health import STORE_SILENCE_LIMIT, HealthSnapshot, MonitoringListener
from coap_auth.secure import provisioned
from coap_auth.secure.contexts import ContextTable
from coap_auth.secure.edhoc import Responder
from coap_auth.secure.site import ProtectedSite
from coap_auth.service import AuthService, ChangeCounters
from coap_auth.service.rate_limit import RateLimiter
from coap_auth.udp import create_server_context

log = logging.getLogger("coap_auth.server")


def build_site(
    service: AuthService,
    address_limits: RateLimiter,
    uploads: BlockwiseUploads,
    responder: Responder,
) -> tuple[OptionCheckingSite, KeysResource, TrlResource, Observers]:
    """The resources; `address_limits` is the one per-address budget shared by every POST
    endpoint and every block-wise fragment, `uploads` the one spool of block-wise uploads,
    `responder` the EDHOC responder behind /.well-known/edhoc. The observations of /keys and
    /revoke/trl are held, bounded and notified by the one `Observers` returned."""
    settings = service.settings
    observers = Observers(
        service.clock,
        per_source=settings.observers_per_source,
        maximum=settings.observers_max,
        rate=settings.notify_rate,
        con_interval=settings.notify_con_interval,
        max_block_size=settings.max_block_size,
    )
    site = OptionCheckingSite()
    keys = KeysResource(service)
    trl = TrlResource(service)
    keys.observers = trl.observers = observers
    endpoints: list[tuple[list[str], Endpoint]] = [
        ([".well-known", "core"], WellKnownCore(service, site.get_resources_as_linkheader)),
        ([".well-known", "edhoc"], EdhocResource(service, responder)),
        (["token"], TokenResource(service)),
        (["introspect"], IntrospectResource(service)),
        (["revoke"], RevokeResource(service)),
        (["revoke", "trl"], trl),
        (["keys"], keys),
    ]
    for path, endpoint in endpoints:
        endpoint.address_limits = address_limits
        endpoint.uploads = uploads
        site.add_resource(path, endpoint)
    return site, keys, trl, observers


class Server:
    def __init__(
        self, service: AuthService, bind: str, port: int, *, reuse_port: bool = False
    ) -> None:
        self.service = service
        self.bind = bind
        self.requested_port = port
        # Share the port with the other `serve --workers` processes (SO_REUSEPORT).
        self.reuse_port = reuse_port
        self.port: int | None = None
        self._context: aiocoap.Context | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        # Set by the store's push channel (PostgreSQL NOTIFY): tick now, not at the next poll.
        self._wake = asyncio.Event()
        self._failing = False
        settings = service.settings
        metrics = self.metrics = service.metrics
        self.address_limits = RateLimiter(
            service.clock, settings.rate_limit_per_address, settings.rate_limit_window
        )
        self.uploads = BlockwiseUploads(service.clock, settings.max_payload, self.address_limits)
        # The protected channel (docs/protocol.md "Protected channels"): contexts EDHOC made, in
        # memory only and bounded; the responder holds unauthenticated handshakes apart.
        self.contexts = ContextTable(
            service.clock.now,
            max_contexts=settings.oscore_max_contexts,
            idle_timeout=settings.oscore_idle_timeout,
        )
        self.edhoc = Responder(
            service.edhoc_identity,
            self.contexts,
            service.peer_keys,
            service.clock.now,
            max_pending=settings.edhoc_max_pending,
            per_address=settings.edhoc_pending_per_address,
            handshake_timeout=settings.edhoc_handshake_timeout,
            outcome=lambda outcome: metrics.edhoc_handshakes.labels(outcome).inc(),
        )
        site, self.keys_resource, self.trl_resource, self.observers = build_site(
            service, self.address_limits, self.uploads, self.edhoc
        )
        # RFC 9175 §2.4: no answer to an unverified source address over 3x its request.
        self.echo_values = EchoValues(service.echo_key(), service.clock)
        self.verified = VerifiedAddresses(
            service.clock,
            lifetime=settings.echo_verified_lifetime,
            max_entries=settings.echo_verified_max,
            networks=config.verified_networks(settings),
        )
        self.observers.is_verified = self.verified.is_verified
        self.guard = AmplificationGuard(
            ProtectedSite(site, self.contexts, service.clock),
            self.echo_values,
            self.verified,
            echo_first=_changes_state(settings.require_oscore, self.edhoc),
        )
        self._site = self.guard
        self._last_change = ChangeCounters(0, 0)
        self._tick_lock = asyncio.Lock()
        # Provisioned OSCORE contexts by directory name (None: did not load).
        self._provisioned: dict[str, Any] = {}
        # Read at scrape time, from the metrics listener's thread: len() of a dict only.
        for resource in (self.keys_resource, self.trl_resource):
            metrics.observers.labels(resource.path).set_function(
                functools.partial(self.observers.count, resource)
            )
        metrics.oscore_contexts.set_function(self.contexts.__len__)
        # What /healthz judges; the store is asked at least every change-poll interval.
        self.health = HealthSnapshot(
            metrics,
            service.clock.now,
            silence_limit=max(STORE_SILENCE_LIMIT, 3 * settings.change_poll_interval),
        )
        self.monitoring: MonitoringListener | None = None
        if settings.metrics_port:
            self.monitoring = MonitoringListener(
                metrics, self.health, settings.metrics_bind, settings.metrics_port
            )

    @property
    def url(self) -> str:
        return f"coap://{authority(self.bind, self.port)}"

    async def start(self) -> None:
        await self.service.load_keys()
        self._check_signing_key()
        await self.service.plan_trl_sweep()
        self._last_change = await self.service.change_counters()
        await self._count_trl()
        self.reload_provisioned()
        # UDP only (aiocoap would otherwise also open TCP and TLS listeners), on the transport
        # that reports an ICMP error to the peer it is about, not to whoever is sent to next.
        self._context = await create_server_context(
            self._site,
            (self.bind, self.requested_port),
            clock=self.service.clock,
            check_options=False,  # the site checks them itself, with an access-log line
            reuse_port=self.reuse_port,
        )
        self.port = _bound_port(self._context) or self.requested_port
        self.observers.token_manager = _token_manager(self._context)
        self.observers.start()
        self._watcher = asyncio.create_task(self._watch_changes(), name="coap-auth-change-feed")
        self._listener = asyncio.create_task(
            self.service.watch_changes(self._wake.set), name="coap-auth-listen"
        )
        if self.monitoring is not None:
            await self.monitoring.start()

    async def stop(self) -> None:
        if self.monitoring is not None:
            await self.monitoring.stop()
        for task in (self._watcher, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.observers.stop()
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
        # Provisioned contexts save their sequence numbers and replay windows (RFC 8613
        # Appendix B.1) and release their locks; EDHOC-made ones are simply forgotten.
        self.contexts.close()
        self._provisioned = {}

    async def check_changes(self) -> bool:
        """Notify observers of what changed in the store (this process, another instance or
        the CLI): reload keys for /keys, re-read the list for /revoke/trl."""
        counters = await self.service.change_counters()
        last = self._last_change
        # Each counter is taken as seen only once its reload worked: a failed reload (the
        # store busy or unreachable) is retried on the next tick.
        if counters.keys != last.keys:
            await self.service.load_keys()
            self._last_change = replace(self._last_change, keys=counters.keys)
            self.keys_resource.keys_changed()
            self.metrics.key_set_changes.inc()
            log.info("key set changed; observers notified")
        if counters.revocations != last.revocations:
            await self.service.plan_trl_sweep()
            self._last_change = replace(self._last_change, revocations=counters.revocations)
            self.trl_resource.trl_changed()
            await self._count_trl()
            log.info("revocation list changed; observers notified")
        return counters != last

    def reload_provisioned(self) -> None:
        """Follow `coap-auth clients oscore`: load the provisioned OSCORE contexts that
        appeared, drop the withdrawn ones (coap_auth.secure.provisioned); the rest, in use,
        are left alone."""
        root = self.service.settings.data_dir / provisioned.DIRECTORY
        current = provisioned.names(root)
        if current == sorted(self._provisioned):
            return
        kept = {name: self._provisioned[name] for name in current if name in self._provisioned}
        for name in current:
            if name not in kept:  # None when it does not load: logged once, not every tick
                kept[name] = provisioned.load(root / name)
        self._provisioned = kept
        self.contexts.set_provisioned([c for c in kept.values() if c is not None])
        log.info("%d provisioned OSCORE context(s) in use", len(self.contexts.provisioned))

    async def tick(self) -> None:
        """Apply what is due now, then notify observers of every change."""
        try:
            self.reload_provisioned()
        except Exception:  # the scheduled work below must go on whatever the directory holds
            log.exception("provisioned OSCORE contexts not reloaded")
        async with self._tick_lock:
            # Learn first of changes made elsewhere: a revocation there moves the next expiry.
            await self.check_changes()
            await self.service.advance_keys()
            await self.service.sweep_trl()
            await self.check_changes()
        self._check_signing_key()

    def _check_signing_key(self) -> None:
        """Note for /healthz whether the default family has an active key to sign with."""
        try:
            self.service.key_ring.active  # noqa: B018 (raises LookupError when there is none)
        except (LookupError, RuntimeError):
            self.health.active_key = False
        else:
            self.health.active_key = True

    async def _count_trl(self) -> None:
        """The TRL size gauge: one read of the whole list, after each change of it."""
        self.metrics.trl_hashes.set(await self.service.trl_size())

    async def _watch_changes(self) -> None:
        interval = self.service.settings.change_poll_interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.tick()
            except StoreUnavailable:
                if not self._failing:
                    log.error("store unreachable: answering 5.03 until it is back")
                self._failing = True
                continue
            except Exception:
                log.exception("scheduled work or change feed poll failed")
                continue
            if self._failing:
                log.info("store reachable again")
                self._failing = False


# Unprotected requests that change state when rendered (lab mode only: with require_oscore on
# they are refused, unrendered, in a few bytes): from an unverified address they get the Echo
# challenge before anything is rendered, never an answer rendered and then withheld.
_STATE_CHANGING = {("token",), ("revoke",), ("introspect",)}


def _changes_state(
    require_oscore: bool, responder: Responder | None = None
) -> Callable[[aiocoap.Message], bool]:
    """The AmplificationGuard's `echo_first`: unprotected POSTs to /token, /revoke and
    /introspect, while plain CoAP may reach them; and EDHOC message_1 while `responder` holds
    half its pending handshakes or more (Responder.under_pressure: spoofed addresses could
    otherwise push out a real device's handshake; only proven ones add more)."""
    from coap_auth.secure.edhoc import MESSAGE_1_PREFIX

    def echo_first(request: aiocoap.Message) -> bool:
        if request.code != aiocoap.POST:
            return False
        path = tuple(request.opt.uri_path)
        if path == (".well-known", "edhoc"):
            return (
                responder is not None
                and bytes(request.payload).startswith(MESSAGE_1_PREFIX)
                and responder.under_pressure
            )
        return not require_oscore and path in _STATE_CHANGING

    return echo_first


def _token_manager(context: aiocoap.Context) -> Any:
    """aiocoap's token manager of the UDP socket (it holds the requests being answered)."""
    for interface in context.request_interfaces:
        if hasattr(interface, "incoming_requests"):
            return interface
    return None


def _bound_port(context: aiocoap.Context) -> int | None:
    """The UDP port actually bound (differs from the requested one when that was 0)."""
    for interface in context.request_interfaces:
        token_interface = getattr(interface, "token_interface", None)  # not OSCORE's
        message_interface = getattr(token_interface, "message_interface", None)
        local_port = getattr(message_interface, "_local_port", None)
        if callable(local_port):
            return int(local_port())
    return None
