"""The `Store` protocol: everything coap-auth persists, behind one async interface.

SQLite (default) and PostgreSQL implement it and pass one contract test suite.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from coap_auth.keys import SigningKey
from coap_auth.store.records import Audience, Client


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # Audiences and clients. `add_*` raise OperatorError on a duplicate id.
    async def add_audience(self, audience: Audience) -> None: ...

    async def get_audience(self, audience_id: str) -> Audience | None: ...

    async def list_audiences(self) -> list[Audience]: ...

    async def add_client(self, client: Client) -> None: ...

    async def get_client(self, client_id: str) -> Client | None: ...

    async def list_clients(self) -> list[Client]: ...

    async def disable_client(self, client_id: str) -> bool: ...

    # Signing keys; private parts are encrypted at rest by the implementation.
    async def load_keys(self) -> list[SigningKey]: ...

    async def save_keys(self, keys: Iterable[SigningKey]) -> None:
        """Insert or update these keys in one transaction and bump the change counter."""
        ...

    # Client-assertion replay cache (PROTOCOL.md: a cti seen before, until its exp, is refused).
    async def remember_assertion(self, client_id: str, cti: bytes, exp: int, now: int) -> bool:
        """Record the cti; False if it was already recorded and has not expired."""
        ...

    # Change feed: a counter bumped by every change observers must hear about.
    async def change_counter(self) -> int: ...
