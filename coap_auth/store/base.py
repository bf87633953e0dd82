"""The `Store` protocol: everything coap-auth persists, behind one async interface.

SQLite (default) and PostgreSQL implement it and pass one contract test suite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from coap_auth.keys import SigningKey
from coap_auth.store.records import Audience, Client, IssuedAccess, RefreshFamily, RefreshOutcome

# Called inside the refresh transaction to mint the successor's access token; raising
# aborts the refresh and changes nothing.
Mint = Callable[[RefreshFamily], IssuedAccess]


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

    # Refresh-token families (PROTOCOL.md "Refresh tokens"). Refresh tokens are passed and
    # kept only as digests.
    async def start_family(
        self, family: RefreshFamily, refresh_digest: bytes, access: IssuedAccess
    ) -> None: ...

    async def rotate_refresh(
        self,
        refresh_digest: bytes,
        successor_digest: bytes,
        *,
        client_id: str,
        now: int,
        grace: int,
        idle_timeout: int,
        mint: Mint,
    ) -> RefreshOutcome:
        """Spend a refresh token and store its successor, atomically.

        rotated: it was live. grace: it was spent less than `grace` s ago and its successor
        was still unused (that successor is spent instead). reused: spent otherwise, so the
        family is killed and its unexpired access tokens revoked. unknown / dead / expired:
        no such token for this client, family already dead, or idle/absolute expiry (which
        ends the family but leaves its access tokens to expire on their own).
        """
        ...

    async def kill_families(self, client_id: str, reason: str, now: int) -> int:
        """Kill every live family of a client, revoking their access tokens; return how many."""
        ...

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        """Live (not killed, not expired) families, of one client or of all."""
        ...

    async def revoked_token_hashes(self, now: int) -> list[bytes]:
        """Hashes of revoked access tokens that have not expired yet (the TRL's content)."""
        ...

    # Change feed: a counter bumped by every change observers must hear about.
    async def change_counter(self) -> int: ...
