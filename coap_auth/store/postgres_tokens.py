"""PostgreSQL refresh families: a grant, a refresh, a family kill, each one transaction whose
outcome coap_auth.store.decisions decides from the rows read here.

Row locks serialise every change of a family: its row is locked before its refresh tokens and
access tokens, after the registry rows a grant checks (postgres_database's lock order), so a
refresh and a kill, or two refreshes of one token, queue on the family row.
"""

from __future__ import annotations

from typing import TypeVar

from coap_auth.store.audit import SERVICE_ACTOR
from coap_auth.store.base import Mint
from coap_auth.store.decisions import (
    FamilyKill,
    PresentedToken,
    kill_events,
    plan_refresh,
    revocable,
    settle_refresh,
    unminted,
)
from coap_auth.store.postgres_database import Conn, PostgresDatabase
from coap_auth.store.postgres_grants import Grant, PostgresGrants, ids
from coap_auth.store.postgres_revocation import PostgresRevocations, access_records
from coap_auth.store.records import (
    UNCHECKED,
    IssuedAccess,
    RefreshFamily,
    RefreshOutcome,
    RefreshStatus,
    RegistryVersions,
)
from coap_auth.store.rows import FAMILY_COLUMNS, family_from_row

M = TypeVar("M")

# FAMILY_COLUMNS of the refresh_families row joined as `f`.
_F_COLUMNS = ", ".join(f"f.{c.strip()}" for c in FAMILY_COLUMNS.split(","))

# A rotation's writes in one statement: spend the presented token ($3; COALESCE keeps the
# first spend of a grace retry) naming its successor ($2), spend the successor it replaces
# ($9, NULL unless grace), store the successor, touch the family, record the access token.
_ROTATION = (
    "WITH spent AS (UPDATE refresh_tokens SET spent_at = COALESCE(spent_at, $1), successor = $2"
    " WHERE digest = $3),"
    " replaced AS (UPDATE refresh_tokens SET spent_at = $1 WHERE digest = $9),"
    " successor AS (INSERT INTO refresh_tokens (digest, family_id, issued_at)"
    " VALUES ($2, $4, $1)),"
    " touched AS (UPDATE refresh_families SET last_used_at = $1 WHERE family_id = $4)"
    " INSERT INTO access_tokens (token_hash, family_id, client_id, exp, audience)"
    " VALUES ($5, $4, $6, $7, $8)"
)


class PostgresTokens:
    def __init__(
        self, db: PostgresDatabase, revocations: PostgresRevocations, grants: PostgresGrants
    ) -> None:
        self._db = db
        self._revocations = revocations
        self._grants = grants

    async def start_family(
        self,
        family: RefreshFamily,
        refresh_digest: bytes,
        access: IssuedAccess,
        registry: RegistryVersions = UNCHECKED,
    ) -> bool:
        return await self._grants.start(Grant.of(family, refresh_digest, access, registry))

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
        async def rotate(conn: Conn) -> RefreshOutcome[M]:
            found = await conn.fetchrow(
                "SELECT t.family_id, f.audience FROM refresh_tokens t"
                " JOIN refresh_families f USING (family_id) WHERE t.digest = $1",
                refresh_digest,
            )
            if found is None:
                return RefreshOutcome(RefreshStatus.UNKNOWN)
            # Lock order: the registry rows the refresh may be decided from (the caller's,
            # and the family's audience, which the mint reads), then the family, then its
            # token. A family's audience never changes, so the one read unlocked holds.
            view = self._grants.view()
            await view.lock(
                conn, [*ids(registry.audiences), found["audience"]], ids(registry.clients)
            )
            family = family_from_row(
                await conn.fetchrow(
                    f"SELECT {FAMILY_COLUMNS} FROM refresh_families WHERE family_id = $1"
                    " FOR UPDATE",
                    found["family_id"],
                )
            )
            # Read once the family is locked: every change of its tokens has committed.
            token = await conn.fetchrow(
                "SELECT t.spent_at, t.successor,"
                " s.digest IS NOT NULL AND s.spent_at IS NULL AS successor_unspent"
                " FROM refresh_tokens t LEFT JOIN refresh_tokens s ON s.digest = t.successor"
                " WHERE t.digest = $1 FOR UPDATE OF t",
                refresh_digest,
            )
            presented = PresentedToken(token["spent_at"], token["successor_unspent"])
            plan = plan_refresh(
                presented,
                family,
                client_id=client_id,
                now=now,
                grace=grace,
                idle_timeout=idle_timeout,
            )
            if plan.kill is not None:
                # The kill commits with the outcome (reused, expired).
                await self.kill(conn, [family], plan.kill, now)
            done = unminted(plan, family)
            if done is not None:
                return done
            minted = mint(family)
            # A row the mint names beyond those shared above (none is expected) is shared
            # now, out of the lock order: a deadlock that may cause is retried.
            is_current = await view.current(conn, registry + minted.registry)
            outcome = settle_refresh(plan, family, minted, is_current)
            if outcome.status is not plan.status or minted.access is None:
                return outcome
            replaced = token["successor"] if plan.spends_successor else None
            await _store_rotation(
                conn, family, refresh_digest, successor_digest, replaced, minted.access, now
            )
            return outcome

        return await self._db.transaction(rotate)

    async def kill_families(self, client_id: str, reason: str, now: int, actor: str) -> int:
        async def kill(conn: Conn) -> int:
            families = await self.unkilled_families(conn, "client_id", client_id)
            # All of them in one go: one TRL update, and every access row locked before the
            # TRL lock (killing them one by one deadlocks with a concurrent revoke_access).
            await self.kill(conn, families, FamilyKill(reason, actor), now)
            return len(families)

        return await self._db.transaction(kill)

    async def unkilled_families(self, conn: Conn, column: str, value: str) -> list[RefreshFamily]:
        """Unkilled families of one client or one audience (`column`), locked in family_id
        order; also those past their own expiry, since a token refreshed just before it
        outlives them."""
        assert column in ("client_id", "audience")
        rows = await conn.fetch(
            f"SELECT {FAMILY_COLUMNS} FROM refresh_families WHERE {column} = $1"
            " AND killed_at IS NULL ORDER BY family_id FOR UPDATE",
            value,
        )
        return [family_from_row(r) for r in rows]

    async def kill_family_of(
        self, refresh_digest: bytes, client_id: str, reason: str, now: int
    ) -> bool:
        async def kill(conn: Conn) -> bool:
            row = await conn.fetchrow(
                f"SELECT {_F_COLUMNS} FROM refresh_tokens t JOIN refresh_families f"
                " USING (family_id) WHERE t.digest = $1 AND f.client_id = $2"
                " AND f.killed_at IS NULL FOR UPDATE OF f",
                refresh_digest,
                client_id,
            )
            if row is None:
                return False
            await self.kill(conn, [family_from_row(row)], FamilyKill(reason, SERVICE_ACTOR), now)
            return True

        return await self._db.transaction(kill)

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        live = f"SELECT {FAMILY_COLUMNS} FROM refresh_families WHERE killed_at IS NULL"
        if client_id is None:
            rows = await self._db.fetch(
                f"{live} AND expires_at > $1 ORDER BY created_at, family_id", now
            )
        else:
            rows = await self._db.fetch(
                f"{live} AND expires_at > $1 AND client_id = $2 ORDER BY created_at, family_id",
                now,
                client_id,
            )
        return [family_from_row(r) for r in rows]

    async def kill(
        self, conn: Conn, families: list[RefreshFamily], kill: FamilyKill, now: int
    ) -> None:
        """End these families, whose rows the caller has locked: no refresh token of them
        works again; if `kill.revoke_access`, what decisions.revocable picks of their access
        tokens goes on the TRL in one update; one audit event per family."""
        if not families:
            return
        family_ids = [f.family_id for f in families]
        await conn.execute(
            "UPDATE refresh_families SET killed_at = $1, kill_reason = $2"
            " WHERE family_id = ANY($3)",
            now,
            str(kill.reason),
            family_ids,
        )
        await conn.execute(
            "UPDATE refresh_tokens SET spent_at = $1"
            " WHERE family_id = ANY($2) AND spent_at IS NULL",
            now,
            family_ids,
        )
        records = []
        revoked: list[bytes] = []
        if kill.revoke_access:
            # No new access row of these families can appear (their rows are locked). Those
            # chosen are locked (token_hash order, before the TRL lock) and chosen again as
            # locked: a revoke_access may have listed one meanwhile. Rows already revoked are
            # never locked here: a sweep delists them under the TRL lock.
            unlocked = await access_records(conn, "family_id = ANY($1)", family_ids)
            chosen = list(revocable(unlocked, now))
            if chosen:
                records = await access_records(conn, "token_hash = ANY($1)", chosen, lock=True)
                revoked = await self._revocations.revoke(conn, revocable(records, now), now)
        await self._db.audit(conn, kill_events(families, kill, records, revoked, now))


async def _store_rotation(
    conn: Conn,
    family: RefreshFamily,
    presented: bytes,
    successor: bytes,
    replaced: bytes | None,
    access: IssuedAccess,
    now: int,
) -> None:
    """A rotation's writes (_ROTATION): `replaced`, the presented token's unused successor
    when a grace retry replaces it."""
    await conn.execute(
        _ROTATION,
        now,
        successor,
        presented,
        family.family_id,
        access.token_hash,
        access.client_id,
        access.exp,
        access.audience,
        replaced,
    )
