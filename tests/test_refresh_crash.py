"""Refresh rotation survives a crash: SIGKILL the real server in the middle of a refresh storm,
restart it on the same data directory, and check the store and the wire. Grants too: SIGKILL
in a storm of concurrent grants (group-committed, many to a transaction), and none answered is
lost, none unanswered is half written.

What must hold after the restart (docs/protocol.md "Refresh tokens"):
- every refresh token the client received was committed (a 2.01 only for what is stored);
- a live family has exactly one unspent refresh token, never two live successors;
- the newest token the client holds works, unless the request carrying it had been committed
  when the server died, in which case presenting it is a reuse and kills the family;
- every token the client saw spent (its successor arrived) is refused with invalid_grant.

Integers are the docs/protocol.md numbers, written out on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2

from coap_auth.store import MasterKey
from tests.processes import ServerProcess, provision, serve_process

DB_FILE = "coap-auth.sqlite3"
REQUEST_TIMEOUT = 5  # s, one CoAP exchange with a live server
FAMILIES = 8
STORM_BEFORE_KILL = 0.4  # s of refresh storm before SIGKILL
MIN_REFRESHES = 2 * FAMILIES  # the storm must have done something before the kill
STORM_PROGRESS_TIMEOUT = 10  # s, to reach MIN_REFRESHES
AFTER_KILL = 0.3  # s to let responses already sent before the kill reach the client
GRANTS_IN_FLIGHT = 48  # concurrent grant requests: the store commits them in batches
MIN_GRANTS = 4 * GRANTS_IN_FLIGHT  # answered before the kill

# docs/protocol.md numbers
CF_ACE_CBOR = 19
AUDIENCE, CLIENT_ID, CLIENT_SECRET = 5, 24, 25
ERROR, GRANT_TYPE, REFRESH_TOKEN = 30, 33, 37
GRANT_REFRESH = 3
INVALID_GRANT = 3


# -- processes ----------------------------------------------------------------------------------


def serve(data_dir: Path, log: Path) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    """`coap-auth serve` with no grace window, so a reuse is judged at once; a storm from one
    address and one client, on purpose: no rate limits."""
    return serve_process(
        data_dir,
        log,
        COAP_AUTH_REFRESH_GRACE="0",
        COAP_AUTH_RATE_LIMIT_PER_ADDRESS="0",
        COAP_AUTH_RATE_LIMIT_PER_CLIENT="0",
    )


def _grant_body(client_id: str, secret: str) -> dict[int, Any]:
    return {CLIENT_ID: client_id, CLIENT_SECRET: secret, AUDIENCE: "thermostat"}


# -- the client -----------------------------------------------------------------------------------


async def post_token(
    context: aiocoap.Context, url: str, body: dict[Any, Any]
) -> tuple[aiocoap.Message, Any]:
    message = aiocoap.Message(
        code=aiocoap.POST, uri=url + "/token", payload=cbor2.dumps(body), content_format=CF_ACE_CBOR
    )
    response = await asyncio.wait_for(context.request(message).response, REQUEST_TIMEOUT)
    return response, cbor2.loads(response.payload) if response.payload else None


@dataclass
class Chain:
    """One refresh family as the client sees it."""

    # Every refresh token received, oldest first: [0] from the grant, [i+1] from refreshing [i].
    tokens: list[bytes]
    # Set when a refresh got an answer other than 2.01, or failed before the kill.
    failure: str | None = None
    stopped_by: list[BaseException] = field(default_factory=list)

    @property
    def seen_spent(self) -> list[bytes]:
        """Tokens whose successor arrived: the client knows the server spent them."""
        return self.tokens[:-1]

    @property
    def latest(self) -> bytes:
        return self.tokens[-1]


def _refresh_body(token: bytes, client_id: str, secret: str) -> dict[int, Any]:
    return {
        GRANT_TYPE: GRANT_REFRESH,
        REFRESH_TOKEN: token,
        CLIENT_ID: client_id,
        CLIENT_SECRET: secret,
    }


async def _refresh_forever(
    context: aiocoap.Context, url: str, chain: Chain, client_id: str, secret: str
) -> None:
    while True:
        try:
            response, body = await post_token(
                context, url, _refresh_body(chain.latest, client_id, secret)
            )
        except Exception as error:  # the server died: this request's fate is unknown
            chain.stopped_by.append(error)
            return
        if response.code != aiocoap.CREATED:
            chain.failure = f"{response.code} {body!r}"
            return
        chain.tokens.append(body[REFRESH_TOKEN])


# -- the store, read directly -------------------------------------------------------------------


@dataclass
class TokenRow:
    family_id: bytes
    spent_at: int | None
    successor: bytes | None


class Db:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_FILE
        # The key file `init` wrote, read directly: digests are what the store keeps.
        self.master_key = MasterKey((data_dir / "master.key").read_bytes())

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as conn:
            return conn.execute(sql, args).fetchall()

    def token(self, token: bytes) -> TokenRow | None:
        rows = self.query(
            "SELECT family_id, spent_at, successor FROM refresh_tokens WHERE digest = ?",
            self.master_key.digest(token),
        )
        return TokenRow(*rows[0]) if rows else None

    def unspent(self, family_id: bytes) -> list[bytes]:
        return [
            r[0]
            for r in self.query(
                "SELECT digest FROM refresh_tokens WHERE family_id = ? AND spent_at IS NULL",
                family_id,
            )
        ]

    def orphans(self) -> list[tuple[str, bytes]]:
        """Half-written grants: a family without its refresh token or its access token's
        record, or a token row without its family."""
        rows = self.query(
            "SELECT 'family', f.family_id FROM refresh_families f"
            " WHERE NOT EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family_id = f.family_id)"
            " OR NOT EXISTS (SELECT 1 FROM access_tokens a WHERE a.family_id = f.family_id)"
            " UNION ALL SELECT 'refresh', t.digest FROM refresh_tokens t"
            " WHERE NOT EXISTS (SELECT 1 FROM refresh_families f WHERE f.family_id = t.family_id)"
            " UNION ALL SELECT 'access', a.token_hash FROM access_tokens a"
            " WHERE NOT EXISTS (SELECT 1 FROM refresh_families f WHERE f.family_id = a.family_id)"
        )
        return [(kind, bytes(value)) for kind, value in rows]

    def killed(self, family_id: bytes) -> bool:
        rows = self.query("SELECT killed_at FROM refresh_families WHERE family_id = ?", family_id)
        assert len(rows) == 1
        return rows[0][0] is not None


# -- the test -----------------------------------------------------------------------------------


async def test_refresh_storm_killed_mid_flight_stays_consistent(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    secret = provision(data_dir, "--lifetime", "600")
    client_id = "sensor-1"

    # -- storm, then SIGKILL --------------------------------------------------------------------
    async with serve(data_dir, log) as server:
        context = await aiocoap.Context.create_client_context()
        tasks: list[asyncio.Task[None]] = []
        try:
            chains = []
            for _ in range(FAMILIES):
                response, body = await post_token(
                    context,
                    server.url,
                    {CLIENT_ID: client_id, CLIENT_SECRET: secret, AUDIENCE: "thermostat"},
                )
                assert response.code == aiocoap.CREATED, (response.code, body)
                chains.append(Chain([body[REFRESH_TOKEN]]))

            tasks = [
                asyncio.create_task(_refresh_forever(context, server.url, c, client_id, secret))
                for c in chains
            ]

            def refreshes() -> int:
                return sum(len(c.tokens) - 1 for c in chains)

            await asyncio.sleep(STORM_BEFORE_KILL)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STORM_PROGRESS_TIMEOUT
            while refreshes() < MIN_REFRESHES and loop.time() < deadline:
                await asyncio.sleep(0.05)
            # Every chain still refreshing: nothing went wrong before the crash.
            assert [c.failure for c in chains] == [None] * FAMILIES, server.log_tail()
            assert not any(t.done() for t in tasks), [c.stopped_by for c in chains]
            assert refreshes() >= MIN_REFRESHES, server.log_tail()

            server.process.kill()  # SIGKILL, mid-transaction as likely as not
            await asyncio.wait_for(server.process.wait(), 10)
            await asyncio.sleep(AFTER_KILL)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
            await asyncio.wait_for(context.shutdown(), 10)
    assert [c.failure for c in chains] == [None] * FAMILIES

    # -- restart on the same data dir ------------------------------------------------------------
    async with serve(data_dir, log) as server:
        db = Db(data_dir)

        # What the store says, before any further request.
        family_of: list[bytes] = []
        latest_live: list[bool] = []
        for chain in chains:
            rows = [db.token(t) for t in chain.tokens]
            assert all(r is not None for r in rows), "a refresh token answered 2.01 was lost"
            family_id = rows[0].family_id  # type: ignore[union-attr]
            assert {r.family_id for r in rows} == {family_id}  # type: ignore[union-attr]
            for token, row in zip(chain.tokens, rows, strict=True):
                assert row is not None
                if token != chain.latest:
                    assert row.spent_at is not None, "a token the client saw spent is unspent"
            assert not db.killed(family_id), "the storm alone killed a family"
            unspent = db.unspent(family_id)
            assert len(unspent) == 1, f"{len(unspent)} live refresh tokens in one family"
            latest = rows[-1]
            assert latest is not None
            if latest.spent_at is None:
                assert unspent == [db.master_key.digest(chain.latest)]
            else:
                # The request carrying it was committed, its answer lost with the server: the
                # successor (which the client never saw) is the one live token.
                assert latest.successor is not None and unspent == [latest.successor]
            family_of.append(family_id)
            latest_live.append(latest.spent_at is None)
        assert len(set(family_of)) == FAMILIES
        # Spot-check the whole table: never two live tokens in any family.
        assert (
            db.query(
                "SELECT family_id FROM refresh_tokens WHERE spent_at IS NULL"
                " GROUP BY family_id HAVING count(*) > 1"
            )
            == []
        )

        context = await aiocoap.Context.create_client_context()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        _present_after_restart(context, server.url, chain, client_id, secret)
                        for chain in chains
                    )
                ),
                60,
            )
        finally:
            await asyncio.wait_for(context.shutdown(), 10)

        for chain, family_id, live, (latest_result, new_token, spent_results) in zip(
            chains, family_of, latest_live, results, strict=True
        ):
            code, body = latest_result
            if live:
                assert code == aiocoap.CREATED, (code, body, server.log_tail())
                assert new_token is not None and new_token not in chain.tokens
            else:
                assert code == aiocoap.BAD_REQUEST and body[ERROR] == INVALID_GRANT, (code, body)
            for code, body in spent_results:
                assert code != aiocoap.CREATED, "a spent refresh token worked again"
                assert code == aiocoap.BAD_REQUEST and body[ERROR] == INVALID_GRANT, (code, body)
            if chain.seen_spent or not live:
                # Presenting a spent token is theft: the family is dead, with every token.
                assert db.killed(family_id)
                assert db.unspent(family_id) == []


async def _present_after_restart(
    context: aiocoap.Context, url: str, chain: Chain, client_id: str, secret: str
) -> tuple[tuple[Any, Any], bytes | None, list[tuple[Any, Any]]]:
    """Present the newest token first (so no reuse has killed its family yet), then every
    token the client saw spent."""
    response, body = await post_token(context, url, _refresh_body(chain.latest, client_id, secret))
    new_token = body[REFRESH_TOKEN] if response.code == aiocoap.CREATED else None
    spent_results = []
    for token in chain.seen_spent:
        spent, spent_body = await post_token(context, url, _refresh_body(token, client_id, secret))
        spent_results.append((spent.code, spent_body))
    return (response.code, body), new_token, spent_results


async def _grant_forever(
    context: aiocoap.Context, url: str, answered: list[bytes], body: dict[int, Any]
) -> str | None:
    """Ask for grants one after another; each answered one's refresh token goes to `answered`.
    Returns why it stopped: None when the server died (that request's fate unknown)."""
    while True:
        try:
            response, answer = await post_token(context, url, body)
        except Exception:
            return None
        if response.code != aiocoap.CREATED:
            return f"{response.code} {answer!r}"
        answered.append(answer[REFRESH_TOKEN])


async def test_grant_storm_killed_mid_flight_loses_no_answered_grant(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    secret = provision(data_dir, "--lifetime", "600")
    body = _grant_body("sensor-1", secret)
    answered: list[bytes] = []

    # -- storm of grants, then SIGKILL -------------------------------------------------------------
    async with serve(data_dir, log) as server:
        context = await aiocoap.Context.create_client_context()
        tasks: list[asyncio.Task[str | None]] = []
        try:
            tasks = [
                asyncio.create_task(_grant_forever(context, server.url, answered, body))
                for _ in range(GRANTS_IN_FLIGHT)
            ]
            await asyncio.sleep(STORM_BEFORE_KILL)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STORM_PROGRESS_TIMEOUT
            while len(answered) < MIN_GRANTS and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
            assert len(answered) >= MIN_GRANTS, server.log_tail()

            server.process.kill()  # SIGKILL, as likely as not with a batch being committed
            await asyncio.wait_for(server.process.wait(), 10)
            await asyncio.sleep(AFTER_KILL)
        finally:
            for task in tasks:
                task.cancel()
            stopped = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
            await asyncio.wait_for(context.shutdown(), 10)
    assert [s for s in stopped if isinstance(s, str)] == []  # only the kill stopped them

    # -- restart on the same data dir --------------------------------------------------------------
    async with serve(data_dir, log) as server:
        db = Db(data_dir)
        assert db.orphans() == [], "a grant was half written"
        rows = [db.token(token) for token in answered]
        assert all(row is not None for row in rows), "a grant answered 2.01 was lost"
        families = {row.family_id for row in rows if row is not None}
        assert len(families) == len(answered)
        stored = db.query("SELECT count(*) FROM refresh_families")[0][0]
        # Committed but unanswered (the kill came between the commit and the answer): whole.
        assert stored >= len(answered)

        # And they work: each answered grant's refresh token refreshes, once.
        context = await aiocoap.Context.create_client_context()
        try:
            sample = answered[:: max(1, len(answered) // 16)]
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        post_token(context, server.url, _refresh_body(token, "sensor-1", secret))
                        for token in sample
                    )
                ),
                60,
            )
        finally:
            await asyncio.wait_for(context.shutdown(), 10)
        for response, answer in results:
            assert response.code == aiocoap.CREATED, (response.code, answer, server.log_tail())
