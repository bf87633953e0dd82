"""The embedded store: one SQLite file under the data directory, WAL mode, durable commits.

All access runs on one dedicated thread per store; each public method is one transaction.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import cbor2
from cryptography.hazmat.primitives import serialization

from coap_auth.errors import OperatorError
from coap_auth.keys import KeyState, SigningKey
from coap_auth.store.base import Mint
from coap_auth.store.master_key import MasterKey
from coap_auth.store.records import (
    Audience,
    Client,
    IssuedAccess,
    RefreshFamily,
    RefreshOutcome,
)
from coap_auth.wire import CoseAlg

T = TypeVar("T")
DB_FILE = "coap-auth.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS audiences (
    audience_id TEXT PRIMARY KEY,
    token_format TEXT NOT NULL CHECK (token_format IN ('cwt', 'jwt')),
    lifetime INTEGER NOT NULL CHECK (lifetime > 0),
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    audiences TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_digest BLOB,
    public_key BLOB,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    CHECK ((secret_digest IS NULL) <> (public_key IS NULL))
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid BLOB PRIMARY KEY,
    alg INTEGER NOT NULL,
    state TEXT NOT NULL,
    private_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    activated_at INTEGER,
    retire_until INTEGER
);
CREATE TABLE IF NOT EXISTS assertion_replay (
    client_id TEXT NOT NULL,
    cti BLOB NOT NULL,
    exp INTEGER NOT NULL,
    PRIMARY KEY (client_id, cti)
);
CREATE TABLE IF NOT EXISTS refresh_families (
    family_id BLOB PRIMARY KEY,
    client_id TEXT NOT NULL,
    audience TEXT NOT NULL,
    scope TEXT NOT NULL,
    cnf BLOB,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    killed_at INTEGER,
    kill_reason TEXT
);
CREATE INDEX IF NOT EXISTS refresh_families_client ON refresh_families (client_id);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    digest BLOB PRIMARY KEY,
    family_id BLOB NOT NULL REFERENCES refresh_families (family_id),
    issued_at INTEGER NOT NULL,
    spent_at INTEGER,
    successor BLOB
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family_id);
CREATE TABLE IF NOT EXISTS access_tokens (
    token_hash BLOB PRIMARY KEY,
    family_id BLOB REFERENCES refresh_families (family_id),
    client_id TEXT NOT NULL,
    exp INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS access_tokens_family ON access_tokens (family_id);
CREATE TABLE IF NOT EXISTS change_feed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    counter INTEGER NOT NULL
);
INSERT OR IGNORE INTO change_feed (id, counter) VALUES (1, 0);
"""


class SqliteStore:
    def __init__(self, path: Path, master_key: MasterKey) -> None:
        self._path = path
        self._master_key = master_key
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coap-auth-sqlite")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def in_data_dir(cls, data_dir: Path, master_key: MasterKey) -> SqliteStore:
        return cls(data_dir / DB_FILE, master_key)

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _connect(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # Durable commits: a 2.01 is only sent for what survives a power cut.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        self._conn = conn

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn in one IMMEDIATE transaction (writers queue instead of failing mid-way)."""
        conn = self._conn
        assert conn is not None, "store not open"
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def _in_tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._tx, fn)

    async def open(self) -> None:
        await self._run(self._connect)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    # -- audiences and clients -------------------------------------------------------------

    async def add_audience(self, audience: Audience) -> None:
        def add(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO audiences VALUES (?, ?, ?, ?)",
                    (
                        audience.audience_id,
                        audience.token_format,
                        audience.lifetime,
                        audience.created_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise OperatorError(f"audience {audience.audience_id!r} already exists") from None

        await self._in_tx(add)

    async def get_audience(self, audience_id: str) -> Audience | None:
        rows = await self._in_tx(
            lambda c: c.execute(
                "SELECT * FROM audiences WHERE audience_id = ?", (audience_id,)
            ).fetchall()
        )
        return _audience(rows[0]) if rows else None

    async def list_audiences(self) -> list[Audience]:
        rows = await self._in_tx(
            lambda c: c.execute("SELECT * FROM audiences ORDER BY audience_id").fetchall()
        )
        return [_audience(r) for r in rows]

    async def add_client(self, client: Client) -> None:
        public_key = None if client.public_key is None else cbor2.dumps(client.public_key)

        def add(conn: sqlite3.Connection) -> None:
            known = {r[0] for r in conn.execute("SELECT audience_id FROM audiences")}
            missing = [a for a in client.audiences if a not in known]
            if missing:
                raise OperatorError(f"unknown audience {missing[0]!r}")
            try:
                conn.execute(
                    "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        client.client_id,
                        json.dumps(list(client.audiences)),
                        " ".join(client.scope),
                        client.secret_digest,
                        public_key,
                        int(client.disabled),
                        client.created_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise OperatorError(f"client {client.client_id!r} already exists") from None

        await self._in_tx(add)

    async def get_client(self, client_id: str) -> Client | None:
        rows = await self._in_tx(
            lambda c: c.execute(
                "SELECT * FROM clients WHERE client_id = ?", (client_id,)
            ).fetchall()
        )
        return _client(rows[0]) if rows else None

    async def list_clients(self) -> list[Client]:
        rows = await self._in_tx(
            lambda c: c.execute("SELECT * FROM clients ORDER BY client_id").fetchall()
        )
        return [_client(r) for r in rows]

    async def disable_client(self, client_id: str) -> bool:
        def disable(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE clients SET disabled = 1 WHERE client_id = ?", (client_id,))
            return cur.rowcount == 1

        return await self._in_tx(disable)

    # -- signing keys ----------------------------------------------------------------------

    async def load_keys(self) -> list[SigningKey]:
        rows = await self._in_tx(
            lambda c: c.execute("SELECT * FROM signing_keys ORDER BY created_at, kid").fetchall()
        )
        return [self._key(r) for r in rows]

    async def save_keys(self, keys: Iterable[SigningKey]) -> None:
        rows = [
            (
                k.kid,
                int(k.alg),
                k.state.value,
                self._seal(k),
                k.created_at,
                k.activated_at,
                k.retire_until,
            )
            for k in keys
        ]

        def save(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO signing_keys VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kid) DO UPDATE"
                " SET state = excluded.state, activated_at = excluded.activated_at,"
                " retire_until = excluded.retire_until",
                rows,
            )
            _bump(conn)

        await self._in_tx(save)

    def _seal(self, key: SigningKey) -> bytes:
        der = key.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return self._master_key.encrypt(der, key.kid)

    def _key(self, row: tuple[Any, ...]) -> SigningKey:
        kid, alg, state, sealed, created_at, activated_at, retire_until = row
        der = self._master_key.decrypt(sealed, kid)
        private_key = serialization.load_der_private_key(der, password=None)
        return SigningKey(
            kid=kid,
            alg=CoseAlg(alg),
            state=KeyState(state),
            private_key=private_key,  # type: ignore[arg-type]
            created_at=created_at,
            activated_at=activated_at,
            retire_until=retire_until,
        )

    # -- replay cache and change feed --------------------------------------------------------

    async def remember_assertion(self, client_id: str, cti: bytes, exp: int, now: int) -> bool:
        def remember(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM assertion_replay WHERE exp < ?", (now,))
            cur = conn.execute(
                "INSERT OR IGNORE INTO assertion_replay VALUES (?, ?, ?)", (client_id, cti, exp)
            )
            return cur.rowcount == 1

        return await self._in_tx(remember)

    # -- refresh families ------------------------------------------------------------------

    async def start_family(
        self, family: RefreshFamily, refresh_digest: bytes, access: IssuedAccess
    ) -> None:
        cnf = None if family.cnf is None else cbor2.dumps(family.cnf)

        def start(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO refresh_families VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                (
                    family.family_id,
                    family.client_id,
                    family.audience,
                    family.scope,
                    cnf,
                    family.created_at,
                    family.last_used_at,
                    family.expires_at,
                ),
            )
            conn.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, NULL, NULL)",
                (refresh_digest, family.family_id, family.created_at),
            )
            _record_access(conn, access, family.family_id)

        await self._in_tx(start)

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
        def rotate(conn: sqlite3.Connection) -> RefreshOutcome:
            row = conn.execute(
                "SELECT t.spent_at, t.successor, f.* FROM refresh_tokens t"
                " JOIN refresh_families f USING (family_id) WHERE t.digest = ?",
                (refresh_digest,),
            ).fetchone()
            if row is None:
                return RefreshOutcome("unknown")
            spent_at, successor, family = row[0], row[1], _family(row[2:])
            if family.client_id != client_id:
                return RefreshOutcome("unknown")
            if family.killed_at is not None:
                return RefreshOutcome("dead", family)
            if now >= family.expires_at or now - family.last_used_at >= idle_timeout:
                # Expiry is not theft: the family ends, its access tokens live out their time.
                _kill(conn, family.family_id, "expired", now, revoke_access=False)
                return RefreshOutcome("expired", family)
            status = "rotated"
            if spent_at is not None:
                successor_unused = (
                    successor is not None
                    and conn.execute(
                        "SELECT 1 FROM refresh_tokens WHERE digest = ? AND spent_at IS NULL",
                        (successor,),
                    ).fetchone()
                )
                if now - spent_at >= grace or not successor_unused:
                    # RFC 9700 §4.14.2: reuse of a spent refresh token means theft.
                    _kill(conn, family.family_id, "refresh token reused", now)
                    return RefreshOutcome("reused", family)
                # A device whose response was lost: its successor is replaced, not kept live.
                conn.execute(
                    "UPDATE refresh_tokens SET spent_at = ? WHERE digest = ?", (now, successor)
                )
                status = "grace"
            access = mint(family)
            conn.execute(
                "UPDATE refresh_tokens SET spent_at = COALESCE(spent_at, ?), successor = ?"
                " WHERE digest = ?",
                (now, successor_digest, refresh_digest),
            )
            conn.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, NULL, NULL)",
                (successor_digest, family.family_id, now),
            )
            conn.execute(
                "UPDATE refresh_families SET last_used_at = ? WHERE family_id = ?",
                (now, family.family_id),
            )
            _record_access(conn, access, family.family_id)
            return RefreshOutcome(status, family)  # type: ignore[arg-type]

        return await self._in_tx(rotate)

    async def kill_families(self, client_id: str, reason: str, now: int) -> int:
        def kill(conn: sqlite3.Connection) -> int:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT family_id FROM refresh_families"
                    " WHERE client_id = ? AND killed_at IS NULL AND expires_at > ?",
                    (client_id, now),
                )
            ]
            for family_id in ids:
                _kill(conn, family_id, reason, now)
            return len(ids)

        return await self._in_tx(kill)

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        query = (
            "SELECT * FROM refresh_families WHERE killed_at IS NULL AND expires_at > ?"
            + (" AND client_id = ?" if client_id is not None else "")
            + " ORDER BY created_at, family_id"
        )
        args = (now,) if client_id is None else (now, client_id)
        rows = await self._in_tx(lambda c: c.execute(query, args).fetchall())
        return [_family(r) for r in rows]

    async def revoked_token_hashes(self, now: int) -> list[bytes]:
        rows = await self._in_tx(
            lambda c: c.execute(
                "SELECT token_hash FROM access_tokens WHERE revoked_at IS NOT NULL AND exp > ?"
                " ORDER BY revoked_at, token_hash",
                (now,),
            ).fetchall()
        )
        return [r[0] for r in rows]

    async def change_counter(self) -> int:
        rows = await self._run(
            lambda: self._conn.execute(  # type: ignore[union-attr]
                "SELECT counter FROM change_feed WHERE id = 1"
            ).fetchall()
        )
        return int(rows[0][0])


def _bump(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE change_feed SET counter = counter + 1 WHERE id = 1")


def _record_access(conn: sqlite3.Connection, access: IssuedAccess, family_id: bytes) -> None:
    conn.execute(
        "INSERT INTO access_tokens VALUES (?, ?, ?, ?, NULL)",
        (access.token_hash, family_id, access.client_id, access.exp),
    )


def _kill(
    conn: sqlite3.Connection, family_id: bytes, reason: str, now: int, *, revoke_access: bool = True
) -> None:
    """Kill a family: no refresh token of it works again; unless told otherwise, its
    unexpired access tokens are revoked."""
    conn.execute(
        "UPDATE refresh_families SET killed_at = ?, kill_reason = ? WHERE family_id = ?",
        (now, reason, family_id),
    )
    conn.execute(
        "UPDATE refresh_tokens SET spent_at = ? WHERE family_id = ? AND spent_at IS NULL",
        (now, family_id),
    )
    if not revoke_access:
        return
    revoked = conn.execute(
        "UPDATE access_tokens SET revoked_at = ?"
        " WHERE family_id = ? AND revoked_at IS NULL AND exp > ?",
        (now, family_id, now),
    ).rowcount
    if revoked:
        _bump(conn)


def _family(row: tuple[Any, ...]) -> RefreshFamily:
    (
        family_id,
        client_id,
        audience,
        scope,
        cnf,
        created_at,
        last_used_at,
        expires_at,
        killed_at,
        kill_reason,
    ) = row
    return RefreshFamily(
        family_id=family_id,
        client_id=client_id,
        audience=audience,
        scope=scope,
        created_at=created_at,
        last_used_at=last_used_at,
        expires_at=expires_at,
        cnf=None if cnf is None else cbor2.loads(cnf),
        killed_at=killed_at,
        kill_reason=kill_reason,
    )


def _audience(row: tuple[Any, ...]) -> Audience:
    audience_id, token_format, lifetime, created_at = row
    return Audience(audience_id, token_format, lifetime, created_at)


def _client(row: tuple[Any, ...]) -> Client:
    client_id, audiences, scope, secret_digest, public_key, disabled, created_at = row
    return Client(
        client_id=client_id,
        audiences=tuple(json.loads(audiences)),
        scope=tuple(scope.split()),
        created_at=created_at,
        secret_digest=secret_digest,
        public_key=None if public_key is None else cbor2.loads(public_key),
        disabled=bool(disabled),
    )
