"""The running server: the aiocoap site on UDP only, and the store's change feed.

`Server.start()` binds, `Server.stop()` releases everything; the CLI and the tests share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiocoap
from aiocoap import resource

from coap_auth.coap.resources import KeysResource, TokenResource
from coap_auth.service import AuthService

log = logging.getLogger("coap_auth.server")


def build_site(service: AuthService) -> tuple[resource.Site, KeysResource]:
    site = resource.Site()
    keys = KeysResource(service)
    site.add_resource(
        [".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader)
    )
    site.add_resource(["token"], TokenResource(service))
    site.add_resource(["keys"], keys)
    return site, keys


class Server:
    def __init__(self, service: AuthService, bind: str, port: int) -> None:
        self.service = service
        self.bind = bind
        self.requested_port = port
        self.port: int | None = None
        self._context: aiocoap.Context | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._site, self.keys_resource = build_site(service)
        self._last_change = 0

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"coap://{host}:{self.port}"

    async def start(self) -> None:
        await self.service.load_keys()
        self._last_change = await self.service.store.change_counter()
        # UDP only: aiocoap would otherwise also open TCP (and TLS) listeners.
        self._context = await aiocoap.Context.create_server_context(
            self._site, bind=(self.bind, self.requested_port), transports=["udp6"]
        )
        self.port = _bound_port(self._context) or self.requested_port
        self._watcher = asyncio.create_task(self._watch_changes(), name="coap-auth-change-feed")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    async def check_changes(self) -> bool:
        """Reload keys if the store changed (another process, or the CLI); notify observers."""
        counter = await self.service.store.change_counter()
        if counter == self._last_change:
            return False
        self._last_change = counter
        await self.service.load_keys()
        self.keys_resource.keys_changed()
        log.info("key set changed; observers notified")
        return True

    async def _watch_changes(self) -> None:
        interval = self.service.settings.change_poll_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_changes()
            except Exception:
                log.exception("change feed poll failed")


def _bound_port(context: aiocoap.Context) -> int | None:
    """The UDP port actually bound (differs from the requested one when that was 0)."""
    for interface in context.request_interfaces:
        message_interface = getattr(interface.token_interface, "message_interface", None)
        local_port = getattr(message_interface, "_local_port", None)
        if callable(local_port):
            return int(local_port())
    return None
