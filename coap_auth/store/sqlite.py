"""The embedded store: one SQLite file under the data directory, WAL mode, durable commits,
concurrent writes group-committed; signing keys and the replay cache here, the rest delegated.

SqliteStore holds the database (sqlite_base: connection, thread, group commit in sqlite_commit)
and the statements of each part, as functions of a connection: the registry (sqlite_registry),
issued tokens (sqlite_tokens; the TRL's statements in sqlite_trl), the audit chain and change
feed (sqlite_audit). Each public method is one op: one transaction, or a share of one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from coap_auth.keys import SigningKey
from coap_auth.store import sqlite_audit, sqlite_tokens, sqlite_trl
from coap_auth.store.audit import (
    SERVICE_ACTOR,
    AuditEntry,
    AuditEvent,
    AuditSnapshot,
    key_events,
)
from coap_auth.store.base import AudienceChange, ClientChange, KeyTransition, Mint
from coap_auth.store.decisions import FamilyKill
from coap_auth.store.key_rows import KEY_COLUMNS, key_from_row, key_to_row
from coap_auth.store.master_key import MasterKey
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
from coap_auth.store.sqlite_audit import SqliteAudit, bump_keys
from coap_auth.store.sqlite_base import SqliteDatabase
from coap_auth.store.sqlite_registry import SqliteRegistry
from coap_auth.store.sqlite_tokens import SqliteTokens

DB_FILE = "coap-auth.sqlite3"
M = TypeVar("M")
T = TypeVar("T")


class SqliteStore:
    def __init__(self, path: Path, master_key: MasterKey) -> None:
        self._master_key = master_key
        self.database = SqliteDatabase(path, master_key)
        self._audit = SqliteAudit(master_key.audit_mac)
        self._tokens = SqliteTokens(self._audit, master_key.registry_mac)
        self._registry = SqliteRegistry(master_key.registry_mac, self._audit, self._tokens)

    @classmethod
    def in_data_dir(cls, data_dir: Path, master_key: MasterKey) -> SqliteStore:
        return cls(data_dir / DB_FILE, master_key)

    async def open(self) -> None:
        await self.database.open()

    async def open_read_only(self) -> None:
        """Open a copy (a backup being checked) to read only (SqliteDatabase.open_read_only)."""
        await self.database.open_read_only()

    async def close(self) -> None:
        await self.database.close()

    # -- audiences and clients -------------------------------------------------------------

    async def add_audience(self, audience: Audience, actor: str) -> None:
        await self._registry_write(lambda c: self._registry.add_audience(c, audience, actor))

    async def get_audience(self, audience_id: str) -> Audience | None:
        return await self.database.read(lambda c: self._registry.get_audience(c, audience_id))

    async def list_audiences(self) -> list[Audience]:
        return await self.database.read(self._registry.list_audiences)

    async def add_client(self, client: Client, actor: str) -> None:
        await self._registry_write(lambda c: self._registry.add_client(c, client, actor))

    async def get_client(self, client_id: str) -> Client | None:
        return await self.database.read(lambda c: self._registry.get_client(c, client_id))

    async def list_clients(self) -> list[Client]:
        return await self.database.read(self._registry.list_clients)

    async def disable_client(self, client_id: str, now: int, actor: str) -> bool:
        return await self._registry_write(
            lambda c: self._registry.disable_client(c, client_id, now, actor)
        )

    async def update_client(
        self, client_id: str, change: ClientChange, actor: str, now: int
    ) -> tuple[Client, int] | None:
        return await self._registry_write(
            lambda c: self._registry.update_client(c, client_id, change, actor, now)
        )

    async def remove_client(self, client_id: str, actor: str, now: int) -> int | None:
        return await self._registry_write(
            lambda c: self._registry.remove_client(c, client_id, actor, now)
        )

    async def update_audience(
        self, audience_id: str, change: AudienceChange, actor: str, now: int
    ) -> Audience | None:
        return await self._registry_write(
            lambda c: self._registry.update_audience(c, audience_id, change, actor, now)
        )

    async def remove_audience(self, audience_id: str, actor: str, now: int) -> int | None:
        return await self._registry_write(
            lambda c: self._registry.remove_audience(c, audience_id, actor, now)
        )

    async def _registry_write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """A change of clients or audiences, in one write transaction that first checks the
        registry is the one the audit head records (registry_changes.refuse_unless_intact)."""

        def checked(conn: sqlite3.Connection) -> T:
            refuse_unless_intact(self._audit.registry_matches_head(conn))
            return op(conn)

        return await self.database.write(checked)

    async def registry_snapshot(self) -> RegistrySnapshot:
        return await self.database.read(self._registry.snapshot)

    async def registry_report(self) -> RegistryReport:
        return await self.database.read(self._registry.report)

    # -- signing keys ----------------------------------------------------------------------

    async def load_keys(self) -> list[SigningKey]:
        return await self.database.read(self._load_keys)

    def _load_keys(self, conn: sqlite3.Connection) -> list[SigningKey]:
        rows = conn.execute(
            f"SELECT {KEY_COLUMNS} FROM signing_keys ORDER BY created_at, kid"
        ).fetchall()
        return [key_from_row(self._master_key, r) for r in rows]

    async def update_keys(
        self, transition: KeyTransition, actor: str, now: int
    ) -> list[SigningKey]:
        def update(conn: sqlite3.Connection) -> list[SigningKey]:
            current = self._load_keys(conn)
            changed = transition(current)
            if not changed:
                return []
            conn.executemany(
                f"INSERT INTO signing_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (kid) DO UPDATE SET state = excluded.state,"
                " private_key = excluded.private_key, activated_at = excluded.activated_at,"
                " retire_until = excluded.retire_until, retired_at = excluded.retired_at,"
                " ended_at = excluded.ended_at",
                [key_to_row(self._master_key, k) for k in changed],
            )
            bump_keys(conn)
            self._audit.append(conn, key_events({k.kid: k for k in current}, changed, actor, now))
            return changed

        changed = await self.database.write(update)
        if any(key.private_key is None for key in changed):
            # A key ended and its sealed private part was dropped: drop its older copies too.
            await self.database.drop_old_frames()
        return changed

    # -- replay cache ------------------------------------------------------------------------

    async def remember_assertion(self, client_id: str, cti: bytes, exp: int, now: int) -> bool:
        def remember(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM assertion_replay WHERE exp < ?", (now,))
            cur = conn.execute(
                "INSERT OR IGNORE INTO assertion_replay (client_id, cti, exp) VALUES (?, ?, ?)",
                (client_id, cti, exp),
            )
            return cur.rowcount == 1

        return await self.database.write(remember)

    # -- refresh families ------------------------------------------------------------------

    async def start_family(
        self,
        family: RefreshFamily,
        refresh_digest: bytes,
        access: IssuedAccess,
        registry: RegistryVersions = UNCHECKED,
    ) -> bool:
        return await self.database.write(
            lambda c: self._tokens.start_family(c, family, refresh_digest, access, registry)
        )

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
        def rotate(conn: sqlite3.Connection) -> RefreshOutcome[M]:
            return self._tokens.rotate_refresh(
                conn,
                refresh_digest,
                successor_digest,
                client_id=client_id,
                now=now,
                grace=grace,
                idle_timeout=idle_timeout,
                mint=mint,
                registry=registry,
            )

        return await self.database.write(rotate)

    async def kill_families(self, client_id: str, reason: str, now: int, actor: str) -> int:
        def kill(conn: sqlite3.Connection) -> int:
            families = self._tokens.unkilled_families(conn, "client_id", client_id)
            self._tokens.kill(conn, families, FamilyKill(reason, actor), now)
            return len(families)

        return await self.database.write(kill)

    async def kill_family_of(
        self, refresh_digest: bytes, client_id: str, reason: str, now: int
    ) -> bool:
        def kill(conn: sqlite3.Connection) -> bool:
            family = self._tokens.family_of(conn, refresh_digest, client_id)
            if family is None:
                return False
            self._tokens.kill(conn, [family], FamilyKill(reason, SERVICE_ACTOR), now)
            return True

        return await self.database.write(kill)

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        return await self.database.read(lambda c: self._tokens.live_families(c, client_id, now))

    # -- revocation (RFC 9770 TRL) -------------------------------------------------------------

    async def revoke_access(
        self, token_hash: bytes, client_id: str | None, now: int, actor: str
    ) -> bool:
        return await self.database.write(
            lambda c: self._tokens.revoke_access(c, token_hash, client_id, now, actor)
        )

    async def token_status(self, token_hash: bytes) -> TokenStatus | None:
        return await self.database.read(lambda c: sqlite_tokens.token_status(c, token_hash))

    async def token_hashes_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        return await self.database.read(
            lambda c: sqlite_tokens.token_hashes_between(c, low, high, limit)
        )

    async def is_revoked(self, token_hash: bytes) -> bool:
        return await self.token_status(token_hash) is TokenStatus.REVOKED

    async def trl(self, requester: str | None = None) -> tuple[list[bytes], int, int]:
        return await self.database.read(lambda c: sqlite_trl.read_trl(c, requester))

    async def trl_bounds(self, requester: str | None = None) -> tuple[int, int]:
        return await self.database.read(lambda c: sqlite_trl.read_bounds(c, requester))

    async def trl_updates(
        self, first_seq: int, last_seq: int, requester: str | None = None
    ) -> list[TrlUpdate]:
        return await self.database.read(
            lambda c: sqlite_trl.read_updates(c, first_seq, last_seq, requester)
        )

    async def trl_changes_since(self, trl_seq: int | None) -> tuple[frozenset[str], int]:
        return await self.database.read(lambda c: sqlite_trl.read_changes_since(c, trl_seq))

    async def sweep_expired(self, now: int, keep_updates: int) -> int:
        return await self.database.write(lambda c: sqlite_trl.sweep(c, now, keep_updates))

    async def next_trl_expiry(self) -> int | None:
        return await self.database.read(sqlite_trl.next_expiry)

    # -- audit log and change feed -----------------------------------------------------------

    async def append_audit(self, events: Iterable[AuditEvent]) -> None:
        events = list(events)
        await self.database.write(lambda c: self._audit.append(c, events))

    async def audit_entries(self, last: int | None = None) -> list[AuditEntry]:
        return await self.database.read(lambda c: sqlite_audit.entries(c, last))

    async def audit_snapshot(self) -> AuditSnapshot:
        return await self.database.read(sqlite_audit.snapshot)

    async def change_counters(self) -> ChangeCounters:
        return await self.database.read(self._audit.change_counters)

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        """No push from a file: readers poll `change_counters`."""
        return None
