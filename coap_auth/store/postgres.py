"""The shared store for several instances: PostgreSQL through asyncpg.

Same behaviour as the SQLite store (one contract suite runs against both). Concurrency comes
from row locks (a refresh token's family is locked for the whole refresh) and from
transaction-scoped advisory locks for the key set, the audit chain and the TRL sequence, always
taken in the order postgres_base's docstring writes down; the change feed is NOTIFY on commit,
heard by every instance's LISTEN connection. Plumbing is in postgres_base, refresh families and
the TRL in postgres_tokens (its statements in postgres_trl, per-requester histories described in
trl_history).
"""

from __future__ import annotations

from dataclasses import replace

import asyncpg

from coap_auth.errors import OperatorError
from coap_auth.keys import SigningKey
from coap_auth.store.audit import AuditEvent, key_events
from coap_auth.store.base import AudienceChange, ClientChange, KeyTransition
from coap_auth.store.key_rows import key_from_row, key_to_row
from coap_auth.store.postgres_base import Conn
from coap_auth.store.postgres_tokens import PostgresTokenTables
from coap_auth.store.records import Audience, Client
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
    trusted_audience,
    trusted_audiences,
    trusted_client,
    trusted_clients,
)

_CLIENT_SET = assignments(CLIENT_COLUMNS, lambda n: f"${n}")
_AUDIENCE_SET = assignments(AUDIENCE_COLUMNS, lambda n: f"${n}")


class PostgresStore(PostgresTokenTables):
    # -- audiences and clients -------------------------------------------------------------

    async def add_audience(self, audience: Audience, actor: str = "operator") -> None:
        row = sealed_row(self._registry_mac, AUDIENCES, audience_to_row(audience))

        async def add(conn: Conn) -> None:
            try:
                await conn.execute(
                    f"INSERT INTO audiences ({AUDIENCE_SELECT})"
                    f" VALUES ({', '.join(f'${n}' for n in range(1, len(row) + 1))})",
                    *row,
                )
            except asyncpg.UniqueViolationError:
                raise OperatorError(f"audience {audience.audience_id!r} already exists") from None
            # Servers reload keys and rotation policies: a new family, a new longest lifetime.
            await self._notify(conn, "keys")
            details = {
                "token_format": audience.token_format,
                "key_family": audience.key_family,
                "profile": audience.profile,
            }
            event = AuditEvent(
                audience.created_at, actor, "audience.added", audience.audience_id, details
            )
            await self._audit(conn, [event], registry=True)

        await self._in_tx(add)

    async def get_audience(self, audience_id: str) -> Audience | None:
        rows = await self._read(
            f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = $1", audience_id
        )
        return trusted_audience(self._registry_mac, rows, self._stand_in_audience)

    async def list_audiences(self) -> list[Audience]:
        rows = await self._read(f"SELECT {AUDIENCE_SELECT} FROM audiences ORDER BY audience_id")
        return trusted_audiences(self._registry_mac, rows)

    async def add_client(self, client: Client, actor: str = "operator") -> None:
        row = sealed_row(self._registry_mac, CLIENTS, client_to_row(client))

        async def add(conn: Conn) -> None:
            # Shared locks: an audience removed meanwhile is either gone here, or waits for
            # this client, which it then counts (remove_audience).
            known = {
                r[0]
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
                    f"INSERT INTO clients ({CLIENT_SELECT})"
                    f" VALUES ({', '.join(f'${n}' for n in range(1, len(row) + 1))})",
                    *row,
                )
            except asyncpg.UniqueViolationError:
                raise OperatorError(f"client {client.client_id!r} already exists") from None
            details = {
                "audiences": list(client.audiences),
                "scope": " ".join(client.scope),
                "auth": client.public_view()["auth"],
            }
            event = AuditEvent(client.created_at, actor, "client.added", client.client_id, details)
            await self._audit(conn, [event], registry=True)

        await self._in_tx(add)

    async def get_client(self, client_id: str) -> Client | None:
        rows = await self._read(
            f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = $1", client_id
        )
        return trusted_client(self._registry_mac, rows, self._stand_in_client)

    async def list_clients(self) -> list[Client]:
        rows = await self._read(f"SELECT {CLIENT_SELECT} FROM clients ORDER BY client_id")
        return trusted_clients(self._registry_mac, rows)

    async def disable_client(self, client_id: str, now: int, actor: str = "operator") -> bool:
        async def disable(conn: Conn) -> bool:
            rows = await conn.fetch(
                f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = $1 FOR UPDATE", client_id
            )
            # A row that does not verify is not re-sealed: that would launder the change.
            found = trusted_clients(self._registry_mac, rows)
            if not found or found[0].disabled:
                return False
            disabled = replace(found[0], disabled=True)
            row = sealed_row(self._registry_mac, CLIENTS, client_to_row(disabled))
            await conn.execute(
                "UPDATE clients SET disabled = TRUE, mac = $1 WHERE client_id = $2",
                row[-1],
                client_id,
            )
            event = AuditEvent(now, actor, "client.disabled", client_id)
            await self._audit(conn, [event], registry=True)
            return True

        return await self._in_tx(disable)

    async def update_client(
        self, client_id: str, change: ClientChange, actor: str, now: int
    ) -> tuple[Client, int] | None:
        async def update(conn: Conn) -> tuple[Client, int] | None:
            found = await self._client_for_update(conn, client_id)
            if found is None:
                return None
            planned = checked_change(found, change(found), client_id)
            row = sealed_row(self._registry_mac, CLIENTS, client_to_row(planned.record))
            await conn.execute(
                f"UPDATE clients SET {_CLIENT_SET} WHERE client_id = ${len(row)}",
                *row[1:],
                client_id,
            )
            killed = []
            if planned.kill is not None:
                live = await self._unkilled_families(conn, "client_id", client_id)
                killed = [f for f in live if planned.kill(f)]
                # Lock order (postgres_base): family rows, the TRL lock, then the audit lock.
                await self._kill(conn, killed, planned.kill_reason, now, actor)
            event = AuditEvent(now, actor, planned.event, client_id, planned.details)
            await self._audit(conn, [event], registry=True)
            return planned.record, len(killed)

        return await self._in_tx(update)

    async def remove_client(self, client_id: str, actor: str, now: int) -> int | None:
        async def remove(conn: Conn) -> int | None:
            if await self._client_for_update(conn, client_id) is None:
                return None
            families = await self._unkilled_families(conn, "client_id", client_id)
            await self._kill(conn, families, "client removed", now, actor)
            await conn.execute("DELETE FROM clients WHERE client_id = $1", client_id)
            details = {"killed_families": len(families)}
            event = AuditEvent(now, actor, "client.removed", client_id, details)
            await self._audit(conn, [event], registry=True)
            return len(families)

        return await self._in_tx(remove)

    async def update_audience(
        self, audience_id: str, change: AudienceChange, actor: str, now: int
    ) -> Audience | None:
        async def update(conn: Conn) -> Audience | None:
            found = await self._audience_for_update(conn, audience_id)
            if found is None:
                return None
            planned = checked_change(found, change(found), audience_id)
            row = sealed_row(self._registry_mac, AUDIENCES, audience_to_row(planned.record))
            await conn.execute(
                f"UPDATE audiences SET {_AUDIENCE_SET} WHERE audience_id = ${len(row)}",
                *row[1:],
                audience_id,
            )
            # Servers reload rotation policies: a retiring key outlives the longest lifetime.
            await self._notify(conn, "keys")
            event = AuditEvent(now, actor, planned.event, audience_id, planned.details)
            await self._audit(conn, [event], registry=True)
            return planned.record

        return await self._in_tx(update)

    async def remove_audience(self, audience_id: str, actor: str, now: int) -> int | None:
        async def remove(conn: Conn) -> int | None:
            # The audience row first: a client added meanwhile waits for it (add_client),
            # or has committed and is counted here.
            if await self._audience_for_update(conn, audience_id) is None:
                return None
            named = [r[0] for r in await conn.fetch("SELECT audiences FROM clients")]
            refuse_if_named(audience_id, named)
            families = await self._unkilled_families(conn, "audience", audience_id)
            await self._kill(conn, families, "audience removed", now, actor)
            await conn.execute("DELETE FROM audiences WHERE audience_id = $1", audience_id)
            await self._notify(conn, "keys")
            details = {"killed_families": len(families)}
            event = AuditEvent(now, actor, "audience.removed", audience_id, details)
            await self._audit(conn, [event], registry=True)
            return len(families)

        return await self._in_tx(remove)

    async def _client_for_update(self, conn: Conn, client_id: str) -> Client | None:
        """The client as stored, its row locked, if it verifies (one that does not is never
        re-sealed: that would launder the change)."""
        rows = await conn.fetch(
            f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = $1 FOR UPDATE", client_id
        )
        found = trusted_clients(self._registry_mac, rows)
        return found[0] if found else None

    async def _audience_for_update(self, conn: Conn, audience_id: str) -> Audience | None:
        rows = await conn.fetch(
            f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = $1 FOR UPDATE",
            audience_id,
        )
        found = trusted_audiences(self._registry_mac, rows)
        return found[0] if found else None

    async def registry_report(self) -> RegistryReport:
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            clients = await conn.fetch(f"SELECT {CLIENT_SELECT} FROM clients")
            audiences = await conn.fetch(f"SELECT {AUDIENCE_SELECT} FROM audiences")
        return registry_report(self._registry_mac, clients, audiences)

    # -- signing keys ----------------------------------------------------------------------

    async def load_keys(self) -> list[SigningKey]:
        async with self._connection() as conn:
            return await self._load_keys(conn)

    async def _load_keys(self, conn: Conn) -> list[SigningKey]:
        rows = await conn.fetch("SELECT * FROM signing_keys ORDER BY created_at, kid")
        return [key_from_row(self._master_key, r) for r in rows]

    async def update_keys(
        self, transition: KeyTransition, actor: str, now: int
    ) -> list[SigningKey]:
        async def update(conn: Conn) -> list[SigningKey]:
            await self._lock(conn, self._lock_keys)
            current = await self._load_keys(conn)
            changed = transition(current)
            if not changed:
                return []
            await conn.executemany(
                "INSERT INTO signing_keys VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                " ON CONFLICT (kid) DO UPDATE SET state = excluded.state,"
                " private_key = excluded.private_key, activated_at = excluded.activated_at,"
                " retire_until = excluded.retire_until, retired_at = excluded.retired_at,"
                " ended_at = excluded.ended_at",
                [key_to_row(self._master_key, k) for k in changed],
            )
            # Lock order (postgres_base): the change_feed row before the audit lock.
            await self._notify(conn, "keys")
            await self._audit(conn, key_events({k.kid: k for k in current}, changed, actor, now))
            return changed

        return await self._in_tx(update)

    # -- replay cache ------------------------------------------------------------------------

    async def remember_assertion(self, client_id: str, cti: bytes, exp: int, now: int) -> bool:
        async def remember(conn: Conn) -> bool:
            await conn.execute("DELETE FROM assertion_replay WHERE exp < $1", now)
            status = await conn.execute(
                "INSERT INTO assertion_replay VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                client_id,
                cti,
                exp,
            )
            return bool(status == "INSERT 0 1")

        return await self._in_tx(remember)
