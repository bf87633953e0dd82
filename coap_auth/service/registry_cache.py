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
from collections.abc import Mapping

from coap_auth.store import Audience, Client, Store
from coap_auth.store.records import RegistryVersions


class RegistryCache:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._clients: dict[str, Client] | None = None
        self._audiences: dict[str, Audience] = {}
        # The registry digest the loaded rows are of (None: not loaded, or told to reload).
        self._digest: bytes | None = None
        # One load at a time: the requests that find the cache empty wait for the same load.
        self._loading = asyncio.Lock()

    async def client(self, client_id: str) -> Client | None:
        """The client as loaded, without a store read. (When authentication fails the service
        asks the store itself: a client added, or changed, since the load.)"""
        clients, _ = await self._loaded()
        return clients.get(client_id)

    async def audience(self, audience_id: str) -> Audience | None:
        """The audience as loaded; one not loaded is asked of the store (added since)."""
        _, audiences = await self._loaded()
        found = audiences.get(audience_id)
        if found is None:
            found = await self._store.get_audience(audience_id)
            if found is not None:
                self.stale()
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
            self._clients = None

    def stale(self) -> None:
        """The store refused a grant decided from these rows: reload at the next use."""
        self._clients = None

    async def _loaded(self) -> tuple[Mapping[str, Client], Mapping[str, Audience]]:
        clients = self._clients
        if clients is None:
            async with self._loading:
                clients = self._clients
                if clients is None:
                    clients = await self._load()
        return clients, self._audiences

    async def _load(self) -> dict[str, Client]:
        # The digest first: a change committed between the reads moves it again, and the
        # next tick reloads.
        digest = (await self._store.change_counters()).registry
        clients = {c.client_id: c for c in await self._store.list_clients()}
        self._audiences = {a.audience_id: a for a in await self._store.list_audiences()}
        self._clients, self._digest = clients, digest
        return clients


def versions(client: Client, *audiences: Audience) -> RegistryVersions:
    """The rows a grant for `client` to `audiences` rests on."""
    return RegistryVersions(
        clients=((client.client_id, client.version),),
        audiences=tuple((a.audience_id, a.version) for a in audiences),
    )
