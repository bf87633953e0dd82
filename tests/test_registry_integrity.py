"""The database is not trusted alone (issue 13), end to end: `coap-auth serve` as a process,
requests over real UDP, tampering done with plain SQL by someone who has the database (SQLite
file or PostgreSQL schema) but not the master key.

A rogue public-key client inserted in the clients table, and a registered client whose public
key is replaced, are refused with 4.01 invalid_client, exactly like an unknown client; an
audience whose row was edited behaves as unknown; `coap-auth audit verify` names every such row
and exits 2. Untouched rows keep working. A database put back to a schema before the seals is
refused at start, not sealed again; an older sealed row put back (a disable undone) or a row
deleted is reported by `audit verify` (the audit head's registry digest).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import asyncpg
import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.tokens import Claims, cose_key_from_public
from coap_auth.tokens.cose import sign1
from coap_auth.wire import CoseAlg
from tests import pg
from tests.processes import (
    CLI_TIMEOUT,
    SECRET_LINE,
    clean_env,
    free_udp_port,
    run_cli,
    serve_argv,
    serve_process,
)

REQUEST_TIMEOUT = 5
ISSUER = "coap-auth"  # the default issuer: `aud` of a client assertion
# docs/protocol.md numbers, written out
CF_ACE_CBOR = 19
ACCESS_TOKEN, EXPIRES_IN, AUDIENCE, TOKEN, ACTIVE = 1, 2, 5, 11, 10
CLIENT_ID, CLIENT_SECRET, ERROR, ERROR_DESCRIPTION = 24, 25, 30, 31
INVALID_CLIENT_BODY = {ERROR: 2, ERROR_DESCRIPTION: "client authentication failed"}
UNAUTHORIZED, BAD_REQUEST = aiocoap.UNAUTHORIZED, aiocoap.BAD_REQUEST
REGISTRY_MISMATCH = "the client and audience rows are not the ones its head records"
DOWNGRADE = (
    "database claims schema v2 but this data directory has sealed it before (downgrade?);"
    " put an older SQLite backup back with `coap-auth restore`, which checks it under the"
    " master key; for a PostgreSQL dump restored on purpose, remove the sealed-schema.* file"
    " in the data directory"
)


@dataclass
class Deployment:
    """A data directory, its store (SQLite in it, or a PostgreSQL schema) and the settings
    every command and the server get."""

    data_dir: Path
    store: str
    schema: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, data_dir=self.data_dir, env=self.env)

    def cli_ok(self, *args: str | Path) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    async def tamper(self, sql: str, *args: Any) -> None:
        """Change the database directly ($1-style parameters), committed at once."""
        if self.store == "sqlite":
            with contextlib.closing(sqlite3.connect(self.data_dir / "coap-auth.sqlite3")) as conn:
                with conn:
                    conn.execute(sql.replace("$1", "?").replace("$2", "?"), args)
            return
        assert pg.PG_DSN is not None
        conn = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": self.schema})
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def row(self, sql: str) -> tuple[Any, ...]:
        """One row, as stored, read directly."""
        if self.store == "sqlite":
            with contextlib.closing(sqlite3.connect(self.data_dir / "coap-auth.sqlite3")) as conn:
                return tuple(conn.execute(sql).fetchone())
        assert pg.PG_DSN is not None
        conn = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": self.schema})
        try:
            return tuple(await conn.fetchrow(sql))
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pg.needs_postgres)])
async def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Deployment]:
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        yield Deployment(data_dir, "sqlite")
        return
    schema = await pg.create_schema()
    assert pg.PG_DSN is not None
    env = {"COAP_AUTH_STORE": pg.PG_DSN, "COAP_AUTH_STORE_SCHEMA": schema}
    try:
        yield Deployment(data_dir, "postgres", schema, env)
    finally:
        await pg.drop_schema(schema)


@dataclass
class Registered:
    deployment: Deployment
    secret: str  # sensor-1's
    meter: ec.EllipticCurvePrivateKey  # meter-7's device key
    attacker: ed25519.Ed25519PrivateKey


def _pem(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
def registered(deployment: Deployment, tmp_path: Path) -> Registered:
    """By the CLI: audiences `thermostat` (tokens) and `dashboard` (a resource server that
    introspects with a secret), secret client `sensor-1`, public-key client `meter-7`."""
    meter = ec.generate_private_key(ec.SECP256R1())
    deployment.cli_ok("init")
    # Bearer: the secret clients here have no key to bind tokens to.
    deployment.cli_ok("audiences", "add", "thermostat", "--profile", "bearer", "--lifetime", "600")
    deployment.cli_ok("audiences", "add", "dashboard", "--profile", "bearer", "--introspect-secret")
    stdout = deployment.cli_ok(
        "clients", "add", "sensor-1", "--audience", "thermostat", "--scope", "temp:read", "--secret"
    )
    (secret,) = [m.group(1) for m in map(SECRET_LINE.match, stdout.splitlines()) if m]
    deployment.cli_ok(
        "clients",
        "add",
        "meter-7",
        "--audience",
        "thermostat",
        "--scope",
        "temp:read",
        "--public-key",
        _pem(tmp_path / "meter.pem", meter),
    )
    return Registered(deployment, secret, meter, ed25519.Ed25519PrivateKey.generate())


def _assertion(key: Any, alg: CoseAlg, client_id: str) -> bytes:
    now = int(time.time())
    claims = Claims(
        iss=client_id, sub=client_id, aud=ISSUER, exp=now + 120, iat=now, cti=secrets.token_bytes(8)
    )
    signed = sign1(cbor2.dumps(claims.to_cwt_map()), key, alg, b"device-kid")
    return cbor2.dumps(cbor2.CBORTag(61, signed))


async def _post(context: aiocoap.Context, url: str, body: dict[Any, Any]) -> tuple[Any, Any]:
    message = aiocoap.Message(
        code=aiocoap.POST, uri=url, payload=cbor2.dumps(body), content_format=CF_ACE_CBOR
    )
    response = await asyncio.wait_for(context.request(message).response, REQUEST_TIMEOUT)
    return response, cbor2.loads(response.payload) if response.payload else None


@contextlib.asynccontextmanager
async def _served(registered: Registered, tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    deployment = registered.deployment
    log = tmp_path / "serve.log"
    context = await aiocoap.Context.create_client_context()
    try:
        async with serve_process(deployment.data_dir, log, **deployment.env) as server:
            yield server.url, context
    finally:
        await context.shutdown()


async def test_rogue_and_edited_clients_are_refused_and_reported(
    registered: Registered, tmp_path: Path
) -> None:
    deployment, attacker = registered.deployment, registered.attacker
    attacker_key = cbor2.dumps(cose_key_from_public(attacker.public_key()))
    async with _served(registered, tmp_path) as (url, context):
        token = url + "/token"
        # Before: the device signs in with its own key.
        meter = _assertion(registered.meter, CoseAlg.ES256, "meter-7")
        response, _ = await _post(context, token, {"client_assertion": meter})
        assert response.code == aiocoap.CREATED

        # A rogue client, and meter-7's key replaced by the attacker's, both written straight
        # into the database. (A rogue row carrying a real row's MAC: tests/store.)
        await deployment.tamper(
            "INSERT INTO clients (client_id, audiences, scope, secret_digest, public_key,"
            " disabled, created_at) SELECT 'mallory', audiences, scope, NULL, $1, disabled,"
            " created_at FROM clients WHERE client_id = 'meter-7'",
            attacker_key,
        )
        await deployment.tamper(
            "UPDATE clients SET public_key = $1 WHERE client_id = 'meter-7'", attacker_key
        )

        unknown = _assertion(attacker, CoseAlg.EDDSA, "ghost")
        response, unknown_body = await _post(context, token, {"client_assertion": unknown})
        assert (response.code, unknown_body) == (UNAUTHORIZED, INVALID_CLIENT_BODY)
        for client_id in ("mallory", "meter-7"):
            forged = _assertion(attacker, CoseAlg.EDDSA, client_id)
            response, body = await _post(context, token, {"client_assertion": forged})
            # Refused exactly like an unknown client: no oracle.
            assert (response.code, body) == (UNAUTHORIZED, INVALID_CLIENT_BODY), client_id
        # The untouched client still gets its tokens.
        response, body = await _post(
            context, token, {CLIENT_ID: "sensor-1", CLIENT_SECRET: registered.secret}
        )
        assert response.code == aiocoap.CREATED, body

    log = (tmp_path / "serve.log").read_text()
    refusals = [line for line in log.splitlines() if "refused the registry row" in line]
    assert any("client 'mallory'" in line for line in refusals), log[-2000:]
    assert any("client 'meter-7'" in line for line in refusals), log[-2000:]
    assert registered.secret not in log

    result = deployment.cli("audit", "verify")
    assert result.returncode == 2, result.stdout
    # One line per problem (the refusals the store logged on the way come before them).
    problems = [line for line in result.stderr.splitlines() if line.startswith("coap-auth: error:")]
    # The rogue row also changes the registry the audit head records.
    assert len(problems) == 3, problems
    assert any(REGISTRY_MISMATCH in line for line in problems)
    assert any("client 'mallory': it has no MAC" in line for line in problems)
    assert any("client 'meter-7': its MAC does not match" in line for line in problems)
    # The listing shows only what is trusted.
    assert "mallory" not in deployment.cli_ok("clients", "list")


async def test_edited_audiences_behave_as_unknown_and_are_reported(
    registered: Registered, tmp_path: Path
) -> None:
    deployment, attacker = registered.deployment, registered.attacker
    sensor = {CLIENT_ID: "sensor-1", CLIENT_SECRET: registered.secret}
    async with _served(registered, tmp_path) as (url, context):
        response, body = await _post(context, url + "/token", {**sensor, AUDIENCE: "thermostat"})
        assert response.code == aiocoap.CREATED and body[EXPIRES_IN] == 600
        issued = body[ACCESS_TOKEN]

        # Ten-year tokens for thermostat; the attacker's key for dashboard's introspection.
        await deployment.tamper(
            "UPDATE audiences SET lifetime = 315360000 WHERE audience_id = 'thermostat'"
        )
        await deployment.tamper(
            "UPDATE audiences SET introspect_public_key = $1 WHERE audience_id = 'dashboard'",
            cbor2.dumps(cose_key_from_public(attacker.public_key())),
        )

        response, body = await _post(context, url + "/token", {**sensor, AUDIENCE: "thermostat"})
        assert (response.code, body[ERROR]) == (BAD_REQUEST, 6), body  # invalid_scope
        forged = _assertion(attacker, CoseAlg.EDDSA, "dashboard")
        response, body = await _post(
            context, url + "/introspect", {TOKEN: issued, "client_assertion": forged}
        )
        assert (response.code, body) == (UNAUTHORIZED, INVALID_CLIENT_BODY)

    result = deployment.cli("audit", "verify")
    assert result.returncode == 2, result.stdout
    # One line per problem (the refusals the store logged on the way come before them).
    problems = [line for line in result.stderr.splitlines() if line.startswith("coap-auth: error:")]
    assert len(problems) == 2, problems
    assert any("audience 'thermostat': its MAC does not match" in line for line in problems)
    assert any("audience 'dashboard': its MAC does not match" in line for line in problems)


async def test_a_row_put_back_to_an_older_copy_is_never_taken_up(
    registered: Registered, tmp_path: Path
) -> None:
    """Someone with the database alone writes back sensor-1's row as it was before `clients
    disable`, MAC and all (a valid MAC: the row is genuine, only old). The row MAC cannot tell;
    the audit head's registry digest can, and /token trusts no row while they differ."""
    deployment = registered.deployment
    sensor = {CLIENT_ID: "sensor-1", CLIENT_SECRET: registered.secret}
    enabled = await deployment.row("SELECT disabled, mac FROM clients WHERE client_id = 'sensor-1'")
    async with _served(registered, tmp_path) as (url, context):
        assert (await _post(context, url + "/token", sensor))[0].code == aiocoap.CREATED
        deployment.cli_ok("clients", "disable", "sensor-1")
        assert (await _post(context, url + "/token", sensor))[0].code == UNAUTHORIZED

        await deployment.tamper(
            "UPDATE clients SET disabled = $1, mac = $2 WHERE client_id = 'sensor-1'", *enabled
        )
        response, body = await _post(context, url + "/token", sensor)
        assert (response.code, body) == (UNAUTHORIZED, INVALID_CLIENT_BODY)
        # The operator's next change of the registry would record the rows as they stand,
        # sealing the put-back row into the head: it is refused, and changes nothing.
        refused = deployment.cli("clients", "disable", "meter-7")
        assert refused.returncode == 2 and "restore a backup" in refused.stderr, refused.stderr
        response, body = await _post(context, url + "/token", sensor)
        assert (response.code, body) == (UNAUTHORIZED, INVALID_CLIENT_BODY)
    # A server started afresh reads the rows anew: still refused, and said why.
    async with _served(registered, tmp_path) as (url, context):
        response, body = await _post(context, url + "/token", sensor)
        assert (response.code, body) == (UNAUTHORIZED, INVALID_CLIENT_BODY)
    log = (tmp_path / "serve.log").read_text()
    assert "not the ones the audit head records" in log, log[-2000:]
    assert deployment.cli("audit", "verify").returncode == 2, "the evidence is kept"


def test_audit_verify_on_an_untouched_store_reports_the_registry(registered: Registered) -> None:
    stdout = registered.deployment.cli_ok("audit", "verify")
    assert stdout.startswith("audit log intact: ")
    assert "registry intact: 2 clients, 2 audiences" in stdout


# -- downgrade and replay --------------------------------------------------------------------


async def _downgrade_with_a_rogue_client(deployment: Deployment, attacker_key: bytes) -> None:
    """What someone with the database alone does to have the next start seal a forged row: the
    schema put back to version 2 (no MACs, no audit head), and a rogue client added."""
    if deployment.store == "sqlite":
        await deployment.tamper("DROP TABLE audit_head")
        await deployment.tamper("ALTER TABLE clients DROP COLUMN mac")
        await deployment.tamper("ALTER TABLE audiences DROP COLUMN mac")
        await deployment.tamper("PRAGMA user_version = 2")
    else:
        await deployment.tamper("UPDATE schema_version SET version = 2")
        await deployment.tamper("DELETE FROM audit_head")
    await deployment.tamper(
        "INSERT INTO clients (client_id, audiences, scope, secret_digest, public_key,"
        " disabled, created_at) SELECT 'mallory', audiences, scope, NULL, $1, disabled,"
        " created_at FROM clients WHERE client_id = 'meter-7'",
        attacker_key,
    )


async def test_a_downgraded_database_is_refused_not_sealed(
    registered: Registered, tmp_path: Path
) -> None:
    deployment, attacker = registered.deployment, registered.attacker
    attacker_key = cbor2.dumps(cose_key_from_public(attacker.public_key()))
    await _downgrade_with_a_rogue_client(deployment, attacker_key)

    served = subprocess.run(
        serve_argv(deployment.data_dir, free_udp_port()),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(**deployment.env),
        cwd=deployment.data_dir.parent,
    )
    assert served.returncode == 2, served.stderr
    assert served.stderr.strip().splitlines()[-1] == f"coap-auth: error: {DOWNGRADE}"
    for command in (("clients", "list"), ("audit", "verify")):
        result = deployment.cli(*command)
        assert result.returncode == 2, (command, result.stdout)
        assert result.stderr.strip() == f"coap-auth: error: {DOWNGRADE}", command

    # Nothing was sealed: the rogue row has no MAC, the schema still claims version 2.
    if deployment.store == "sqlite":
        with contextlib.closing(sqlite3.connect(deployment.data_dir / "coap-auth.sqlite3")) as c:
            assert c.execute("PRAGMA user_version").fetchone()[0] == 2
    else:
        rows = await pg.fetch(
            deployment.schema, "SELECT mac FROM clients WHERE client_id = 'mallory'"
        )
        assert rows[0][0] is None
        assert await pg.fetch(deployment.schema, "SELECT * FROM audit_head") == []


async def _client_row(deployment: Deployment, client_id: str) -> tuple[Any, ...]:
    if deployment.store == "sqlite":
        with contextlib.closing(sqlite3.connect(deployment.data_dir / "coap-auth.sqlite3")) as c:
            row = c.execute(
                "SELECT disabled, mac FROM clients WHERE client_id = ?", (client_id,)
            ).fetchone()
        return tuple(row)
    rows = await pg.fetch(
        deployment.schema, "SELECT disabled, mac FROM clients WHERE client_id = $1", client_id
    )
    return tuple(rows[0])


@pytest.mark.parametrize("undo", ["disable-undone", "row-deleted"])
async def test_an_older_sealed_row_put_back_is_reported(registered: Registered, undo: str) -> None:
    """Every row still carries a MAC that verifies: only the audit head's registry digest shows
    that the registry is not the one coap-auth last wrote."""
    deployment = registered.deployment
    enabled, sealed = await _client_row(deployment, "sensor-1")
    deployment.cli_ok("clients", "disable", "sensor-1")
    assert deployment.cli_ok("audit", "verify").startswith("audit log intact: ")
    if undo == "disable-undone":
        await deployment.tamper(
            "UPDATE clients SET disabled = $1, mac = $2 WHERE client_id = 'sensor-1'",
            enabled,
            sealed,
        )
        assert "sensor-1" in deployment.cli_ok("clients", "list")  # the row verifies
    else:
        await deployment.tamper("DELETE FROM clients WHERE client_id = 'meter-7'")

    result = deployment.cli("audit", "verify")
    assert result.returncode == 2, result.stdout
    problems = [line for line in result.stderr.splitlines() if line.startswith("coap-auth: error:")]
    assert len(problems) == 1 and REGISTRY_MISMATCH in problems[0], problems


async def test_a_cell_that_is_not_utf8_refuses_its_row_alone(
    registered: Registered, tmp_path: Path
) -> None:
    """Attack (round 3, F3): a client's TEXT cell set to bytes that are not UTF-8 (SQLite
    takes them; PostgreSQL refuses them on input) made every /token answer 5.00 and `audit
    verify` crash. The row now fails its MAC like any edit: refused alone, and reported."""
    if registered.deployment.store != "sqlite":
        pytest.skip("PostgreSQL refuses text that is not UTF-8 on input")
    deployment = registered.deployment
    sensor = {CLIENT_ID: "sensor-1", CLIENT_SECRET: registered.secret}
    meter = {"client_assertion": _assertion(registered.meter, CoseAlg.ES256, "meter-7")}
    await deployment.tamper(
        "UPDATE clients SET scope = CAST(x'ff' AS TEXT) WHERE client_id = 'meter-7'"
    )
    async with _served(registered, tmp_path) as (url, context):
        assert (await _post(context, url + "/token", sensor))[0].code == aiocoap.CREATED
        response, body = await _post(context, url + "/token", meter)
        assert (response.code, body) == (UNAUTHORIZED, INVALID_CLIENT_BODY)
    result = deployment.cli("audit", "verify")
    assert result.returncode == 2, result.stderr
    assert "client 'meter-7': its MAC does not match" in result.stderr, result.stderr
