"""The shared store for several instances: PostgreSQL through asyncpg, the `Store` protocol
made of parts it holds, plus the signing keys and the assertion replay cache.

Same behaviour as the SQLite store (one contract suite runs against both). The parts: the
database (postgres_database: pool, transactions, advisory locks in the lock order its docstring
writes down, audit chain, change feed by NOTIFY/LISTEN), the registry (postgres_registry),
grants (postgres_grants: many in one transaction), refresh families (postgres_tokens) and
access tokens with the TRL (postgres_revocation, its statements in postgres_trl). What each
write decides comes from coap_auth.store.decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from coap_auth.keys import SigningKey
from coap_auth.store.audit import AuditEntry, AuditEvent, AuditSnapshot, key_events
from coap_auth.store.base import AudienceChange, ClientChange, KeyTransition, Mint
from coap_auth.store.key_rows import KEY_COLUMNS, key_from_row, key_to_row
from coap_auth.store.master_key import MasterKey
from coap_auth.store.postgres_database import Change, Conn, PostgresDatabase
from coap_auth.store.postgres_grants import PostgresGrants
from coap_auth.store.postgres_registry import PostgresRegistry
from coap_auth.store.postgres_revocation import PostgresRevocations
from coap_auth.store.postgres_tokens import PostgresTokens
from coap_auth.store.records import (
    UNCHECKED,
    Audience,
    ChangeCounters,
    Client,
    IssuedAccess,
    RefreshFamily,
    RefreshOutcome,
    RegistrySnapshot,
    RegistryVersions,
    TokenStatus,
    TrlUpdate,
)
from coap_auth.store.registry_changes import refuse_unless_intact
from coap_auth.store.registry_mac import RegistryReport

M = TypeVar("M")


class PostgresStore:
    def __init__(self, dsn: str, master_key: MasterKey, *, schema: str = "public") -> None:
        self._db = PostgresDatabase(dsn, master_key, schema=schema)
        self._revocations = PostgresRevocations(self._db)
        self._grants = PostgresGrants(self._db)
        self._tokens = PostgresTokens(self._db, self._revocations, self._grants)
        self._registry = PostgresRegistry(self._db, self._tokens)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._grants.close()
        await self._db.close()

    # -- audiences and clients -------------------------------------------------------------

    async def add_audience(self, audience: Audience, actor: str) -> None:
        await self._refuse_unless_intact()
        await self._registry.add_audience(audience, actor)

    async def get_audience(self, audience_id: str) -> Audience | None:
        return await self._registry.get_audience(audience_id)

    async def list_audiences(self) -> list[Audience]:
        return await self._registry.list_audiences()

    async def add_client(self, client: Client, actor: str) -> None:
        await self._refuse_unless_intact()
        await self._registry.add_client(client, actor)

    async def get_client(self, client_id: str) -> Client | None:
        return await self._registry.get_client(client_id)

    async def list_clients(self) -> list[Client]:
        return await self._registry.list_clients()

    async def _refuse_unless_intact(self) -> None:
        """Before a change of clients or audiences: the registry is the one the audit head
        records, in one consistent read (registry_changes.refuse_unless_intact). (A change
        made between this read and the write is an operator's: it moved the head too.)"""
        async with self._db.snapshot() as conn:
            refuse_unless_intact(await self._db.registry_matches_head(conn))

    async def registry_snapshot(self) -> RegistrySnapshot:
        return await self._registry.snapshot()

    async def disable_client(self, client_id: str, now: int, actor: str) -> bool:
        await self._refuse_unless_intact()
        return await self._registry.disable_client(client_id, now, actor)

    async def update_client(
        self, client_id: str, change: ClientChange, actor: str, now: int
    ) -> tuple[Client, int] | None:
        await self._refuse_unless_intact()
        return await self._registry.update_client(client_id, change, actor, now)

    async def remove_client(self, client_id: str, actor: str, now: int) -> int | None:
        await self._refuse_unless_intact()
        return await self._registry.remove_client(client_id, actor, now)

    async def update_audience(
        self, audience_id: str, change: AudienceChange, actor: str, now: int
    ) -> Audience | None:
        await self._refuse_unless_intact()
        return await self._registry.update_audience(audience_id, change, actor, now)

    async def remove_audience(self, audience_id: str, actor: str, now: int) -> int | None:
        await self._refuse_unless_intact()
        return await self._registry.remove_audience(audience_id, actor, now)

    async def registry_report(self) -> RegistryReport:
        return await self._registry.registry_report()

    # -- signing keys ----------------------------------------------------------------------

    async def load_keys(self) -> list[SigningKey]:
        async with self._db.connection() as conn:
            return await self._load_keys(conn)

    async def _load_keys(self, conn: Conn) -> list[SigningKey]:
        rows = await conn.fetch(f"SELECT {KEY_COLUMNS} FROM signing_keys ORDER BY created_at, kid")
        return [key_from_row(self._db.master_key, r) for r in rows]

    async def update_keys(
        self, transition: KeyTransition, actor: str, now: int
    ) -> list[SigningKey]:
        async def update(conn: Conn) -> list[SigningKey]:
            await self._db.lock(conn, self._db.locks.keys)
            current = await self._load_keys(conn)
            changed = transition(current)
            if not changed:
                return []
            await conn.executemany(
                f"INSERT INTO signing_keys ({KEY_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                " ON CONFLICT (kid) DO UPDATE SET state = excluded.state,"
                " private_key = excluded.private_key, activated_at = excluded.activated_at,"
                " retire_until = excluded.retire_until, retired_at = excluded.retired_at,"
                " ended_at = excluded.ended_at",
                [key_to_row(self._db.master_key, k) for k in changed],
            )
            # Lock order (postgres_database): the change_feed row before the audit lock.
            await self._db.notify(conn, Change.KEYS)
            events = key_events({k.kid: k for k in current}, changed, actor, now)
            await self._db.audit(conn, events)
            return changed

        return await self._db.transaction(update)

    # -- replay cache ------------------------------------------------------------------------

    async def remember_assertion(self, client_id: str, cti: bytes, exp: int, now: int) -> bool:
        async def remember(conn: Conn) -> bool:
            await conn.execute("DELETE FROM assertion_replay WHERE exp < $1", now)
            status = await conn.execute(
                "INSERT INTO assertion_replay (client_id, cti, exp) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                client_id,
                cti,
                exp,
            )
            return bool(status == "INSERT 0 1")

        return await self._db.transaction(remember)

    # -- refresh families --------------------------------------------------------------------

    async def start_family(
        self,
        family: RefreshFamily,
        refresh_digest: bytes,
        access: IssuedAccess,
        registry: RegistryVersions = UNCHECKED,
    ) -> bool:
        return await self._tokens.start_family(family, refresh_digest, access, registry)

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
        return await self._tokens.rotate_refresh(
            refresh_digest,
            successor_digest,
            client_id=client_id,
            now=now,
            grace=grace,
            idle_timeout=idle_timeout,
            mint=mint,
            registry=registry,
        )

    async def kill_families(self, client_id: str, reason: str, now: int, actor: str) -> int:
        return await self._tokens.kill_families(client_id, reason, now, actor)

    async def kill_family_of(
        self, refresh_digest: bytes, client_id: str, reason: str, now: int
    ) -> bool:
        return await self._tokens.kill_family_of(refresh_digest, client_id, reason, now)

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        return await self._tokens.list_families(client_id, now)

    # -- revocation (RFC 9770) ---------------------------------------------------------------

    async def revoke_access(
        self, token_hash: bytes, client_id: str | None, now: int, actor: str
    ) -> bool:
        return await self._revocations.revoke_access(token_hash, client_id, now, actor)

    async def token_status(self, token_hash: bytes) -> TokenStatus | None:
        return await self._revocations.token_status(token_hash)

    async def token_hashes_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        return await self._revocations.token_hashes_between(low, high, limit)

    async def is_revoked(self, token_hash: bytes) -> bool:
        return await self._revocations.is_revoked(token_hash)

    async def trl(self, requester: str | None = None) -> tuple[list[bytes], int, int]:
        return await self._revocations.trl(requester)

    async def trl_bounds(self, requester: str | None = None) -> tuple[int, int]:
        return await self._revocations.trl_bounds(requester)

    async def trl_updates(
        self, first_seq: int, last_seq: int, requester: str | None = None
    ) -> list[TrlUpdate]:
        return await self._revocations.trl_updates(first_seq, last_seq, requester)

    async def trl_changes_since(self, trl_seq: int | None) -> tuple[frozenset[str], int]:
        return await self._revocations.trl_changes_since(trl_seq)

    async def sweep_expired(self, now: int, keep_updates: int) -> int:
        return await self._revocations.sweep_expired(now, keep_updates)

    async def next_trl_expiry(self) -> int | None:
        return await self._revocations.next_trl_expiry()

    # -- audit log and change feed -------------------------------------------------------------

    async def append_audit(self, events: Iterable[AuditEvent]) -> None:
        await self._db.append_audit(events)

    async def audit_entries(self, last: int | None = None) -> list[AuditEntry]:
        return await self._db.audit_entries(last)

    async def audit_snapshot(self) -> AuditSnapshot:
        return await self._db.audit_snapshot()

    async def change_counters(self) -> ChangeCounters:
        return await self._db.change_counters()

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        await self._db.watch_changes(changed)
