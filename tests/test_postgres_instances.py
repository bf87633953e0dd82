"""Several instances on one PostgreSQL database (issue 9), over real UDP.

Two servers, A and B, on two ports share one schema: a refresh through A and the reuse of the
spent token through B kill the family; a rotation or a revocation made on A reaches B's
observers through LISTEN/NOTIFY (B polls only every 30 s, so nothing else could tell it); an
instance that loses its database answers 5.03 with Max-Age and recovers on its own.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import asyncpg
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.service import AuthService
from coap_auth.store import Audience, Client, MasterKey
from coap_auth.store.postgres import PostgresStore
from coap_auth.wire import AceParam, CoapCode, ContentFormat, GrantType
from tests import pg
from tests.processes import COAP_AUTH, clean_env

pytestmark = pg.needs_postgres

NOTIFY_TIMEOUT = 5
SECRET = "secret-of-sensor-1-0123456789abcdef"


@dataclass
class Instance:
    server: Server
    service: AuthService

    @property
    def base(self) -> str:
        return f"coap://127.0.0.1:{self.server.port}"


async def start_instance(
    dsn: str, schema: str, master_key: MasterKey, clock: SettableClock, tmp_path: Path, **kw: Any
) -> Instance:
    settings = Settings(
        data_dir=tmp_path,
        bind="127.0.0.1",
        port=0,
        issuer="coap://as.test",
        **{"require_oscore": False, **kw},
    )
    store = PostgresStore(dsn, master_key, schema=schema)
    await store.open()
    service = AuthService(store, master_key, settings, clock)
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    return Instance(server, service)


@pytest.fixture
async def pair(schema: str, tmp_path: Path) -> AsyncIterator[tuple[Instance, Instance, Any]]:
    """Instances A and B (B polls only every 30 s) and an aiocoap client context."""
    assert pg.PG_DSN is not None
    master_key, clock = MasterKey(secrets.token_bytes(32)), SettableClock()
    a = await start_instance(pg.PG_DSN, schema, master_key, clock, tmp_path / "a")
    b = await start_instance(
        pg.PG_DSN, schema, master_key, clock, tmp_path / "b", change_poll_interval=30.0
    )
    await a.service.store.add_audience(Audience("thermostat", "cwt", 600, clock.now()), "operator")
    await a.service.store.add_client(
        Client(
            "sensor-1",
            ("thermostat",),
            ("temp:read",),
            clock.now(),
            secret_digest=a.service.secret_digest(SECRET),
        ),
        "operator",
    )
    context = await aiocoap.Context.create_client_context()
    try:
        yield a, b, context
    finally:
        await context.shutdown()
        for instance in (a, b):
            await instance.server.stop()
            await instance.service.store.close()


async def post(context: Any, instance: Instance, path: str, body: dict) -> tuple[Any, Any]:
    request = aiocoap.Message(
        code=aiocoap.POST,
        uri=instance.base + path,
        payload=cbor2.dumps(body),
        content_format=ContentFormat.ACE_CBOR,
    )
    response = await asyncio.wait_for(context.request(request).response, NOTIFY_TIMEOUT)
    return response, cbor2.loads(response.payload) if response.payload else None


CRED = {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: SECRET}


def refresh_body(token: bytes) -> dict:
    return {**CRED, AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN, AceParam.REFRESH_TOKEN: token}


async def test_reuse_through_another_instance_kills_the_family(pair: Any) -> None:
    a, b, context = pair
    response, grant = await post(context, a, "/token", CRED)
    assert response.code == aiocoap.CREATED
    spent = grant[AceParam.REFRESH_TOKEN]
    response, refreshed = await post(context, a, "/token", refresh_body(spent))
    assert response.code == aiocoap.CREATED

    a.service.clock.advance(31)  # past the grace window
    response, err = await post(context, b, "/token", refresh_body(spent))
    assert response.code == CoapCode.BAD_REQUEST and err[AceParam.ERROR] == 3
    assert "reused" in err[AceParam.ERROR_DESCRIPTION]
    # The legitimate successor is dead on both instances.
    for instance in (a, b):
        response, err = await post(
            context, instance, "/token", refresh_body(refreshed[AceParam.REFRESH_TOKEN])
        )
        assert response.code == CoapCode.BAD_REQUEST and err[AceParam.ERROR] == 3


async def test_racing_refreshes_on_two_instances_leave_one_live_successor(
    pair: Any, schema: str
) -> None:
    a, b, context = pair
    _, grant = await post(context, a, "/token", CRED)
    token = grant[AceParam.REFRESH_TOKEN]
    answers = await asyncio.gather(
        *(post(context, (a, b)[n % 2], "/token", refresh_body(token)) for n in range(10))
    )
    # Inside the grace window every racer gets an answer (a device whose response was lost
    # retries), but the store serialises them: exactly one successor stays live.
    assert {response.code for response, _ in answers} == {aiocoap.CREATED}
    live = await pg.fetch(schema, "SELECT digest FROM refresh_tokens WHERE spent_at IS NULL")
    assert len(live) == 1
    successors = [body[AceParam.REFRESH_TOKEN] for _, body in answers]
    winners = []
    for successor in successors:
        response, _ = await post(context, a, "/token", refresh_body(successor))
        if response.code == aiocoap.CREATED:
            winners.append(successor)
        else:
            break  # a spent successor is reuse: the family dies, as it should
    assert len(winners) <= 1


async def observe(context: Any, instance: Instance, path: str) -> Any:
    """The first response, the notification iterator, and the request, which the caller must
    keep: aiocoap cancels an observation whose request object is collected."""
    request = context.request(
        aiocoap.Message(code=aiocoap.GET, uri=instance.base + path, observe=0)
    )
    first = await asyncio.wait_for(request.response, NOTIFY_TIMEOUT)
    assert first.opt.observe is not None
    return first, aiter(request.observation), request


async def test_rotation_and_revocation_on_a_reach_observers_of_b(pair: Any) -> None:
    a, b, context = pair
    first, keys_updates, _keys_request = await observe(context, b, "/keys")

    changed = await a.service.rotate_keys(force=True, actor="operator")
    new_next = next(k.kid for k in changed if k.state == "next")
    update = await asyncio.wait_for(anext(keys_updates), NOTIFY_TIMEOUT)
    assert new_next in {k[2] for k in cbor2.loads(update.payload)}
    assert update.payload != first.payload

    _, trl_updates, _trl_request = await observe(context, b, "/revoke/trl")
    _, grant = await post(context, b, "/token", CRED)
    response, _ = await post(
        context, a, "/revoke", {**CRED, AceParam.TOKEN: grant[AceParam.ACCESS_TOKEN]}
    )
    assert response.code == aiocoap.CHANGED
    update = await asyncio.wait_for(anext(trl_updates), NOTIFY_TIMEOUT)
    assert len(cbor2.loads(update.payload)[0]) == 1


# -- connection loss ----------------------------------------------------------------------------


async def test_lost_database_answers_5_03_with_max_age_and_recovers(
    schema: str, tmp_path: Path
) -> None:
    async with pg.own_role(schema) as (role, dsn):
        master_key, clock = MasterKey(secrets.token_bytes(32)), SettableClock()
        instance = await start_instance(dsn, schema, master_key, clock, tmp_path)
        store = instance.service.store
        await store.add_audience(Audience("thermostat", "cwt", 600, clock.now()), "operator")
        await store.add_client(
            Client(
                "sensor-1",
                ("thermostat",),
                ("temp:read",),
                clock.now(),
                secret_digest=instance.service.secret_digest(SECRET),
            ),
            "operator",
        )
        context = await aiocoap.Context.create_client_context()
        admin = await asyncpg.connect(pg.PG_DSN)
        try:
            response, _ = await post(context, instance, "/token", CRED)
            assert response.code == aiocoap.CREATED

            # The database goes away for this instance: no new logins, sessions cut.
            await admin.execute(f"ALTER ROLE {role} NOLOGIN")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            for _ in range(2):
                response, body = await post(context, instance, "/token", CRED)
                assert response.code == CoapCode.SERVICE_UNAVAILABLE
                assert response.opt.max_age == 5
                assert response.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR
                assert SECRET not in repr(body)

            # Back: the next requests succeed without any restart.
            await admin.execute(f"ALTER ROLE {role} LOGIN")
            response, _ = await post(context, instance, "/token", CRED)
            assert response.code == aiocoap.CREATED
        finally:
            await admin.close()
            await context.shutdown()
            await instance.server.stop()
            await store.close()


# -- the command line ---------------------------------------------------------------------------


def test_cli_init_and_commands_on_postgres(schema: str, tmp_path: Path) -> None:
    assert pg.PG_DSN is not None
    env = clean_env(COAP_AUTH_STORE=pg.PG_DSN, COAP_AUTH_STORE_SCHEMA=schema)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [COAP_AUTH, *args, "--data-dir", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    first = cli("init")
    assert first.returncode == 0 and "initialised" in first.stdout, first.stderr
    assert "already initialised" in cli("init").stdout
    assert cli("audiences", "add", "thermostat").returncode == 0
    keys = cli("keys", "list", "--json")
    assert keys.returncode == 0 and '"state": "active"' in keys.stdout
    assert not (tmp_path / "data" / "coap-auth.sqlite3").exists()  # nothing went to SQLite
    bad = subprocess.run(
        [COAP_AUTH, "keys", "list", "--store", "mysql://x", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert bad.returncode == 2 and "postgresql://" in bad.stderr
