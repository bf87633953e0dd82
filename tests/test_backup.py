"""Backups that keep everything (issue 18): `coap-auth backup` while `serve` answers grants,
`coap-auth restore` into a fresh or a replaced data directory, and what each refuses; for
PostgreSQL, the pg_dump / pg_restore (or psql) round trip the README describes.

Every server here is the real `coap-auth serve` (lab mode: plain CoAP) and every grant a real
request over UDP. A copy of the database file alone is shown to lose what the backup keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.cli import data_lock
from coap_auth.clock import SystemClock
from coap_auth.config import Settings
from coap_auth.service import AuthService
from coap_auth.store import MasterKey, Store
from coap_auth.tokens import token_hash
from coap_auth.wire import AceParam, ContentFormat, GrantType
from tests import pg
from tests.processes import (
    CLI_TIMEOUT,
    COAP_AUTH,
    add_secret_client,
    clean_env,
    cli_ok,
    provision,
    run_cli,
    serve_process,
)
from tests.store.test_sqlite_shape import UNSPEND as UNSPENDING

REQUEST_TIMEOUT = 5
DB_FILE = "coap-auth.sqlite3"
CONCURRENT_GRANTS = 3  # request loops running while the backup copies
# Rate limits off: the load below is one client asking as fast as the server answers.
UNLIMITED = {"COAP_AUTH_RATE_LIMIT_PER_CLIENT": "0", "COAP_AUTH_RATE_LIMIT_PER_ADDRESS": "0"}


@dataclass
class Grant:
    access_token: bytes
    refresh_token: bytes


@dataclass
class GrantLoad:
    """Grants requested without pause by a few loops, each noted once answered."""

    context: aiocoap.Context
    url: str
    secret: str
    answered: list[Grant] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            self.answered.append(await grant(self.context, self.url, self.secret))


async def post_token(context: aiocoap.Context, url: str, body: dict[Any, Any]) -> tuple[Any, Any]:
    message = aiocoap.Message(
        code=aiocoap.POST,
        uri=url + "/token",
        payload=cbor2.dumps(body),
        content_format=ContentFormat.ACE_CBOR,
    )
    response = await asyncio.wait_for(context.request(message).response, REQUEST_TIMEOUT)
    return response, cbor2.loads(response.payload) if response.payload else None


async def grant(context: aiocoap.Context, url: str, secret: str) -> Grant:
    response, body = await post_token(
        context,
        url,
        {
            AceParam.CLIENT_ID: "sensor-1",
            AceParam.CLIENT_SECRET: secret,
            AceParam.AUDIENCE: "thermostat",
        },
    )
    assert response.code == aiocoap.CREATED, body
    return Grant(body[AceParam.ACCESS_TOKEN], body[AceParam.REFRESH_TOKEN])


async def refresh(context: aiocoap.Context, url: str, secret: str, refresh_token: bytes) -> Any:
    response, body = await post_token(
        context,
        url,
        {
            AceParam.CLIENT_ID: "sensor-1",
            AceParam.CLIENT_SECRET: secret,
            AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN,
            AceParam.REFRESH_TOKEN: refresh_token,
        },
    )
    assert response.code == aiocoap.CREATED, body
    return body


@contextlib.asynccontextmanager
async def client_context() -> AsyncIterator[aiocoap.Context]:
    context = await aiocoap.Context.create_client_context()
    try:
        yield context
    finally:
        await context.shutdown()


async def cli_async(*args: str | Path, data_dir: Path) -> tuple[int, str, str]:
    """A `coap-auth` command run without blocking the event loop (grants go on meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        COAP_AUTH,
        *map(str, args),
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=data_dir.parent,
    )
    out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def hashes_in(database: Path) -> set[bytes]:
    """The access-token hashes a database file holds, read by SQLite alone (a -wal beside it
    counts only if it is there)."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return {row[0] for row in conn.execute("SELECT token_hash FROM access_tokens")}


def client_ids_in(database: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return {row[0] for row in conn.execute("SELECT client_id FROM clients")}


def listing(data_dir: Path, *command: str) -> Any:
    return json.loads(cli_ok(*command, "--json", data_dir=data_dir))


def state(data_dir: Path) -> dict[str, Any]:
    """Every client, audience, key and live family, as the CLI lists them."""
    return {
        "clients": listing(data_dir, "clients", "list"),
        "audiences": listing(data_dir, "audiences", "list"),
        "keys": listing(data_dir, "keys", "list"),
        "families": listing(data_dir, "tokens", "families"),
    }


def one_error_line(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coap-auth: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def secret(data_dir: Path) -> str:
    """init, audience thermostat, client sensor-1: its secret."""
    return provision(data_dir)


# -- backup under load, restore, serve -----------------------------------------------------------


async def test_backup_under_concurrent_grants_restores_everything(
    tmp_path: Path, data_dir: Path, secret: str
) -> None:
    backup = tmp_path / "backups" / "coap-auth.backup"
    backup.parent.mkdir()
    async with (
        client_context() as context,
        serve_process(data_dir, tmp_path / "serve.log", **UNLIMITED) as server,
    ):
        load = GrantLoad(context, server.url, secret)
        loops = [asyncio.create_task(load.run()) for _ in range(CONCURRENT_GRANTS)]
        while len(load.answered) < 20:
            await asyncio.sleep(0.01)
        answered_before = list(load.answered)
        rc, out, err = await cli_async("backup", backup, data_dir=data_dir)
        load.stop.set()
        await asyncio.gather(*loops)
        answered_during = len(load.answered) - len(answered_before)
    assert rc == 0, err
    # The server kept answering grants while the copy was taken.
    assert answered_during > 0
    summary, master_key_note = out.strip().splitlines()
    assert summary.startswith(f"backup written to {backup}: 1 client, 1 audience, ")
    assert "the master key is not in the backup" in master_key_note
    assert backup.stat().st_mode & 0o777 == 0o600
    # Every grant answered before the backup began is in it: one file, no -wal beside it.
    assert not Path(f"{backup}-wal").exists()
    in_backup = hashes_in(backup)
    assert {token_hash(g.access_token) for g in answered_before} <= in_backup

    restored = tmp_path / "restored"
    out = cli_ok("restore", backup, "--master-key", data_dir / "master.key", data_dir=restored)
    assert f"restored {backup} into {restored}: 1 client, 1 audience" in out
    assert "provisioned OSCORE contexts are never restored" in out
    assert "audit log intact" in cli_ok("audit", "verify", data_dir=restored)
    assert (restored / "master.key").stat().st_mode & 0o777 == 0o600
    # Every client, audience and key; every family the backup holds (the source went on).
    source_state, restored_state = state(data_dir), state(restored)
    for name in ("clients", "audiences", "keys"):
        assert restored_state[name] == source_state[name], name
    restored_families = {f["family"] for f in restored_state["families"]}
    assert len(restored_families) == len(in_backup)
    assert restored_families <= {f["family"] for f in source_state["families"]}
    audit = listing(restored, "audit", "tail", "-n", "1")
    assert audit[0]["event"] == "store.restored"

    # The restored directory serves, and a refresh token from before the backup works there.
    async with (
        client_context() as context,
        serve_process(restored, tmp_path / "restored.log") as server,
    ):
        body = await refresh(context, server.url, secret, answered_before[0].refresh_token)
        assert body[AceParam.REFRESH_TOKEN] != answered_before[0].refresh_token


async def test_a_copy_of_the_database_file_loses_what_the_backup_keeps(
    tmp_path: Path, data_dir: Path, secret: str
) -> None:
    """The report: with `serve` running, recent grants (and a client added meanwhile) are in
    the -wal file only, so the database file copied alone misses them."""
    copied = tmp_path / "copied"
    copied.mkdir()
    async with (
        client_context() as context,
        serve_process(data_dir, tmp_path / "serve.log") as server,
    ):
        grants = [await grant(context, server.url, secret) for _ in range(5)]
        add_secret_client(data_dir, "sensor-2")
        shutil.copy(data_dir / DB_FILE, copied / DB_FILE)
        shutil.copy(data_dir / "master.key", copied / "master.key")
        cli_ok("backup", tmp_path / "backup", data_dir=data_dir)
    wanted = {token_hash(g.access_token) for g in grants}
    assert not wanted & hashes_in(copied / DB_FILE)
    assert "sensor-2" not in client_ids_in(copied / DB_FILE)
    assert wanted <= hashes_in(tmp_path / "backup")
    assert "sensor-2" in client_ids_in(tmp_path / "backup")


# -- what backup refuses ------------------------------------------------------------------------


def test_backup_refuses_the_data_directory_and_an_existing_file(
    tmp_path: Path, data_dir: Path, secret: str
) -> None:
    one_error_line(
        run_cli("backup", data_dir / "copy", data_dir=data_dir), "inside the data directory"
    )
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep me")
    one_error_line(run_cli("backup", existing, data_dir=data_dir), "exists", "--force")
    assert existing.read_bytes() == b"keep me"
    cli_ok("backup", existing, "--force", data_dir=data_dir)
    assert "sensor-1" in client_ids_in(existing)
    # Nothing else was left beside it (the temporary file is renamed or removed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "existing"]
    one_error_line(run_cli("backup", tmp_path / "x", data_dir=tmp_path / "none"), "not initialised")
    # A database edited outside coap-auth: the copy does not verify and is not kept.
    with contextlib.closing(sqlite3.connect(data_dir / DB_FILE)) as conn, conn:
        conn.execute("UPDATE clients SET scope = 'temp:read temp:write'")
    one_error_line(run_cli("backup", tmp_path / "bad", data_dir=data_dir), "does not verify")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "existing"]


# -- what restore refuses -----------------------------------------------------------------------


@pytest.fixture
def backup(tmp_path: Path, data_dir: Path, secret: str) -> Path:
    path = tmp_path / "coap-auth.backup"
    cli_ok("backup", path, data_dir=data_dir)
    return path


async def test_restore_is_refused_while_serve_runs(
    tmp_path: Path, data_dir: Path, backup: Path
) -> None:
    async with serve_process(data_dir, tmp_path / "serve.log"):
        result = run_cli("restore", backup, "--replace", data_dir=data_dir)
        one_error_line(result, "in use by a running coap-auth serve")
    assert not [p for p in data_dir.iterdir() if "replaced" in p.name or "restoring" in p.name]


def test_restore_refuses_a_wrong_master_key(tmp_path: Path, backup: Path) -> None:
    other = tmp_path / "other"
    cli_ok("init", data_dir=other)
    fresh = tmp_path / "fresh"
    result = run_cli("restore", backup, "--master-key", other / "master.key", data_dir=fresh)
    one_error_line(result, "wrong master key")
    assert not fresh.exists()
    # Into a directory that has another key of its own.
    result = run_cli("restore", backup, "--replace", data_dir=other)
    one_error_line(result, "wrong master key")
    assert not [p.name for p in other.iterdir() if "replaced" in p.name]
    one_error_line(run_cli("restore", backup, data_dir=fresh), "no master key", "--master-key")


def test_restore_refuses_what_is_not_a_good_backup(
    tmp_path: Path, data_dir: Path, backup: Path
) -> None:
    fresh, key = tmp_path / "fresh", data_dir / "master.key"
    garbage = tmp_path / "garbage"
    garbage.write_bytes(secrets.token_bytes(8192))
    one_error_line(
        run_cli("restore", garbage, "--master-key", key, data_dir=fresh), "not a SQLite database"
    )
    other = tmp_path / "other.sqlite3"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    one_error_line(
        run_cli("restore", other, "--master-key", key, data_dir=fresh), "not a coap-auth one"
    )
    # A client row edited in the backup, by someone without the master key.
    tampered = tmp_path / "tampered"
    shutil.copy(backup, tampered)
    with contextlib.closing(sqlite3.connect(tampered)) as conn, conn:
        conn.execute("UPDATE clients SET scope = 'temp:read temp:write'")
    one_error_line(
        run_cli("restore", tampered, "--master-key", key, data_dir=fresh), "does not verify"
    )
    # A backup whose audit log lost its newest entry.
    cut = tmp_path / "cut"
    shutil.copy(backup, cut)
    with contextlib.closing(sqlite3.connect(cut)) as conn, conn:
        conn.execute("DELETE FROM audit_log WHERE seq = (SELECT max(seq) FROM audit_log)")
    one_error_line(run_cli("restore", cut, "--master-key", key, data_dir=fresh), "removed")
    assert not fresh.exists()
    one_error_line(run_cli("restore", backup, data_dir=data_dir), "--replace")


UNSPEND = "CREATE TRIGGER zz_unspend" + UNSPENDING  # un-spends every refresh token


def test_a_backup_carrying_a_trigger_is_refused_and_so_is_a_database_with_one(
    tmp_path: Path, data_dir: Path, backup: Path
) -> None:
    """The attack (round 1 of issue 18): a trigger added to a backup file, by someone without
    the master key, un-spent every refresh token, so that reuse was never detected; restore
    kept it and audit verify said intact. No MAC covers the schema: its shape is checked."""
    fresh, key = tmp_path / "fresh", data_dir / "master.key"
    for extra in (UNSPEND, "CREATE VIEW everything AS SELECT * FROM clients"):
        tampered = tmp_path / "tampered"
        shutil.copy(backup, tampered)
        with contextlib.closing(sqlite3.connect(tampered)) as conn, conn:
            conn.execute(extra)
        result = run_cli("restore", tampered, "--master-key", key, data_dir=fresh)
        one_error_line(result, "holds what coap-auth did not make")
        assert not fresh.exists()
    # The same trigger written into the live database: nothing opens it any more.
    with contextlib.closing(sqlite3.connect(data_dir / DB_FILE)) as conn, conn:
        conn.execute(UNSPEND)
    one_error_line(run_cli("clients", "list", data_dir=data_dir), "trigger zz_unspend")


def test_nothing_opens_the_store_while_a_restore_holds_it(tmp_path: Path, data_dir: Path) -> None:
    """Round 1: a `clients disable --revoke` run during a restore said it was done and was
    lost with the replaced database; a `serve` started during a restore into a new directory
    wrote a master key of its own there. Both now wait for the lock, in one line."""
    cli_ok("init", data_dir=data_dir)
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    with data_lock.exclusive(data_dir):
        for command in (("clients", "disable", "sensor-1"), ("serve", "--port", "0")):
            one_error_line(run_cli(*command, data_dir=data_dir), "being restored")
        backup = tmp_path / "b"
        one_error_line(run_cli("backup", backup, data_dir=data_dir), "being restored")
    with data_lock.exclusive(fresh):
        one_error_line(run_cli("serve", "--port", "0", data_dir=fresh), "being restored")
    assert not (fresh / "master.key").exists()


def test_backup_refuses_a_shared_directory_and_never_follows_a_symlink(
    tmp_path: Path, data_dir: Path, secret: str
) -> None:
    """Round 1: the copy was first written to a temporary name beside the target, which
    another user could swap for a symlink to a file of theirs in a shared directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # without the sticky bit: anyone may rename what is in it
    one_error_line(run_cli("backup", shared / "b", data_dir=data_dir), "writable by every user")
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"")
    own = tmp_path / "own"
    own.mkdir()
    (own / "b").symlink_to(theirs)
    cli_ok("backup", own / "b", "--force", data_dir=data_dir)
    assert theirs.read_bytes() == b"" and not (own / "b").is_symlink()
    assert [p.name for p in own.iterdir()] == ["b"]  # no temporary file or directory left


async def test_replace_keeps_the_old_database_aside(
    tmp_path: Path, data_dir: Path, secret: str, backup: Path
) -> None:
    before = state(data_dir)
    add_secret_client(data_dir, "sensor-2")
    out = cli_ok("restore", backup, "--replace", data_dir=data_dir)
    kept = [p for p in data_dir.iterdir() if p.name.startswith(f"{DB_FILE}.replaced-")]
    assert len(kept) == 1 and f"kept as {kept[0]}" in out
    assert kept[0].stat().st_mode & 0o777 == 0o600
    assert "sensor-2" in client_ids_in(kept[0])
    assert state(data_dir) == before
    assert "audit log intact" in cli_ok("audit", "verify", data_dir=data_dir)
    assert not [p for p in data_dir.iterdir() if "restoring" in p.name]
    async with (
        client_context() as context,
        serve_process(data_dir, tmp_path / "serve.log") as server,
    ):
        await grant(context, server.url, secret)


def test_a_backup_of_an_older_schema_is_restored_past_the_marker(
    tmp_path: Path, data_dir: Path, backup: Path
) -> None:
    """The data directory's sealed-schema marker refuses a database file that claims an older
    schema. A restore checks the backup under the master key first, then migrates it: the
    marker stays, and the restored store starts."""
    older = tmp_path / "older"
    shutil.copy(backup, older)
    with contextlib.closing(sqlite3.connect(older)) as conn:
        # Schema 7 as schema 6 left it: without the columns its migration adds.
        conn.execute("ALTER TABLE clients DROP COLUMN previous_secret_digest")
        conn.execute("ALTER TABLE clients DROP COLUMN previous_secret_until")
        conn.execute("PRAGMA user_version = 6")
    marker = data_dir / "sealed-schema.sqlite"
    assert marker.read_text().strip() == "7"
    cli_ok("restore", older, "--replace", data_dir=data_dir)
    assert marker.read_text().strip() == "7"
    events = [e["event"] for e in listing(data_dir, "audit", "tail", "-n", "2")]
    assert events == ["store.migrated", "store.restored"]
    assert "audit log intact" in cli_ok("audit", "verify", data_dir=data_dir)
    assert listing(data_dir, "clients", "list")[0]["client_id"] == "sensor-1"


# -- PostgreSQL: pg_dump, and back -------------------------------------------------------------


def test_backup_on_postgresql_points_at_pg_dump(tmp_path: Path) -> None:
    result = run_cli(
        "backup", tmp_path / "x", "--store", "postgresql://nowhere/x", data_dir=tmp_path
    )
    one_error_line(result, "pg_dump --schema=SCHEMA")


async def _contents(dsn: str, schema: str, key: bytes) -> tuple[Any, dict[str, Any]]:
    """Open a PostgresStore on `schema` with the master key: its audit report and contents."""
    from coap_auth.store.postgres import PostgresStore

    master_key = MasterKey(key)
    store: Store = PostgresStore(dsn, master_key, schema=schema)
    await store.open()
    try:
        service = AuthService(store, master_key, Settings(), SystemClock())
        report = await service.verify_audit()
        now = int(time.time())
        found = {
            "clients": await store.list_clients(),
            "audiences": await store.list_audiences(),
            "keys": sorted(
                (k.kid, k.state, k.private_key is None) for k in await store.load_keys()
            ),
            "families": await store.list_families(None, now),
        }
        return report, found
    finally:
        await store.close()


@pg.needs_postgres
@pytest.mark.parametrize("form", ["custom", "plain"])
async def test_pg_dump_and_restore_keep_everything(
    tmp_path: Path, data_dir: Path, form: str
) -> None:
    """What the README says: pg_dump --schema, restore into a new database with pg_restore
    (custom format) or psql (plain SQL), and the same master key reads it all."""
    import asyncpg

    assert pg.PG_DSN is not None
    schema = await pg.create_schema()
    database = f"restored_{secrets.token_hex(5)}"
    env = {"COAP_AUTH_STORE": pg.PG_DSN, "COAP_AUTH_STORE_SCHEMA": schema}
    admin = await asyncpg.connect(pg.PG_DSN)
    try:
        secret = _provision_postgres(data_dir, env)
        async with (
            client_context() as context,
            serve_process(data_dir, tmp_path / "serve.log", **env) as server,
        ):
            grants = [await grant(context, server.url, secret) for _ in range(3)]
        dump = tmp_path / "coap-auth.dump"
        subprocess.run(
            ["pg_dump", f"--schema={schema}", f"--format={form}", f"--file={dump}", pg.PG_DSN],
            check=True,
            timeout=60,
        )
        await admin.execute(f"CREATE DATABASE {database}")
        restored_dsn = pg.PG_DSN.rsplit("/", 1)[0] + "/" + database
        restore = (
            ["pg_restore", "--exit-on-error", f"--dbname={restored_dsn}", str(dump)]
            if form == "custom"
            else ["psql", "--set=ON_ERROR_STOP=1", "--quiet", f"--dbname={restored_dsn}"]
            + [f"--file={dump}"]
        )
        subprocess.run(restore, check=True, timeout=60, capture_output=True)

        key = (data_dir / "master.key").read_bytes()
        report, restored = await _contents(restored_dsn, schema, key)
        assert report.ok, report.problems()
        _, original = await _contents(pg.PG_DSN, schema, key)
        assert restored == original
        assert len(restored["families"]) == len(grants)
        hashes = await pg.fetch(schema, "SELECT token_hash FROM access_tokens")
        assert {token_hash(g.access_token) for g in grants} <= {r[0] for r in hashes}
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {database}")
        await admin.close()
        await pg.drop_schema(schema)


def _provision_postgres(data_dir: Path, env: dict[str, str]) -> str:
    def cli(*args: str) -> str:
        result = subprocess.run(
            [COAP_AUTH, *args, "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            env=clean_env(**env),
            cwd=data_dir.parent,
        )
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    cli("init")
    cli("audiences", "add", "thermostat", "--profile", "bearer")
    out = cli("clients", "add", "sensor-1", "--audience", "thermostat", "--scope", "t", "--secret")
    return next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("secret: "))


def test_restore_on_postgresql_points_at_pg_restore(tmp_path: Path) -> None:
    result = run_cli(
        "restore", tmp_path / "x", "--store", "postgresql://nowhere/x", data_dir=tmp_path
    )
    one_error_line(result, "pg_restore")
