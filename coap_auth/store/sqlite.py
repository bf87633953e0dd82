"""The embedded store: one SQLite file under the data directory, WAL mode, durable commits.

All access runs on one dedicated thread per store; each public method is one transaction.
Plumbing and the audit chain are in sqlite_base, refresh families and the TRL in sqlite_tokens
(its statements in sqlite_trl, per-requester histories described in trl_history).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from coap_auth.errors import OperatorError
from coap_auth.keys import SigningKey
from coap_auth.store.audit import AuditEvent, key_events
from coap_auth.store.base import AudienceChange, ClientChange, KeyTransition
from coap_auth.store.key_rows import key_from_row, key_to_row
from coap_auth.store.master_key import MasterKey
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
from coap_auth.store.sqlite_tokens import TokenTables

DB_FILE = "coap-auth.sqlite3"
_CLIENT_SET = assignments(CLIENT_COLUMNS, lambda _n: "?")
_AUDIENCE_SET = assignments(AUDIENCE_COLUMNS, lambda _n: "?")


class SqliteStore(TokenTables):
    @classmethod
    def in_data_dir(cls, data_dir: Path, master_key: MasterKey) -> SqliteStore:
        return cls(data_dir / DB_FILE, master_key)

    async def open_read_only(self) -> None:
        """Open a copy (a backup being checked) to read only: no migration, no probe, no
        change of mode or journal; whatever writes is refused by SQLite itself."""
        uri = f"{self._path.resolve().as_uri()}?mode=ro"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)

        self._conn = await self._run(connect)

    # -- audiences and clients -------------------------------------------------------------

    async def add_audience(self, audience: Audience, actor: str = "operator") -> None:
        row = sealed_row(self._registry_mac, AUDIENCES, audience_to_row(audience))

        def add(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO audiences ({AUDIENCE_SELECT})"
                    f" VALUES ({', '.join('?' * len(row))})",
                    row,
                )
            except sqlite3.IntegrityError:
                raise OperatorError(f"audience {audience.audience_id!r} already exists") from None
            # Servers reload keys and rotation policies: a new family, a new longest lifetime.
            conn.execute("UPDATE change_feed SET counter = counter + 1 WHERE id = 1")
            details = {
                "token_format": audience.token_format,
                "key_family": audience.key_family,
                "profile": audience.profile,
            }
            self._audit(
                conn,
                [
                    AuditEvent(
                        audience.created_at,
                        actor,
                        "audience.added",
                        audience.audience_id,
                        details,
                    )
                ],
                registry=True,
            )

        await self._in_tx(add)

    async def get_audience(self, audience_id: str) -> Audience | None:
        rows = await self._read(
            f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = ?", (audience_id,)
        )
        return trusted_audience(self._registry_mac, rows, self._stand_in_audience)

    async def list_audiences(self) -> list[Audience]:
        rows = await self._read(f"SELECT {AUDIENCE_SELECT} FROM audiences ORDER BY audience_id")
        return trusted_audiences(self._registry_mac, rows)

    async def add_client(self, client: Client, actor: str = "operator") -> None:
        row = sealed_row(self._registry_mac, CLIENTS, client_to_row(client))

        def add(conn: sqlite3.Connection) -> None:
            known = {r[0] for r in conn.execute("SELECT audience_id FROM audiences")}
            missing = [a for a in client.audiences if a not in known]
            if missing:
                raise OperatorError(f"unknown audience {missing[0]!r}")
            try:
                conn.execute(
                    f"INSERT INTO clients ({CLIENT_SELECT}) VALUES ({', '.join('?' * len(row))})",
                    row,
                )
            except sqlite3.IntegrityError:
                raise OperatorError(f"client {client.client_id!r} already exists") from None
            details = {
                "audiences": list(client.audiences),
                "scope": " ".join(client.scope),
                "auth": client.public_view()["auth"],
            }
            self._audit(
                conn,
                [AuditEvent(client.created_at, actor, "client.added", client.client_id, details)],
                registry=True,
            )

        await self._in_tx(add)

    async def get_client(self, client_id: str) -> Client | None:
        rows = await self._read(
            f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = ?", (client_id,)
        )
        return trusted_client(self._registry_mac, rows, self._stand_in_client)

    async def list_clients(self) -> list[Client]:
        rows = await self._read(f"SELECT {CLIENT_SELECT} FROM clients ORDER BY client_id")
        return trusted_clients(self._registry_mac, rows)

    async def disable_client(self, client_id: str, now: int, actor: str = "operator") -> bool:
        def disable(conn: sqlite3.Connection) -> bool:
            rows = conn.execute(
                f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = ?", (client_id,)
            ).fetchall()
            # A row that does not verify is not re-sealed: that would launder the change.
            found = trusted_clients(self._registry_mac, rows)
            if not found or found[0].disabled:
                return False
            disabled = replace(found[0], disabled=True)
            row = sealed_row(self._registry_mac, CLIENTS, client_to_row(disabled))
            conn.execute(
                "UPDATE clients SET disabled = 1, mac = ? WHERE client_id = ?", (row[-1], client_id)
            )
            event = AuditEvent(now, actor, "client.disabled", client_id)
            self._audit(conn, [event], registry=True)
            return True

        return await self._in_tx(disable)

    async def update_client(
        self, client_id: str, change: ClientChange, actor: str, now: int
    ) -> tuple[Client, int] | None:
        def update(conn: sqlite3.Connection) -> tuple[Client, int] | None:
            found = self._client_in_tx(conn, client_id)
            if found is None:
                return None
            planned = checked_change(found, change(found), client_id)
            row = sealed_row(self._registry_mac, CLIENTS, client_to_row(planned.record))
            conn.execute(
                f"UPDATE clients SET {_CLIENT_SET} WHERE client_id = ?", (*row[1:], client_id)
            )
            killed = []
            if planned.kill is not None:
                live = self._unkilled_families(conn, "client_id", client_id)
                killed = [f for f in live if planned.kill(f)]
                self._kill(conn, killed, planned.kill_reason, now, actor)
            event = AuditEvent(now, actor, planned.event, client_id, planned.details)
            self._audit(conn, [event], registry=True)
            return planned.record, len(killed)

        return await self._in_tx(update)

    async def remove_client(self, client_id: str, actor: str, now: int) -> int | None:
        def remove(conn: sqlite3.Connection) -> int | None:
            if self._client_in_tx(conn, client_id) is None:
                return None
            families = self._unkilled_families(conn, "client_id", client_id)
            self._kill(conn, families, "client removed", now, actor)
            conn.execute("DELETE FROM clients WHERE client_id = ?", (client_id,))
            details = {"killed_families": len(families)}
            self._audit(
                conn, [AuditEvent(now, actor, "client.removed", client_id, details)], registry=True
            )
            return len(families)

        return await self._in_tx(remove)

    async def update_audience(
        self, audience_id: str, change: AudienceChange, actor: str, now: int
    ) -> Audience | None:
        def update(conn: sqlite3.Connection) -> Audience | None:
            found = self._audience_in_tx(conn, audience_id)
            if found is None:
                return None
            planned = checked_change(found, change(found), audience_id)
            row = sealed_row(self._registry_mac, AUDIENCES, audience_to_row(planned.record))
            conn.execute(
                f"UPDATE audiences SET {_AUDIENCE_SET} WHERE audience_id = ?",
                (*row[1:], audience_id),
            )
            # Servers reload rotation policies: a retiring key outlives the longest lifetime.
            conn.execute("UPDATE change_feed SET counter = counter + 1 WHERE id = 1")
            event = AuditEvent(now, actor, planned.event, audience_id, planned.details)
            self._audit(conn, [event], registry=True)
            return planned.record

        return await self._in_tx(update)

    async def remove_audience(self, audience_id: str, actor: str, now: int) -> int | None:
        def remove(conn: sqlite3.Connection) -> int | None:
            if self._audience_in_tx(conn, audience_id) is None:
                return None
            named = [r[0] for r in conn.execute("SELECT audiences FROM clients")]
            refuse_if_named(audience_id, named)
            families = self._unkilled_families(conn, "audience", audience_id)
            self._kill(conn, families, "audience removed", now, actor)
            conn.execute("DELETE FROM audiences WHERE audience_id = ?", (audience_id,))
            conn.execute("UPDATE change_feed SET counter = counter + 1 WHERE id = 1")
            details = {"killed_families": len(families)}
            event = AuditEvent(now, actor, "audience.removed", audience_id, details)
            self._audit(conn, [event], registry=True)
            return len(families)

        return await self._in_tx(remove)

    def _client_in_tx(self, conn: sqlite3.Connection, client_id: str) -> Client | None:
        """The client as stored, if its row verifies (one that does not is never re-sealed:
        that would launder the change)."""
        rows = conn.execute(
            f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = ?", (client_id,)
        ).fetchall()
        found = trusted_clients(self._registry_mac, rows)
        return found[0] if found else None

    def _audience_in_tx(self, conn: sqlite3.Connection, audience_id: str) -> Audience | None:
        rows = conn.execute(
            f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = ?", (audience_id,)
        ).fetchall()
        found = trusted_audiences(self._registry_mac, rows)
        return found[0] if found else None

    async def registry_report(self) -> RegistryReport:
        def read(conn: sqlite3.Connection) -> RegistryReport:
            clients = conn.execute(f"SELECT {CLIENT_SELECT} FROM clients").fetchall()
            audiences = conn.execute(f"SELECT {AUDIENCE_SELECT} FROM audiences").fetchall()
            return registry_report(self._registry_mac, clients, audiences)

        return await self._run(self._tx, read, "BEGIN DEFERRED")

    # -- signing keys ----------------------------------------------------------------------

    async def load_keys(self) -> list[SigningKey]:
        return await self._run(self._tx, self._load_keys, "BEGIN DEFERRED")

    def _load_keys(self, conn: sqlite3.Connection) -> list[SigningKey]:
        rows = conn.execute("SELECT * FROM signing_keys ORDER BY created_at, kid").fetchall()
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
                "INSERT INTO signing_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (kid) DO UPDATE SET state = excluded.state,"
                " private_key = excluded.private_key, activated_at = excluded.activated_at,"
                " retire_until = excluded.retire_until, retired_at = excluded.retired_at,"
                " ended_at = excluded.ended_at",
                [key_to_row(self._master_key, k) for k in changed],
            )
            conn.execute("UPDATE change_feed SET counter = counter + 1 WHERE id = 1")
            self._audit(conn, key_events({k.kid: k for k in current}, changed, actor, now))
            return changed

        changed = await self._in_tx(update)
        if any(key.private_key is None for key in changed):
            # A key ended and its sealed private part was dropped: drop its older copies too.
            await self._run(self._drop_old_frames)
        return changed

    # -- replay cache ------------------------------------------------------------------------

    async def remember_assertion(self, client_id: str, cti: bytes, exp: int, now: int) -> bool:
        def remember(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM assertion_replay WHERE exp < ?", (now,))
            cur = conn.execute(
                "INSERT OR IGNORE INTO assertion_replay VALUES (?, ?, ?)", (client_id, cti, exp)
            )
            return cur.rowcount == 1

        return await self._in_tx(remember)
