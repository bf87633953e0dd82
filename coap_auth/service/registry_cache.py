"""The registry (clients and audiences) in memory, for the /token path: a grant reads no store.

Loaded whole, and again when the change feed says the registry moved (the audit head's registry
digest moves with every add, change or removal). A grant names the rows it was decided from
(RegistryVersions) and the store writes nothing if one changed since: the service reloads and
decides again, so a change is exact for grants and refreshes. An authentication that fails on
the cache is asked of the store (a client added or re-keyed since). Rows edited in the database
without the master key are never used: the cache holds only rows whose MAC verified.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from coap_auth.store import Audience, Client, Store
from coap_auth.store.records import RegistryVersions

log = logging.getLogger("coap_auth.service")


class RegistryCache:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._clients: dict[str, Client] | None = None
        self._audiences: dict[str, Audience] = {}
        # The change feed's registry digest when the rows were loaded (None: not loaded).
        self._digest: bytes | None = None
        # One load at a time: the requests that find the cache empty wait for the same load.
        self._loading = asyncio.Lock()
        # Moves with every request to reload: a load that began before one is not installed.
        self._generation = 0

    async def client(self, client_id: str) -> Client | None:
        """The client as loaded, without a store read."""
        clients, _ = await self._loaded()
        return clients.get(client_id)

    async def audience(self, audience_id: str) -> Audience | None:
        """The audience as loaded; one not loaded is looked for again once the registry has
        moved (an audience added since the load)."""
        _, audiences = await self._loaded()
        found = audiences.get(audience_id)
        if found is None and await self.reload_if_moved():
            _, audiences = await self._loaded()
            found = audiences.get(audience_id)
        return found

    async def audiences(self) -> list[Audience]:
        _, audiences = await self._loaded()
        return list(audiences.values())

    def loaded_audience(self, audience_id: str) -> Audience | None:
        """The audience as loaded, without awaiting (inside a store transaction); None when
        not loaded. Call `audiences()` first."""
        return self._audiences.get(audience_id)

    def changed(self, digest: bytes) -> None:
        """The change feed's registry digest: reload at the next use if it moved."""
        if digest != self._digest:
            self.stale()

    async def reload_if_moved(self) -> bool:
        """Reload now if the registry moved since the load (one read of the change feed);
        whether it did. Rows that differ from the loaded ones while the registry has not moved
        were changed outside coap-auth: they are not taken up."""
        self.changed((await self._store.change_counters()).registry)
        if self._clients is not None:
            return False
        await self._loaded()
        return True

    def stale(self) -> None:
        """The store refused a grant decided from these rows: reload at the next use."""
        self._clients = None
        self._generation += 1

    async def _loaded(self) -> tuple[Mapping[str, Client], Mapping[str, Audience]]:
        clients = self._clients
        if clients is None:
            async with self._loading:
                while (clients := self._clients) is None:
                    await self._load()
        return clients, self._audiences

    async def _load(self) -> None:
        """Read the registry and install it, unless told to reload meanwhile (then the caller
        loads again: what was read may be older than the change that asked)."""
        generation = self._generation
        # The digest first: a change committed between the reads moves it again, and the
        # next tick reloads.
        digest = (await self._store.change_counters()).registry
        snapshot = await self._store.registry_snapshot()
        clients = {c.client_id: c for c in snapshot.clients}
        audiences = {a.audience_id: a for a in snapshot.audiences}
        if not snapshot.matches_head:
            # Rows put back to older sealed copies, or removed, outside coap-auth: which ones
            # cannot be told, so none is trusted until the registry is mended (audit verify
            # says how it differs; a restore, or the change that moves the head).
            if digest != self._digest:
                log.error(
                    "the client and audience rows are not the ones the audit head records (or"
                    " the head itself was changed): /token refuses every client; run"
                    " `coap-auth audit verify`"
                )
            clients, audiences = {}, {}
        if generation == self._generation:
            self._audiences = audiences
            self._clients, self._digest = clients, digest


def versions(client: Client, *audiences: Audience) -> RegistryVersions:
    """The rows a grant for `client` to `audiences` rests on."""
    return RegistryVersions(
        clients=((client.client_id, client.version),),
        audiences=tuple((a.audience_id, a.version) for a in audiences),
    )
