"""PostgreSQL registry: audiences and clients, each row MACed under the master key (a row whose
MAC does not verify is never returned), every change audited in its own transaction.

A change that ends families (a client's key replaced, a client or audience removed) kills them
through PostgresTokens in the same transaction, after locking the registry row (lock order in
postgres_database).
"""

from __future__ import annotations

from dataclasses import replace

import asyncpg

from coap_auth.errors import OperatorError
from coap_auth.store.audit import AuditEvent, AuditName
from coap_auth.store.base import AudienceChange, ClientChange
from coap_auth.store.decisions import (
    FamilyKill,
    KillReason,
    audience_added_event,
    client_added_event,
    disable_event,
    removal_event,
)
from coap_auth.store.postgres_database import Change, Conn, PostgresDatabase
from coap_auth.store.postgres_tokens import PostgresTokens
from coap_auth.store.records import Audience, Client, RegistrySnapshot
from coap_auth.store.registry_changes import checked_change, refuse_if_named
from coap_auth.store.registry_mac import AUDIENCES, CLIENTS, RegistryReport
from coap_auth.store.rows import (
    AUDIENCE_COLUMNS,
    AUDIENCE_SELECT,
    CLIENT_COLUMNS,
    CLIENT_SELECT,
    assignments,
    audience_to_row,
    client_to_row,
    registry_report,
    sealed_row,
    stand_in_rows,
    trusted_audience,
    trusted_audiences,
    trusted_client,
    trusted_clients,
)

_CLIENT_SET = assignments(CLIENT_COLUMNS, lambda n: f"${n}")
_AUDIENCE_SET = assignments(AUDIENCE_COLUMNS, lambda n: f"${n}")


def _placeholders(count: int) -> str:
    return ", ".join(f"${n}" for n in range(1, count + 1))


class PostgresRegistry:
    def __init__(self, db: PostgresDatabase, tokens: PostgresTokens) -> None:
        self._db = db
        self._tokens = tokens
        self._mac = db.master_key.registry_mac
        self._stand_in_client, self._stand_in_audience = stand_in_rows(self._mac)

    # -- audiences ----------------------------------------------------------------------------

    async def add_audience(self, audience: Audience, actor: str) -> None:
        row = sealed_row(self._mac, AUDIENCES, audience_to_row(audience))

        async def add(conn: Conn) -> None:
            try:
                await conn.execute(
                    f"INSERT INTO audiences ({AUDIENCE_SELECT}) VALUES ({_placeholders(len(row))})",
                    *row,
                )
            except asyncpg.UniqueViolationError:
                raise OperatorError(f"audience {audience.audience_id!r} already exists") from None
            # Servers reload keys and rotation policies: a new family, a new longest lifetime.
            await self._db.notify(conn, Change.KEYS)
            await self._db.audit(conn, [audience_added_event(audience, actor)], registry=True)

        await self._db.transaction(add)

    async def get_audience(self, audience_id: str) -> Audience | None:
        rows = await self._db.fetch(
            f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = $1", audience_id
        )
        return trusted_audience(self._mac, rows, self._stand_in_audience)

    async def list_audiences(self) -> list[Audience]:
        rows = await self._db.fetch(f"SELECT {AUDIENCE_SELECT} FROM audiences ORDER BY audience_id")
        return trusted_audiences(self._mac, rows)

    async def snapshot(self) -> RegistrySnapshot:
        """See Store.registry_snapshot."""
        async with self._db.snapshot() as conn:
            clients = await conn.fetch(f"SELECT {CLIENT_SELECT} FROM clients ORDER BY client_id")
            audiences = await conn.fetch(
                f"SELECT {AUDIENCE_SELECT} FROM audiences ORDER BY audience_id"
            )
            matches = await self._db.registry_matches_head(conn)
        return RegistrySnapshot(
            tuple(trusted_clients(self._mac, clients)),
            tuple(trusted_audiences(self._mac, audiences)),
            matches,
        )

    async def update_audience(
        self, audience_id: str, change: AudienceChange, actor: str, now: int
    ) -> Audience | None:
        async def update(conn: Conn) -> Audience | None:
            found = await self._audience_for_update(conn, audience_id)
            if found is None:
                return None
            planned = checked_change(found, change(found), audience_id)
            row = sealed_row(self._mac, AUDIENCES, audience_to_row(planned.record))
            await conn.execute(
                f"UPDATE audiences SET {_AUDIENCE_SET} WHERE audience_id = ${len(row)}",
                *row[1:],
                audience_id,
            )
            # Servers reload rotation policies: a retiring key outlives the longest lifetime.
            await self._db.notify(conn, Change.KEYS)
            event = AuditEvent(now, actor, planned.event, audience_id, planned.details)
            await self._db.audit(conn, [event], registry=True)
            return planned.record

        return await self._db.transaction(update)

    async def remove_audience(self, audience_id: str, actor: str, now: int) -> int | None:
        async def remove(conn: Conn) -> int | None:
            # The audience row first: a client added meanwhile waits for it (add_client),
            # or has committed and is counted here.
            if await self._audience_for_update(conn, audience_id) is None:
                return None
            named = [r["audiences"] for r in await conn.fetch("SELECT audiences FROM clients")]
            refuse_if_named(audience_id, named)
            families = await self._tokens.unkilled_families(conn, "audience", audience_id)
            kill = FamilyKill(KillReason.AUDIENCE_REMOVED, actor)
            await self._tokens.kill(conn, families, kill, now)
            await conn.execute("DELETE FROM audiences WHERE audience_id = $1", audience_id)
            await self._db.notify(conn, Change.KEYS)
            event = removal_event(
                AuditName.AUDIENCE_REMOVED, audience_id, len(families), actor, now
            )
            await self._db.audit(conn, [event], registry=True)
            return len(families)

        return await self._db.transaction(remove)

    async def _audience_for_update(self, conn: Conn, audience_id: str) -> Audience | None:
        rows = await conn.fetch(
            f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = $1 FOR UPDATE",
            audience_id,
        )
        found = trusted_audiences(self._mac, rows)
        return found[0] if found else None

    # -- clients ------------------------------------------------------------------------------

    async def add_client(self, client: Client, actor: str) -> None:
        row = sealed_row(self._mac, CLIENTS, client_to_row(client))

        async def add(conn: Conn) -> None:
            # Shared locks: an audience removed meanwhile is either gone here, or waits for
            # this client, which it then counts (remove_audience).
            known = {
                r["audience_id"]
                for r in await conn.fetch(
                    "SELECT audience_id FROM audiences WHERE audience_id = ANY($1)"
                    " ORDER BY audience_id FOR SHARE",
                    list(client.audiences),
                )
            }
            missing = [a for a in client.audiences if a not in known]
            if missing:
                raise OperatorError(f"unknown audience {missing[0]!r}")
            try:
                await conn.execute(
                    f"INSERT INTO clients ({CLIENT_SELECT}) VALUES ({_placeholders(len(row))})",
                    *row,
                )
            except asyncpg.UniqueViolationError:
                raise OperatorError(f"client {client.client_id!r} already exists") from None
            await self._db.audit(conn, [client_added_event(client, actor)], registry=True)

        await self._db.transaction(add)

    async def get_client(self, client_id: str) -> Client | None:
        rows = await self._db.fetch(
            f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = $1", client_id
        )
        return trusted_client(self._mac, rows, self._stand_in_client)

    async def list_clients(self) -> list[Client]:
        rows = await self._db.fetch(f"SELECT {CLIENT_SELECT} FROM clients ORDER BY client_id")
        return trusted_clients(self._mac, rows)

    async def disable_client(self, client_id: str, now: int, actor: str) -> bool:
        async def disable(conn: Conn) -> bool:
            # The row lock makes a grant checking this client (FOR SHARE) wait for the
            # disable and then see it, or commit before it (postgres_tokens.RegistryView).
            found = await self._client_for_update(conn, client_id)
            if found is None or found.disabled:
                return False
            disabled = replace(found, disabled=True)
            row = sealed_row(self._mac, CLIENTS, client_to_row(disabled))
            await conn.execute(
                "UPDATE clients SET disabled = TRUE, mac = $1 WHERE client_id = $2",
                row[-1],
                client_id,
            )
            await self._db.audit(conn, [disable_event(client_id, actor, now)], registry=True)
            return True

        return await self._db.transaction(disable)

    async def update_client(
        self, client_id: str, change: ClientChange, actor: str, now: int
    ) -> tuple[Client, int] | None:
        async def update(conn: Conn) -> tuple[Client, int] | None:
            found = await self._client_for_update(conn, client_id)
            if found is None:
                return None
            planned = checked_change(found, change(found), client_id)
            row = sealed_row(self._mac, CLIENTS, client_to_row(planned.record))
            await conn.execute(
                f"UPDATE clients SET {_CLIENT_SET} WHERE client_id = ${len(row)}",
                *row[1:],
                client_id,
            )
            killed = []
            if planned.kill is not None:
                live = await self._tokens.unkilled_families(conn, "client_id", client_id)
                killed = [f for f in live if planned.kill(f)]
                kill = FamilyKill(planned.kill_reason, actor)
                await self._tokens.kill(conn, killed, kill, now)
            event = AuditEvent(now, actor, planned.event, client_id, planned.details)
            await self._db.audit(conn, [event], registry=True)
            return planned.record, len(killed)

        return await self._db.transaction(update)

    async def remove_client(self, client_id: str, actor: str, now: int) -> int | None:
        async def remove(conn: Conn) -> int | None:
            if await self._client_for_update(conn, client_id) is None:
                return None
            families = await self._tokens.unkilled_families(conn, "client_id", client_id)
            kill = FamilyKill(KillReason.CLIENT_REMOVED, actor)
            await self._tokens.kill(conn, families, kill, now)
            await conn.execute("DELETE FROM clients WHERE client_id = $1", client_id)
            event = removal_event(AuditName.CLIENT_REMOVED, client_id, len(families), actor, now)
            await self._db.audit(conn, [event], registry=True)
            return len(families)

        return await self._db.transaction(remove)

    async def _client_for_update(self, conn: Conn, client_id: str) -> Client | None:
        """The client as stored, its row locked, if it verifies (one that does not is never
        re-sealed: that would launder the change)."""
        rows = await conn.fetch(
            f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = $1 FOR UPDATE", client_id
        )
        found = trusted_clients(self._mac, rows)
        return found[0] if found else None

    async def registry_report(self) -> RegistryReport:
        async with self._db.snapshot() as conn:
            clients = await conn.fetch(f"SELECT {CLIENT_SELECT} FROM clients")
            audiences = await conn.fetch(f"SELECT {AUDIENCE_SELECT} FROM audiences")
        return registry_report(self._mac, clients, audiences)
