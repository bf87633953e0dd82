"""SQLite statements of the registry: clients and audiences, each row MACed when written and
checked when read (coap_auth.store.registry_mac), with their audit events and family kills.

Methods take the connection of the caller's transaction (SqliteDatabase.write or .read).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

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
from coap_auth.store.records import Audience, Client, RegistrySnapshot
from coap_auth.store.registry_changes import checked_change, refuse_if_named
from coap_auth.store.registry_mac import AUDIENCES, CLIENTS, Mac, RegistryReport
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
from coap_auth.store.sqlite_audit import SqliteAudit, bump_keys
from coap_auth.store.sqlite_tokens import SqliteTokens

_CLIENT_SET = assignments(CLIENT_COLUMNS, lambda _n: "?")
_AUDIENCE_SET = assignments(AUDIENCE_COLUMNS, lambda _n: "?")
_CLIENT_VALUES = ", ".join("?" * (len(CLIENT_COLUMNS) + 1))
_AUDIENCE_VALUES = ", ".join("?" * (len(AUDIENCE_COLUMNS) + 1))
_CLIENT_BY_ID = f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = ?"
_AUDIENCE_BY_ID = f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = ?"


class SqliteRegistry:
    def __init__(self, registry_mac: Mac, audit: SqliteAudit, tokens: SqliteTokens) -> None:
        self._mac = registry_mac
        self._audit = audit
        self._tokens = tokens
        self._stand_in_client, self._stand_in_audience = stand_in_rows(registry_mac)

    # -- audiences -----------------------------------------------------------------------------

    def add_audience(self, conn: sqlite3.Connection, audience: Audience, actor: str) -> None:
        row = sealed_row(self._mac, AUDIENCES, audience_to_row(audience))
        try:
            conn.execute(
                f"INSERT INTO audiences ({AUDIENCE_SELECT}) VALUES ({_AUDIENCE_VALUES})", row
            )
        except sqlite3.IntegrityError:
            raise OperatorError(f"audience {audience.audience_id!r} already exists") from None
        # Servers reload keys and rotation policies: a new family, a new longest lifetime.
        bump_keys(conn)
        self._audit.append(conn, [audience_added_event(audience, actor)], registry=True)

    def get_audience(self, conn: sqlite3.Connection, audience_id: str) -> Audience | None:
        rows = conn.execute(_AUDIENCE_BY_ID, (audience_id,)).fetchall()
        return trusted_audience(self._mac, rows, self._stand_in_audience)

    def list_audiences(self, conn: sqlite3.Connection) -> list[Audience]:
        rows = conn.execute(f"SELECT {AUDIENCE_SELECT} FROM audiences ORDER BY audience_id")
        return trusted_audiences(self._mac, rows)

    def update_audience(
        self,
        conn: sqlite3.Connection,
        audience_id: str,
        change: AudienceChange,
        actor: str,
        now: int,
    ) -> Audience | None:
        found = self._audience(conn, audience_id)
        if found is None:
            return None
        planned = checked_change(found, change(found), audience_id)
        row = sealed_row(self._mac, AUDIENCES, audience_to_row(planned.record))
        conn.execute(
            f"UPDATE audiences SET {_AUDIENCE_SET} WHERE audience_id = ?", (*row[1:], audience_id)
        )
        # Servers reload rotation policies: a retiring key outlives the longest lifetime.
        bump_keys(conn)
        event = AuditEvent(now, actor, planned.event, audience_id, planned.details)
        self._audit.append(conn, [event], registry=True)
        return planned.record

    def remove_audience(
        self, conn: sqlite3.Connection, audience_id: str, actor: str, now: int
    ) -> int | None:
        if self._audience(conn, audience_id) is None:
            return None
        refuse_if_named(
            audience_id, [r["audiences"] for r in conn.execute("SELECT audiences FROM clients")]
        )
        families = self._tokens.unkilled_families(conn, "audience", audience_id)
        self._tokens.kill(conn, families, FamilyKill(KillReason.AUDIENCE_REMOVED, actor), now)
        conn.execute("DELETE FROM audiences WHERE audience_id = ?", (audience_id,))
        bump_keys(conn)
        event = removal_event(AuditName.AUDIENCE_REMOVED, audience_id, len(families), actor, now)
        self._audit.append(conn, [event], registry=True)
        return len(families)

    # -- clients -------------------------------------------------------------------------------

    def add_client(self, conn: sqlite3.Connection, client: Client, actor: str) -> None:
        row = sealed_row(self._mac, CLIENTS, client_to_row(client))
        known = {r["audience_id"] for r in conn.execute("SELECT audience_id FROM audiences")}
        missing = [a for a in client.audiences if a not in known]
        if missing:
            raise OperatorError(f"unknown audience {missing[0]!r}")
        try:
            conn.execute(f"INSERT INTO clients ({CLIENT_SELECT}) VALUES ({_CLIENT_VALUES})", row)
        except sqlite3.IntegrityError:
            raise OperatorError(f"client {client.client_id!r} already exists") from None
        self._audit.append(conn, [client_added_event(client, actor)], registry=True)

    def get_client(self, conn: sqlite3.Connection, client_id: str) -> Client | None:
        rows = conn.execute(_CLIENT_BY_ID, (client_id,)).fetchall()
        return trusted_client(self._mac, rows, self._stand_in_client)

    def snapshot(self, conn: sqlite3.Connection) -> RegistrySnapshot:
        """In the caller's read transaction: see Store.registry_snapshot."""
        return RegistrySnapshot(
            tuple(self.list_clients(conn)),
            tuple(self.list_audiences(conn)),
            self._audit.registry_matches_head(conn),
        )

    def list_clients(self, conn: sqlite3.Connection) -> list[Client]:
        rows = conn.execute(f"SELECT {CLIENT_SELECT} FROM clients ORDER BY client_id")
        return trusted_clients(self._mac, rows)

    def disable_client(
        self, conn: sqlite3.Connection, client_id: str, now: int, actor: str
    ) -> bool:
        found = self._client(conn, client_id)
        if found is None or found.disabled:
            return False
        row = sealed_row(self._mac, CLIENTS, client_to_row(replace(found, disabled=True)))
        conn.execute(
            "UPDATE clients SET disabled = 1, mac = ? WHERE client_id = ?", (row[-1], client_id)
        )
        self._audit.append(conn, [disable_event(client_id, actor, now)], registry=True)
        return True

    def update_client(
        self, conn: sqlite3.Connection, client_id: str, change: ClientChange, actor: str, now: int
    ) -> tuple[Client, int] | None:
        found = self._client(conn, client_id)
        if found is None:
            return None
        planned = checked_change(found, change(found), client_id)
        row = sealed_row(self._mac, CLIENTS, client_to_row(planned.record))
        conn.execute(f"UPDATE clients SET {_CLIENT_SET} WHERE client_id = ?", (*row[1:], client_id))
        killed = []
        if planned.kill is not None:
            live = self._tokens.unkilled_families(conn, "client_id", client_id)
            killed = [f for f in live if planned.kill(f)]
            self._tokens.kill(conn, killed, FamilyKill(planned.kill_reason, actor), now)
        event = AuditEvent(now, actor, planned.event, client_id, planned.details)
        self._audit.append(conn, [event], registry=True)
        return planned.record, len(killed)

    def remove_client(
        self, conn: sqlite3.Connection, client_id: str, actor: str, now: int
    ) -> int | None:
        if self._client(conn, client_id) is None:
            return None
        families = self._tokens.unkilled_families(conn, "client_id", client_id)
        self._tokens.kill(conn, families, FamilyKill(KillReason.CLIENT_REMOVED, actor), now)
        conn.execute("DELETE FROM clients WHERE client_id = ?", (client_id,))
        event = removal_event(AuditName.CLIENT_REMOVED, client_id, len(families), actor, now)
        self._audit.append(conn, [event], registry=True)
        return len(families)

    def report(self, conn: sqlite3.Connection) -> RegistryReport:
        clients = conn.execute(f"SELECT {CLIENT_SELECT} FROM clients").fetchall()
        audiences = conn.execute(f"SELECT {AUDIENCE_SELECT} FROM audiences").fetchall()
        return registry_report(self._mac, clients, audiences)

    # -- as stored -----------------------------------------------------------------------------

    def _client(self, conn: sqlite3.Connection, client_id: str) -> Client | None:
        """The client as stored, if its row verifies (one that does not is never re-sealed:
        that would launder the change)."""
        found = trusted_clients(self._mac, conn.execute(_CLIENT_BY_ID, (client_id,)))
        return found[0] if found else None

    def _audience(self, conn: sqlite3.Connection, audience_id: str) -> Audience | None:
        found = trusted_audiences(self._mac, conn.execute(_AUDIENCE_BY_ID, (audience_id,)))
        return found[0] if found else None
