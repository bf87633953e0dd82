"""SQLite statements of issued tokens: refresh families (grants, rotation, kills) and access
token records (revocation, status); what each outcome is, is decided in store.decisions.

Methods take the connection of the caller's transaction (SqliteDatabase.write or .read).
"""

from __future__ import annotations

import sqlite3
from typing import TypeVar

from coap_auth.store.base import Mint
from coap_auth.store.decisions import (
    AccessRecord,
    FamilyKill,
    PresentedToken,
    kill_events,
    may_revoke,
    plan_refresh,
    registry_current,
    revocable,
    revocation_event,
    settle_refresh,
    unminted,
)
from coap_auth.store.records import (
    IssuedAccess,
    RefreshFamily,
    RefreshOutcome,
    RegistryVersions,
    TokenStatus,
)
from coap_auth.store.registry_mac import AUDIENCES, CLIENTS, Mac
from coap_auth.store.rows import (
    AUDIENCE_SELECT,
    CLIENT_SELECT,
    FAMILY_COLUMNS,
    VerifiedRows,
    family_from_row,
    family_to_row,
)
from coap_auth.store.sqlite_audit import SqliteAudit
from coap_auth.store.sqlite_trl import ACCESS_COLUMNS, access_records, revoke

M = TypeVar("M")
_FAMILY_INSERT = (
    f"INSERT INTO refresh_families ({FAMILY_COLUMNS})"
    f" VALUES ({', '.join('?' * len(FAMILY_COLUMNS.split(',')))})"
)
_CLIENT_ROW = f"SELECT {CLIENT_SELECT} FROM clients WHERE client_id = ?"
_AUDIENCE_ROW = f"SELECT {AUDIENCE_SELECT} FROM audiences WHERE audience_id = ?"
# The presented refresh token, its successor's state and its family, by one read.
_PRESENTED = (
    "SELECT t.spent_at AS spent_at, t.successor AS successor,"
    " (s.digest IS NOT NULL AND s.spent_at IS NULL) AS successor_unspent, "
    + ", ".join(f"f.{c.strip()} AS {c.strip()}" for c in FAMILY_COLUMNS.split(","))
    + " FROM refresh_tokens t JOIN refresh_families f ON f.family_id = t.family_id"
    " LEFT JOIN refresh_tokens s ON s.digest = t.successor WHERE t.digest = ?"
)


class SqliteTokens:
    def __init__(self, audit: SqliteAudit, registry_mac: Mac) -> None:
        self._audit = audit
        # The registry rows grants rest on, as last verified (used on the writer thread).
        self._verified = VerifiedRows(registry_mac)

    # -- grants and refreshes ------------------------------------------------------------------

    def start_family(
        self,
        conn: sqlite3.Connection,
        family: RefreshFamily,
        refresh_digest: bytes,
        access: IssuedAccess,
        registry: RegistryVersions,
    ) -> bool:
        if not current(conn, registry, self._verified):
            return False
        conn.execute(_FAMILY_INSERT, family_to_row(family))
        _issue_refresh(conn, refresh_digest, family.family_id, family.created_at)
        _record_access(conn, access, family.family_id)
        return True

    def rotate_refresh(
        self,
        conn: sqlite3.Connection,
        refresh_digest: bytes,
        successor_digest: bytes,
        *,
        client_id: str,
        now: int,
        grace: int,
        idle_timeout: int,
        mint: Mint[M],
        registry: RegistryVersions,
    ) -> RefreshOutcome[M]:
        row = conn.execute(_PRESENTED, (refresh_digest,)).fetchone()
        token = None
        family = None
        if row is not None:
            token = PresentedToken(row["spent_at"], bool(row["successor_unspent"]))
            family = family_from_row(row)
        plan = plan_refresh(
            token, family, client_id=client_id, now=now, grace=grace, idle_timeout=idle_timeout
        )
        if plan.kill is not None:
            assert family is not None
            self.kill(conn, [family], plan.kill, now)
        done = unminted(plan, family)
        if done is not None:
            return done
        assert row is not None and family is not None
        minted = mint(family)
        is_current = current(conn, registry + minted.registry, self._verified)
        outcome = settle_refresh(plan, family, minted, is_current)
        if outcome.status is not plan.status or minted.access is None:
            return outcome
        if plan.spends_successor:
            # The device never got its successor: that one is replaced, not kept live.
            conn.execute(
                "UPDATE refresh_tokens SET spent_at = ? WHERE digest = ?", (now, row["successor"])
            )
        conn.execute(
            "UPDATE refresh_tokens SET spent_at = COALESCE(spent_at, ?), successor = ?"
            " WHERE digest = ?",
            (now, successor_digest, refresh_digest),
        )
        _issue_refresh(conn, successor_digest, family.family_id, now)
        conn.execute(
            "UPDATE refresh_families SET last_used_at = ? WHERE family_id = ?",
            (now, family.family_id),
        )
        _record_access(conn, minted.access, family.family_id)
        return outcome

    # -- family kills --------------------------------------------------------------------------

    def unkilled_families(
        self, conn: sqlite3.Connection, column: str, value: str
    ) -> list[RefreshFamily]:
        """Unkilled families of one client or one audience (`column`), in family_id order; also
        those past their own expiry, since a token refreshed just before it outlives them."""
        assert column in ("client_id", "audience")
        rows = conn.execute(
            f"SELECT {FAMILY_COLUMNS} FROM refresh_families"
            f" WHERE {column} = ? AND killed_at IS NULL ORDER BY family_id",
            (value,),
        )
        return [family_from_row(r) for r in rows]

    def family_of(
        self, conn: sqlite3.Connection, refresh_digest: bytes, client_id: str
    ) -> RefreshFamily | None:
        """The live family of this refresh token, if it is this client's."""
        row = conn.execute(
            f"SELECT {FAMILY_COLUMNS} FROM refresh_families WHERE family_id ="
            " (SELECT family_id FROM refresh_tokens WHERE digest = ?)"
            " AND client_id = ? AND killed_at IS NULL",
            (refresh_digest, client_id),
        ).fetchone()
        return None if row is None else family_from_row(row)

    def live_families(
        self, conn: sqlite3.Connection, client_id: str | None, now: int
    ) -> list[RefreshFamily]:
        query = (
            f"SELECT {FAMILY_COLUMNS} FROM refresh_families"
            " WHERE killed_at IS NULL AND expires_at > ?"
            + (" AND client_id = ?" if client_id is not None else "")
            + " ORDER BY created_at, family_id"
        )
        args = (now,) if client_id is None else (now, client_id)
        return [family_from_row(r) for r in conn.execute(query, args)]

    def kill(
        self, conn: sqlite3.Connection, families: list[RefreshFamily], kill: FamilyKill, now: int
    ) -> None:
        """End these families: no refresh token of them works again; when the kill revokes,
        what `revocable` picks of their access tokens goes on the TRL, in one update. The
        writer lock is held: what is read here is what is revoked."""
        if not families:
            return
        family_ids = [f.family_id for f in families]
        conn.executemany(
            "UPDATE refresh_families SET killed_at = ?, kill_reason = ? WHERE family_id = ?",
            [(now, str(kill.reason), family_id) for family_id in family_ids],
        )
        conn.executemany(
            "UPDATE refresh_tokens SET spent_at = ? WHERE family_id = ? AND spent_at IS NULL",
            [(now, family_id) for family_id in family_ids],
        )
        records = []
        revoked: list[bytes] = []
        if kill.revoke_access:
            records = [
                record
                for family_id in family_ids
                for record in access_records(
                    conn.execute(
                        f"SELECT {ACCESS_COLUMNS} FROM access_tokens WHERE family_id = ?",
                        (family_id,),
                    )
                )
            ]
            revoked = revoke(conn, revocable(records, now), now)
        self._audit.append(conn, kill_events(families, kill, records, set(revoked), now))

    # -- access tokens -------------------------------------------------------------------------

    def revoke_access(
        self,
        conn: sqlite3.Connection,
        token_hash: bytes,
        client_id: str | None,
        now: int,
        actor: str,
    ) -> bool:
        record = _access_record(conn, token_hash)
        if record is None or not may_revoke(record, client_id, now):
            return False
        if not revoke(conn, revocable([record], now), now):
            return False
        self._audit.append(conn, [revocation_event(record, actor, now)])
        return True


def token_status(conn: sqlite3.Connection, token_hash: bytes) -> TokenStatus | None:
    row = conn.execute(
        "SELECT revoked_at FROM access_tokens WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    if row is None:
        return None
    return TokenStatus.LIVE if row["revoked_at"] is None else TokenStatus.REVOKED


def token_hashes_between(
    conn: sqlite3.Connection, low: bytes, high: bytes, limit: int
) -> list[bytes]:
    # BLOBs compare with memcmp(): bytewise, as the protocol says.
    rows = conn.execute(
        "SELECT token_hash FROM access_tokens WHERE token_hash BETWEEN ? AND ?"
        " ORDER BY token_hash LIMIT ?",
        (low, high, limit),
    )
    return [r["token_hash"] for r in rows]


def current(conn: sqlite3.Connection, registry: RegistryVersions, rows: VerifiedRows) -> bool:
    """Whether the registry rows a grant was decided from are stored as they were then (and
    still verify under the master key)."""
    if not registry.clients and not registry.audiences:
        return True
    clients = {
        client_id: rows.mac(CLIENTS, conn.execute(_CLIENT_ROW, (client_id,)).fetchone())
        for client_id, _ in registry.clients
    }
    audiences = {
        audience_id: rows.mac(AUDIENCES, conn.execute(_AUDIENCE_ROW, (audience_id,)).fetchone())
        for audience_id, _ in registry.audiences
    }
    return registry_current(registry, clients, audiences)


def _issue_refresh(conn: sqlite3.Connection, digest: bytes, family_id: bytes, now: int) -> None:
    conn.execute(
        "INSERT INTO refresh_tokens (digest, family_id, issued_at) VALUES (?, ?, ?)",
        (digest, family_id, now),
    )


def _record_access(conn: sqlite3.Connection, access: IssuedAccess, family_id: bytes) -> None:
    conn.execute(
        "INSERT INTO access_tokens (token_hash, family_id, client_id, exp, audience)"
        " VALUES (?, ?, ?, ?, ?)",
        (access.token_hash, family_id, access.client_id, access.exp, access.audience),
    )


def _access_record(conn: sqlite3.Connection, token_hash: bytes) -> AccessRecord | None:
    row = conn.execute(
        f"SELECT {ACCESS_COLUMNS} FROM access_tokens WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return None if row is None else access_records([row])[0]
