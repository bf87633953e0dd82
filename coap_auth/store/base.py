"""The `Store` protocol: everything coap-auth persists, behind one async interface.

SQLite (default) and PostgreSQL implement it and pass one contract test suite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from coap_auth.keys import SigningKey
from coap_auth.store.audit import AuditEntry, AuditEvent, AuditSnapshot
from coap_auth.store.records import (
    UNCHECKED,
    Audience,
    ChangeCounters,
    Client,
    IssuedAccess,
    Minted,
    RefreshFamily,
    RefreshOutcome,
    RegistryChange,
    RegistrySnapshot,
    RegistryVersions,
    TokenStatus,
    TrlUpdate,
)
from coap_auth.store.registry_mac import RegistryReport

M = TypeVar("M")

# Called inside the refresh transaction with the family, once the refresh is decided to
# rotate: returns the successor's access token, or a refusal (Minted.access None: nothing is
# written), never raises. A store may rerun a transaction that lost a race (PostgreSQL: a
# deadlock or serialization failure), calling this again: the last call's result is the one
# stored and returned.
Mint = Callable[[RefreshFamily], Minted[M]]
# Called inside the key transaction with every stored key; returns the keys to insert or
# update (empty: nothing to do). Raising aborts and changes nothing. Like `Mint`, it may be
# called again if the transaction is rerun; only the last call's result is stored.
KeyTransition = Callable[[list[SigningKey]], list[SigningKey]]
# Called inside the registry transaction with the stored record (its MAC verified); returns
# the change to store. Raising (OperatorError) aborts and changes nothing. Like `Mint`, it may
# be called again if the transaction is rerun; only the last call's result is stored.
ClientChange = Callable[[Client], RegistryChange[Client]]
AudienceChange = Callable[[Audience], RegistryChange[Audience]]


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # Audiences and clients. `add_*` raise OperatorError on a duplicate id. Every change
    # made here and below appends its audit event in the same transaction. Each row is MACed
    # under the master key (coap_auth.store.registry_mac) when written; one whose MAC does
    # not verify is never returned (get_* answer None, list_* leave it out) and is logged.
    # `actor` is whom the audit event names (service.admin passes the operator's).
    async def add_audience(self, audience: Audience, actor: str) -> None: ...

    async def get_audience(self, audience_id: str) -> Audience | None: ...

    async def list_audiences(self) -> list[Audience]: ...

    async def add_client(self, client: Client, actor: str) -> None: ...

    async def get_client(self, client_id: str) -> Client | None: ...

    async def list_clients(self) -> list[Client]: ...

    async def disable_client(self, client_id: str, now: int, actor: str) -> bool: ...

    async def update_client(
        self, client_id: str, change: ClientChange, actor: str, now: int
    ) -> tuple[Client, int] | None:
        """Store what `change` makes of the client (None: no such client, or its row does not
        verify), MACed, with its audit event; kill the live families `change` names (their
        access tokens revoked in one TRL update), all in one transaction. Returns the stored
        record and how many families died."""
        ...

    async def remove_client(self, client_id: str, actor: str, now: int) -> int | None:
        """Kill the client's live families (their access tokens revoked in one TRL update;
        its TRL entries stay) and delete it, in one transaction; None: no such client."""
        ...

    async def update_audience(
        self, audience_id: str, change: AudienceChange, actor: str, now: int
    ) -> Audience | None:
        """As `update_client`, for an audience (its families are not touched); bumps the keys
        counter, so servers reload rotation policies."""
        ...

    async def remove_audience(self, audience_id: str, actor: str, now: int) -> int | None:
        """Kill the live families of the audience (their access tokens revoked in one TRL
        update) and delete it, in one transaction; raises OperatorError (changing nothing)
        while any client row names it; None: no such audience."""
        ...

    async def registry_snapshot(self) -> RegistrySnapshot:
        """The trusted clients and audiences, and whether the rows match the audit head, in
        one consistent read (what the /token path's registry cache loads)."""
        ...

    async def registry_report(self) -> RegistryReport:
        """Every client and audience row checked against its MAC, in one consistent read."""
        ...

    # Signing keys; secrets are encrypted at rest by the implementation, and gone once a key
    # has ended (removed or revoked).
    async def load_keys(self) -> list[SigningKey]: ...

    async def update_keys(
        self, transition: KeyTransition, actor: str, now: int
    ) -> list[SigningKey]:
        """Run `transition` on the stored keys and store what it returns, in one transaction
        that serialises with every other key update (on every instance); audit each created
        key and state change; bump the keys counter. Returns the changed keys."""
        ...

    # Client-assertion replay cache (docs/protocol.md): a cti seen before, until its exp, is
    # refused.
    async def remember_assertion(self, client_id: str, cti: bytes, exp: int, now: int) -> bool:
        """Record the cti; False if it was already recorded and has not expired."""
        ...

    # Refresh-token families (docs/protocol.md "Refresh tokens"). Refresh tokens are passed and
    # kept only as digests.
    async def start_family(
        self,
        family: RefreshFamily,
        refresh_digest: bytes,
        access: IssuedAccess,
        registry: RegistryVersions = UNCHECKED,
    ) -> bool:
        """A grant, in one transaction: the family, its first refresh token and the access
        token's record; False (nothing written) when a row of `registry` changed since."""
        ...

    async def rotate_refresh(
        self,
        refresh_digest: bytes,
        successor_digest: bytes,
        *,
        client_id: str,
        now: int,
        grace: int,
        idle_timeout: int,
        mint: Mint[M],
        registry: RegistryVersions = UNCHECKED,
    ) -> RefreshOutcome[M]:
        """Spend a refresh token and store its successor, in one transaction, as
        coap_auth.store.decisions.plan_refresh decides (RefreshStatus says each outcome).
        Before writing a rotation, the rows of `registry` and of the mint's own are checked
        (decisions.registry_current): stale, nothing written."""
        ...

    async def kill_families(self, client_id: str, reason: str, now: int, actor: str) -> int:
        """Kill every unkilled family of a client, revoking their unexpired access tokens in
        one TRL update; return how many families. A family past its own expiry counts too:
        a token refreshed just before the end outlives it."""
        ...

    async def kill_family_of(
        self, refresh_digest: bytes, client_id: str, reason: str, now: int
    ) -> bool:
        """Kill the live family this refresh token belongs to, if it is this client's."""
        ...

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        """Live (not killed, not expired) families, of one client or of all."""
        ...

    # Revocation (RFC 9770). Each change of the TRL is one numbered update; revoking bumps the
    # revocations counter.
    async def revoke_access(
        self, token_hash: bytes, client_id: str | None, now: int, actor: str
    ) -> bool:
        """Revoke a live access token we issued (to `client_id`, when given); False if
        there is no such live, unrevoked token."""
        ...

    async def token_status(self, token_hash: bytes) -> TokenStatus | None:
        """ "live" or "revoked" for an access token we issued and still keep a record of
        (records of tokens that expired unrevoked are swept), None otherwise."""
        ...

    async def token_hashes_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        """Hashes of the access tokens we keep a record of, from `low` to `high` inclusive
        (bytewise order), the first `limit`: what a prefix of a hash names."""
        ...

    async def is_revoked(self, token_hash: bytes) -> bool:
        """token_status(...) == "revoked"."""
        ...

    # A requester (RFC 9770 §5) is a registered id: the hashes pertaining to it are those of
    # tokens issued to it (client_id) or for it (audience). Each requester has its own update
    # collection (RFC 9770 §6.2): the updates that changed its hashes, numbered 1, 2, ... in
    # its own sequence. None (an unprotected reader, like the RFC's administrator) reads the
    # whole list and the history of every update.
    async def trl(self, requester: str | None = None) -> tuple[list[bytes], int, int]:
        """One consistent read: the full TRL (revoked hashes not yet delisted), or the part
        pertaining to `requester`, and the seqs of the first and last updates kept in its
        history (0, 0 when there is none)."""
        ...

    async def trl_bounds(self, requester: str | None = None) -> tuple[int, int]:
        """The seqs of the first and last updates kept in `requester`'s history (or the whole
        list's), (0, 0) when there is none."""
        ...

    async def trl_updates(
        self, first_seq: int, last_seq: int, requester: str | None = None
    ) -> list[TrlUpdate]:
        """The kept updates of `requester`'s history (or the whole list's) with seqs in
        [first_seq, last_seq], newest first."""
        ...

    async def trl_changes_since(self, trl_seq: int | None) -> tuple[frozenset[str], int]:
        """In one read: the requesters whose collections gained an update after the whole
        list's update `trl_seq` (none asked when None), and the seq of the list's newest."""
        ...

    async def sweep_expired(self, now: int, keep_updates: int) -> int:
        """Delist revoked tokens that have expired (one TRL update), forget expired unrevoked
        token records, keep the last `keep_updates` updates of each history (the whole list's
        and every requester's). Returns how many delisted."""
        ...

    async def next_trl_expiry(self) -> int | None:
        """The earliest exp among listed hashes: when the next sweep has work."""
        ...

    # Audit log: append-only, hash-chained (coap_auth.store.audit).
    async def append_audit(self, events: Iterable[AuditEvent]) -> None: ...

    async def audit_entries(self, last: int | None = None) -> list[AuditEntry]:
        """Every entry in order, or the last `last` ones."""
        ...

    async def audit_snapshot(self) -> AuditSnapshot:
        """In one consistent read: every entry, the head, and whether the store holds data."""
        ...

    # Change feed: counters bumped by every change observers must hear about.
    async def change_counters(self) -> ChangeCounters: ...

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        """Call `changed` whenever another instance may have changed something (PostgreSQL:
        LISTEN/NOTIFY, reconnecting forever). A store without push (SQLite) returns at once
        and its readers poll `change_counters`."""
        ...
