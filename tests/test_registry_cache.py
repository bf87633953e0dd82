"""The /token path reads clients and audiences from memory (coap_auth.service.registry_cache):
a warm grant or refresh is one store call, and an operator's change still applies to the very
next request, because the store refuses a grant decided from a row that changed since.

End to end: the real `coap-auth serve` over UDP with the change poll at its slowest (60 s), so
no reload by the change feed can be what makes a change apply; the CLI changes the registry from
its own process. In process: the store calls of a grant, counted by the service's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.errors import InvalidClient
from coap_auth.service import AuthService, TokenRequest
from coap_auth.service.registry_cache import RegistryCache
from coap_auth.store import Audience, Client
from coap_auth.wire import GrantType
from tests import pg
from tests.processes import SECRET_LINE, run_cli, serve_process

REQUEST_TIMEOUT = 5
# docs/protocol.md numbers, written out
CF_ACE_CBOR = 19
ACCESS_TOKEN, EXPIRES_IN = 1, 2
CLIENT_ID, CLIENT_SECRET, GRANT_TYPE, REFRESH_TOKEN = 24, 25, 33, 37
GRANT_REFRESH = 3


@dataclass
class Deployment:
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def ok(self, *args: str) -> str:
        result: subprocess.CompletedProcess[str] = run_cli(
            *args, data_dir=self.data_dir, env=self.env
        )
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    def secret_of(self, *args: str) -> str:
        (value,) = [m.group(1) for m in map(SECRET_LINE.match, self.ok(*args).splitlines()) if m]
        return value


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pg.needs_postgres)])
async def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Deployment]:
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        yield Deployment(data_dir)
        return
    schema = await pg.create_schema()
    assert pg.PG_DSN is not None
    try:
        yield Deployment(data_dir, {"COAP_AUTH_STORE": pg.PG_DSN, "COAP_AUTH_STORE_SCHEMA": schema})
    finally:
        await pg.drop_schema(schema)


class Wire:
    def __init__(self, context: aiocoap.Context, url: str) -> None:
        self.context, self.url = context, url

    async def token(self, body: dict[int, Any]) -> tuple[aiocoap.Code, Any]:
        message = aiocoap.Message(
            code=aiocoap.POST,
            uri=self.url + "/token",
            payload=cbor2.dumps(body),
            content_format=CF_ACE_CBOR,
        )
        response = await asyncio.wait_for(self.context.request(message).response, REQUEST_TIMEOUT)
        return response.code, cbor2.loads(response.payload) if response.payload else None


@contextlib.asynccontextmanager
async def _served(d: Deployment, tmp_path: Path) -> AsyncIterator[Wire]:
    context = await aiocoap.Context.create_client_context()
    # The slowest change poll the settings allow: nothing here waits for a reload.
    env = {**d.env, "COAP_AUTH_CHANGE_POLL_INTERVAL": "60"}
    try:
        async with serve_process(d.data_dir, tmp_path / "serve.log", **env) as server:
            yield Wire(context, server.url)
    finally:
        await context.shutdown()


def _provision(d: Deployment) -> str:
    d.ok("init")
    d.ok("audiences", "add", "thermostat", "--profile", "bearer")
    return d.secret_of(
        "clients", "add", "sensor-1", "--audience", "thermostat", "--scope", "r", "--secret"
    )


async def test_a_disabled_client_gets_no_grant_and_no_refresh_at_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    secret = _provision(deployment)
    async with _served(deployment, tmp_path) as wire:
        grant = {CLIENT_ID: "sensor-1", CLIENT_SECRET: secret}
        code, body = await wire.token(grant)  # the cache is warm from here
        assert code == aiocoap.CREATED, body
        refresh = {GRANT_TYPE: GRANT_REFRESH, REFRESH_TOKEN: body[REFRESH_TOKEN], **grant}

        deployment.ok("clients", "disable", "sensor-1")
        assert (await wire.token(grant))[0] == aiocoap.UNAUTHORIZED
        assert (await wire.token(refresh))[0] == aiocoap.UNAUTHORIZED

        deployment.ok("clients", "enable", "sensor-1")
        code, body = await wire.token(refresh)
        assert code == aiocoap.CREATED, body


async def test_a_new_secret_and_a_new_client_work_at_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    secret = _provision(deployment)
    async with _served(deployment, tmp_path) as wire:
        old = {CLIENT_ID: "sensor-1", CLIENT_SECRET: secret}
        assert (await wire.token(old))[0] == aiocoap.CREATED

        new_secret = deployment.secret_of("clients", "rotate-secret", "sensor-1", "--overlap", "0")
        assert (await wire.token(old))[0] == aiocoap.UNAUTHORIZED
        new = {CLIENT_ID: "sensor-1", CLIENT_SECRET: new_secret}
        assert (await wire.token(new))[0] == aiocoap.CREATED

        other = deployment.secret_of(
            "clients", "add", "sensor-2", "--audience", "thermostat", "--scope", "r", "--secret"
        )
        assert (await wire.token({CLIENT_ID: "sensor-2", CLIENT_SECRET: other}))[
            0
        ] == aiocoap.CREATED


async def test_an_audience_change_applies_to_the_next_grant_and_refresh(
    deployment: Deployment, tmp_path: Path
) -> None:
    secret = _provision(deployment)
    async with _served(deployment, tmp_path) as wire:
        grant = {CLIENT_ID: "sensor-1", CLIENT_SECRET: secret}
        code, body = await wire.token(grant)
        assert code == aiocoap.CREATED and body[EXPIRES_IN] == 3600
        refresh = {GRANT_TYPE: GRANT_REFRESH, REFRESH_TOKEN: body[REFRESH_TOKEN], **grant}

        deployment.ok("audiences", "set", "thermostat", "--lifetime", "120")
        code, body = await wire.token(refresh)
        assert code == aiocoap.CREATED and body[EXPIRES_IN] == 120, body
        code, body = await wire.token(grant)
        assert code == aiocoap.CREATED and body[EXPIRES_IN] == 120, body


# -- in process: what a warm grant asks of the store -------------------------------------------


def _store_calls(service: AuthService) -> dict[str, float]:
    calls: dict[str, float] = {}
    for metric in service.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "coap_auth_store_operation_duration_seconds_count":
                calls[sample.labels["operation"]] = sample.value
    return calls


def _new_calls(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}


async def test_a_warm_grant_and_refresh_are_one_store_call_each(service: AuthService) -> None:
    now = service.clock.now()
    await service.store.add_audience(Audience("thermostat", "cwt", 3600, now), "operator")
    secret = "secret-of-sensor-1-0123456789abcdef"
    await service.store.add_client(
        Client(
            "sensor-1", ("thermostat",), ("r",), now, secret_digest=service.secret_digest(secret)
        ),
        "operator",
    )
    grant = TokenRequest(client_id="sensor-1", client_secret=secret)
    await service.issue_token(grant)  # loads the cache

    before = _store_calls(service)
    issued = [await service.issue_token(grant) for _ in range(3)]
    assert _new_calls(before, _store_calls(service)) == {"start_family": 3}

    before = _store_calls(service)
    refresh = TokenRequest(
        grant_type=GrantType.REFRESH_TOKEN,
        client_id="sensor-1",
        client_secret=secret,
        refresh_token=issued[0].refresh_token,
    )
    await service.issue_token(refresh)
    assert _new_calls(before, _store_calls(service)) == {"rotate_refresh": 1}


async def test_an_unknown_client_costs_what_a_wrong_secret_does(
    service: AuthService,
) -> None:
    now = service.clock.now()
    await service.store.add_audience(Audience("thermostat", "cwt", 3600, now), "operator")
    secret = "secret-of-sensor-1-0123456789abcdef"
    await service.store.add_client(
        Client(
            "sensor-1", ("thermostat",), ("r",), now, secret_digest=service.secret_digest(secret)
        ),
        "operator",
    )
    await service.issue_token(TokenRequest(client_id="sensor-1", client_secret=secret))

    before = _store_calls(service)
    with pytest.raises(InvalidClient):
        await service.issue_token(TokenRequest(client_id="nobody", client_secret=secret))
    unknown = _new_calls(before, _store_calls(service))
    before = _store_calls(service)
    with pytest.raises(InvalidClient):
        await service.issue_token(TokenRequest(client_id="sensor-1", client_secret="wrong"))
    # One lookup in the store either way (the cache may be behind it): an unknown id costs
    # what a known one with a wrong secret does.
    assert unknown == _new_calls(before, _store_calls(service)) == {"get_client": 1}


class _HeldSnapshots:
    """The real store, whose registry snapshots can be held at a gate once read: a reload
    that read its rows before a change, and would install them after it."""

    def __init__(self, store: Any) -> None:
        self.store, self.hold = store, False
        self.read, self.gate = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def registry_snapshot(self) -> Any:
        snapshot = await self.store.registry_snapshot()
        if self.hold:
            self.read.set()
            await self.gate.wait()
        return snapshot


async def test_a_reload_that_read_before_a_change_is_not_kept(service: AuthService) -> None:
    now = service.clock.now()
    await service.store.add_audience(Audience("thermostat", "cwt", 3600, now), "operator")
    await service.store.add_client(
        Client("sensor-1", ("thermostat",), ("r",), now, secret_digest=bytes(32)), "operator"
    )
    held = _HeldSnapshots(service.store)
    cache = RegistryCache(held)
    assert (await cache.client("sensor-1")) is not None

    held.hold = True
    cache.changed(b"moved")  # a change-feed tick: reload
    reload = asyncio.create_task(cache.client("sensor-1"))
    await held.read.wait()  # the reload has read its rows...
    await service.store.disable_client("sensor-1", now + 1, "operator")
    cache.stale()  # ...when a grant finds the row changed
    held.hold = False
    held.gate.set()
    await reload
    found = await cache.client("sensor-1")
    assert found is not None and found.disabled, "the rows read before the change were kept"
