"""Client and audience lifecycle (issue 18): `clients disable --revoke|enable|remove|
rotate-secret|set-key`, `audiences set|remove`, `tokens revoke --hash PREFIX`.

Through the real `coap-auth` command against a running `coap-auth serve` (lab mode: plain CoAP
over real UDP), on SQLite and PostgreSQL; the secret overlap in-process with a SettableClock,
driving the service's Administration directly. Every action is in `audit tail --json` with the
actor the CLI names, and `audit verify` stays intact.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.errors import OperatorError
from coap_auth.service.admin_decisions import (
    checked_lifetime,
    client_scope,
    own_key_family,
    wire_text,
)
from coap_auth.store import IssuedAccess, RefreshFamily
from coap_auth.tokens import Claims
from coap_auth.tokens.cose import sign1
from coap_auth.wire import AceParam, CoseAlg
from tests import pg
from tests.conftest import Coap
from tests.processes import SECRET_LINE, run_cli, serve_process

REQUEST_TIMEOUT = 5
ISSUER = "coap-auth"  # the default issuer: `aud` of a client assertion
# docs/protocol.md numbers, written out
CF_ACE_CBOR = 19
ACCESS_TOKEN, EXPIRES_IN, TOKEN, ACTIVE = 1, 2, 11, 10
CLIENT_ID, CLIENT_SECRET, GRANT_TYPE, REFRESH_TOKEN = 24, 25, 33, 37
GRANT_REFRESH = 3


@dataclass
class Deployment:
    """A data directory and its store (SQLite in it, or a PostgreSQL schema)."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, data_dir=self.data_dir, env=self.env)

    def ok(self, *args: str | Path) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args: str | Path) -> str:
        """A command that must fail as bad input: exit 2, one line; its line."""
        result = self.cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("coap-auth: error: "), result.stderr
        return lines[0]


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


def _pem(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _secret(stdout: str, prefix: str = "") -> str:
    if prefix:
        (value,) = [
            line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith(prefix)
        ]
        return value
    (value,) = [m.group(1) for m in map(SECRET_LINE.match, stdout.splitlines()) if m]
    return value


def _assertion(key: Any, client_id: str) -> bytes:
    now = int(time.time())
    claims = Claims(
        iss=client_id, sub=client_id, aud=ISSUER, exp=now + 120, iat=now, cti=secrets.token_bytes(8)
    )
    signed = sign1(cbor2.dumps(claims.to_cwt_map()), key, CoseAlg.ES256, b"device-kid")
    return cbor2.dumps(cbor2.CBORTag(61, signed))


def _token_hash(access_token: bytes) -> bytes:
    # RFC 9770 §4, written out: 0x01 || SHA-256(base64url without padding).
    return b"\x01" + hashlib.sha256(base64.urlsafe_b64encode(access_token).rstrip(b"=")).digest()


class Wire:
    """Requests to one running server."""

    def __init__(self, context: aiocoap.Context, url: str) -> None:
        self.context, self.url = context, url

    async def post(self, path: str, body: dict[Any, Any]) -> tuple[aiocoap.Code, Any]:
        message = aiocoap.Message(
            code=aiocoap.POST,
            uri=self.url + path,
            payload=cbor2.dumps(body),
            content_format=CF_ACE_CBOR,
        )
        response = await asyncio.wait_for(self.context.request(message).response, REQUEST_TIMEOUT)
        return response.code, cbor2.loads(response.payload) if response.payload else None

    async def trl(self) -> list[bytes]:
        message = aiocoap.Message(code=aiocoap.GET, uri=self.url + "/revoke/trl")
        response = await asyncio.wait_for(self.context.request(message).response, REQUEST_TIMEOUT)
        assert response.code == aiocoap.CONTENT
        hashes = cbor2.loads(response.payload)[0]
        assert isinstance(hashes, list)
        return hashes


@contextlib.asynccontextmanager
async def _served(deployment: Deployment, tmp_path: Path) -> AsyncIterator[Wire]:
    context = await aiocoap.Context.create_client_context()
    try:
        async with serve_process(
            deployment.data_dir, tmp_path / "serve.log", **deployment.env
        ) as server:
            yield Wire(context, server.url)
    finally:
        await context.shutdown()


def _audit_since(deployment: Deployment, seq: int) -> list[dict[str, Any]]:
    return [e for e in deployment.json("audit", "tail", "-n", "200") if e["seq"] > seq]


def _last_seq(deployment: Deployment) -> int:
    return int(deployment.json("audit", "tail", "-n", "1")[0]["seq"])


async def test_client_and_audience_lifecycle_through_a_running_server(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    d.ok("init")
    rs_secret = _secret(
        d.ok("audiences", "add", "thermostat", "--profile", "bearer", "--introspect-secret"),
        "introspection secret: ",
    )
    secret = _secret(
        d.ok("clients", "add", "sensor-1", "--audience", "thermostat", "--scope", "r", "--secret")
    )
    start = _last_seq(d)
    async with _served(d, tmp_path) as wire:
        grant = {CLIENT_ID: "sensor-1", CLIENT_SECRET: secret}
        code, body = await wire.post("/token", grant)
        assert code == aiocoap.CREATED, body
        access, refresh = body[ACCESS_TOKEN], body[REFRESH_TOKEN]
        rs = {CLIENT_ID: "thermostat", CLIENT_SECRET: rs_secret, TOKEN: access}
        assert (await wire.post("/introspect", rs))[1][ACTIVE] is True

        # disable --revoke: the token is inactive and listed, the refresh and new grants fail.
        disabled = d.json("clients", "disable", "sensor-1", "--revoke")
        assert disabled["disabled"] is True and disabled["killed_families"] == 1
        assert (await wire.post("/introspect", rs))[1] == {ACTIVE: False}
        assert _token_hash(access) in await wire.trl()
        refreshed = {GRANT_TYPE: GRANT_REFRESH, REFRESH_TOKEN: refresh, **grant}
        assert (await wire.post("/token", refreshed))[0] == aiocoap.UNAUTHORIZED
        assert (await wire.post("/token", grant))[0] == aiocoap.UNAUTHORIZED
        assert "already disabled" in d.refused("clients", "disable", "sensor-1")

        # enable; a rotated secret (printed once) gets tokens, and so does the old one
        # within the overlap (default a day); --overlap 0 ends the old one at once.
        assert d.json("clients", "enable", "sensor-1")["disabled"] is False
        rotated = d.ok("clients", "rotate-secret", "sensor-1")
        new_secret = _secret(rotated)
        assert new_secret != secret and "the previous one works until" in rotated
        assert (await wire.post("/token", grant))[0] == aiocoap.CREATED
        new_grant = {CLIENT_ID: "sensor-1", CLIENT_SECRET: new_secret}
        assert (await wire.post("/token", new_grant))[0] == aiocoap.CREATED
        last = d.json("clients", "rotate-secret", "sensor-1", "--overlap", "0")
        assert last["previous_secret_until"] is None
        for old in (grant, new_grant):
            assert (await wire.post("/token", old))[0] == aiocoap.UNAUTHORIZED
        grant = {CLIENT_ID: "sensor-1", CLIENT_SECRET: last["secret"]}

        # audiences set: the next token lives as long as the new lifetime says.
        changed = d.json("audiences", "set", "thermostat", "--lifetime", "120")
        assert changed["lifetime"] == 120 and changed["introspection"] == "secret"
        code, body = await wire.post("/token", grant)
        assert code == aiocoap.CREATED and body[EXPIRES_IN] == 120
        assert "add a new audience" in d.refused("audiences", "set", "thermostat", "--own-keys")
        assert "1 client still names audience thermostat" in d.refused(
            "audiences", "remove", "thermostat"
        )

        # tokens revoke by the prefix the access log prints.
        unknown = "01" + "00" * 7
        assert "no access token" in d.refused("tokens", "revoke", "--hash", unknown)
        assert "lowercase hex" in d.refused("tokens", "revoke", "--hash", "01abc")
        prefix = _token_hash(body[ACCESS_TOKEN]).hex()[:16]
        revoked = d.json("tokens", "revoke", "--hash", prefix)
        assert revoked["token_hash"] == _token_hash(body[ACCESS_TOKEN]).hex()
        assert _token_hash(body[ACCESS_TOKEN]) in await wire.trl()

        # remove the client (its live family dies), then the audience.
        removed = d.json("clients", "remove", "sensor-1")
        assert removed["removed"] is True and removed["killed_families"] >= 1
        assert (await wire.post("/token", grant))[0] == aiocoap.UNAUTHORIZED
        assert _token_hash(access) in await wire.trl(), "its TRL entries stay"
        assert d.json("audiences", "remove", "thermostat")["removed"] is True
        assert d.json("audiences", "list") == []

    events = _audit_since(d, start)
    names = [e["event"] for e in events if e["actor"] == "operator"]
    for expected in (
        "client.disabled",
        "client.enabled",
        "client.secret_rotated",
        "audience.changed",
        "token.revoked",
        "client.removed",
        "audience.removed",
    ):
        assert expected in names, (expected, names)
    killed = [e for e in events if e["event"] == "family.killed"]
    assert killed and all(e["actor"] == "operator" for e in killed)
    text = json.dumps(events)
    assert secret not in text and new_secret not in text and rs_secret not in text
    verified = d.ok("audit", "verify")
    assert "registry intact: 0 clients, 0 audiences" in verified


def test_an_audience_s_own_key_family_ends_with_it(tmp_path: Path) -> None:
    """After `audiences remove`, the operator commands on its family refuse in one line (they
    raised a traceback: no policy, no active key)."""
    d = Deployment(tmp_path / "data")
    d.ok("init")
    d.ok("audiences", "add", "rs-es", "--profile", "bearer", "--own-keys")
    d.ok(
        "audiences", "add", "rs-mac", "--profile", "bearer", "--own-keys", "--key-alg", "HMAC256/64"
    )
    d.ok("audiences", "remove", "rs-es")
    d.ok("audiences", "remove", "rs-mac")
    assert "ended with its audience" in d.refused("keys", "rotate", "--family", "rs-es")
    assert "no published keys" in d.refused("keys", "export", "rs-mac")
    assert {k["state"] for k in d.json("keys", "list", "--family", "rs-es")} == {"removed"}


async def test_set_key_refuses_the_old_key_and_kills_families_bound_to_it(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    d.ok("init")
    # edhoc_oscore: a grant's token and family are bound to the client's registered key.
    d.ok("audiences", "add", "valve", "--profile", "edhoc_oscore")
    d.ok("audiences", "add", "thermostat", "--profile", "bearer")
    d.ok(
        "clients",
        "add",
        "meter-7",
        "--audience",
        "valve",
        "--audience",
        "thermostat",
        "--scope",
        "r",
        "--public-key",
        _pem(tmp_path / "old.pem", old),
    )
    async with _served(d, tmp_path) as wire:
        bound = {"client_assertion": _assertion(old, "meter-7"), 5: "valve"}
        code, body = await wire.post("/token", bound)
        assert code == aiocoap.CREATED, body
        bound_refresh = body[REFRESH_TOKEN]
        code, body = await wire.post(
            "/token", {"client_assertion": _assertion(old, "meter-7"), 5: "thermostat"}
        )
        assert code == aiocoap.CREATED, body
        bearer_refresh = body[REFRESH_TOKEN]

        out = d.ok("clients", "set-key", "meter-7", _pem(tmp_path / "new.pem", new))
        assert "1 refresh families killed" in out and "bound to the old key" in out
        assert "already has that key" in d.refused(
            "clients", "set-key", "meter-7", tmp_path / "new.pem"
        )
        assert "authenticates with a key" in d.refused("clients", "rotate-secret", "meter-7")

        assert (
            await wire.post("/token", {"client_assertion": _assertion(old, "meter-7"), 5: "valve"})
        )[0] == aiocoap.UNAUTHORIZED
        code, _ = await wire.post(
            "/token", {"client_assertion": _assertion(new, "meter-7"), 5: "thermostat"}
        )
        assert code == aiocoap.CREATED
        # The family bound to the old key is dead; the unbound one refreshes with the new key.
        refresh = {GRANT_TYPE: GRANT_REFRESH, "client_assertion": _assertion(new, "meter-7")}
        assert (await wire.post("/token", {**refresh, REFRESH_TOKEN: bound_refresh}))[
            0
        ] == aiocoap.BAD_REQUEST
        refresh = {GRANT_TYPE: GRANT_REFRESH, "client_assertion": _assertion(new, "meter-7")}
        assert (await wire.post("/token", {**refresh, REFRESH_TOKEN: bearer_refresh}))[
            0
        ] == aiocoap.CREATED

    replaced = [
        e for e in d.json("audit", "tail", "-n", "5") if e["event"] == "client.key_replaced"
    ]
    assert replaced and replaced[0]["actor"] == "operator"
    assert d.cli("audit", "verify").returncode == 0


# -- in process: the secret overlap on an injected clock ------------------------------------------


async def _token(coap: Coap, secret: str) -> aiocoap.Code:
    response, _ = await coap.post_ace(
        "/token",
        {
            AceParam.CLIENT_ID: "sensor-1",
            AceParam.CLIENT_SECRET: secret,
            AceParam.AUDIENCE: "thermostat",
        },
    )
    return response.code


async def test_the_previous_secret_works_for_the_overlap_only(sensor: Coap) -> None:
    admin, clock = sensor.service.admin, sensor.service.clock
    first = sensor.secrets["sensor-1"]

    second = (await admin.rotate_secret("sensor-1", "operator:test", overlap=60)).secret
    assert second is not None
    assert await _token(sensor, first) == aiocoap.CREATED
    assert await _token(sensor, second) == aiocoap.CREATED
    clock.advance(59)  # type: ignore[attr-defined]
    assert await _token(sensor, first) == aiocoap.CREATED
    clock.advance(1)  # type: ignore[attr-defined]
    assert await _token(sensor, first) == aiocoap.UNAUTHORIZED
    assert await _token(sensor, second) == aiocoap.CREATED

    # A later rotation ends any earlier overlap: only the secret just before stays.
    third = (await admin.rotate_secret("sensor-1", "operator:test", overlap=3600)).secret
    fourth = (await admin.rotate_secret("sensor-1", "operator:test")).secret
    assert third is not None and fourth is not None
    assert await _token(sensor, second) == aiocoap.UNAUTHORIZED
    assert await _token(sensor, third) == aiocoap.CREATED
    assert await _token(sensor, fourth) == aiocoap.CREATED
    client = await sensor.service.store.get_client("sensor-1")
    assert client is not None
    # The default overlap is the client_secret_overlap setting.
    overlap = sensor.service.settings.client_secret_overlap
    assert client.previous_secret_until == clock.now() + overlap
    before = await sensor.service.store.get_client("sensor-1")
    for out_of_range in (-1, 30 * 86_400 + 1, 10**12):
        # The setting's range: 10**12 s was stored and then failed to print the new secret.
        with pytest.raises(OperatorError, match="--overlap must be 0 to 2,592,000 s"):
            await admin.rotate_secret("sensor-1", "operator:test", overlap=out_of_range)
    assert await sensor.service.store.get_client("sensor-1") == before
    rotations = [
        e.event.actor
        for e in await sensor.service.store.audit_entries()
        if e.event.event == "client.secret_rotated"
    ]
    assert rotations == ["operator:test"] * 3  # the actor passed in, not a store's constant
    assert (await sensor.service.verify_audit()).ok


async def test_disable_revoke_also_finishes_a_plain_disable(sensor: Coap) -> None:
    """`clients disable ID` first, then `--revoke` (review of issue 18: it was refused as
    already disabled, the operator's natural second step). The second kills the family."""
    admin = sensor.service.admin
    secret = sensor.secrets["sensor-1"]
    assert await _token(sensor, secret) == aiocoap.CREATED
    assert (await admin.disable_client("sensor-1", "operator", revoke=False)).killed_families == 0
    with pytest.raises(OperatorError, match="already disabled"):
        await admin.disable_client("sensor-1", "operator", revoke=False)
    again = await admin.disable_client("sensor-1", "operator", revoke=True)
    assert again.killed_families == 1
    assert await sensor.service.store.list_families("sensor-1", sensor.service.clock.now()) == []


async def test_a_hash_prefix_naming_two_tokens_is_refused(sensor: Coap) -> None:
    service = sensor.service
    now = service.clock.now()
    shared = b"\x01" + b"\x42" * 8
    for tail in (b"\x00", b"\x01"):
        family = RefreshFamily(
            secrets.token_bytes(16), "sensor-1", "thermostat", "temp:read", now, now, now + 60
        )
        access = IssuedAccess(shared + tail + bytes(23), "sensor-1", now + 60, "thermostat")
        await service.store.start_family(family, secrets.token_bytes(32), access)
    with pytest.raises(OperatorError, match="more than one token"):
        await service.admin.revoke_token(shared.hex(), "operator:test")
    assert (await service.store.trl())[0] == []
    revoked = await service.admin.revoke_token((shared + b"\x01").hex(), "operator:test")
    assert revoked == shared + b"\x01" + bytes(23)
    assert (await service.store.trl())[0] == [revoked]
    listing = await service.admin.revocation_listing()
    assert [(h.token_hash, h.update) for h in listing.hashes] == [(revoked, listing.last)]


async def test_every_admin_use_case_records_the_actor_passed_in(sensor: Coap) -> None:
    """Issue 17: the CLI's remaining operator actions are use cases of the service; each
    change is audited under the actor it is given, not a constant of the store."""
    admin, store = sensor.service.admin, sensor.service.store
    before = len(await store.audit_entries())

    added = await admin.add_audience(
        "lamp", "operator:test", profile="bearer", token_format="cwt", own_keys=True
    )
    assert added.audience is not None and added.audience.key_family == "lamp"
    assert {k.family for k in admin.list_keys("lamp")} == {"lamp"}  # created with it
    client = await admin.add_client(
        "lamp-1", "operator:test", audiences=["lamp", "lamp"], scope="on off on"
    )
    assert client.secret is not None and client.client is not None
    assert (client.client.audiences, client.client.scope) == (("lamp",), ("on", "off"))
    assert "lamp-1" in {c.client_id for c in await admin.list_clients()}
    assert "lamp" in {a.audience_id for a in await admin.list_audiences()}

    device = await admin.provision_oscore(
        "lamp-1", "operator:test", lambda c: {"peer": c.client_id}
    )
    assert device == {"peer": "lamp-1"}
    await admin.withdraw_oscore("lamp-1", "operator:test", lambda _client_id: True)
    ring = await admin.rotate_keys("lamp", "operator:test", force=True)
    assert ring.family == "lamp"
    revoked = ring.active.kid
    assert (await admin.revoke_key(revoked, "operator:test")).active.kid != revoked
    assert await admin.revoke_client_tokens("lamp-1", "operator:test") == 0
    with pytest.raises(OperatorError, match="only symmetric families"):
        admin.export_keys("lamp")

    new = [(e.event.actor, e.event.event) for e in (await store.audit_entries())[before:]]
    # The family's first keys are the service's: a running server may create them first.
    assert [event for actor, event in new if actor == "service"] == ["key.created"] * 2
    assert {actor for actor, _ in new if actor != "service"} == {"operator:test"}
    assert {
        "audience.added",
        "client.added",
        "client.oscore_provisioned",
        "client.oscore_removed",
        "key.activated",
        "key.revoked",
    } <= {event for _, event in new}
    assert [e.event.event for e in await admin.audit_tail(2)] == [event for _, event in new[-2:]]
    assert (await sensor.service.verify_audit()).ok


async def test_admin_refuses_what_the_cli_refused(sensor: Coap) -> None:
    admin = sensor.service.admin
    entries = len(await sensor.service.store.audit_entries())
    with pytest.raises(OperatorError, match="already an audience id"):
        await admin.add_client("thermostat", "operator", audiences=["thermostat"], scope="x")
    with pytest.raises(OperatorError, match="already a client id"):
        await admin.add_audience("sensor-1", "operator", profile="bearer", token_format="cwt")
    with pytest.raises(OperatorError, match="at least one scope"):
        await admin.add_client("lamp-1", "operator", audiences=["thermostat"], scope="  ")
    with pytest.raises(OperatorError, match="unknown audience"):
        await admin.add_client("lamp-1", "operator", audiences=["nowhere"], scope="x")
    with pytest.raises(OperatorError, match="no enabled client"):
        await admin.provision_oscore("nobody", "operator", lambda c: {})
    with pytest.raises(OperatorError, match="no OSCORE context provisioned"):
        await admin.withdraw_oscore("sensor-1", "operator", lambda _client_id: False)
    with pytest.raises(OperatorError, match="no key family"):
        await admin.rotate_keys("nowhere", "operator")
    assert len(await sensor.service.store.audit_entries()) == entries  # nothing recorded


@pytest.mark.parametrize(
    ("profile", "token_format", "own_keys", "key_alg", "expected"),
    [
        ("bearer", "cwt", False, None, (False, None)),
        ("bearer", "cwt", True, "EdDSA", (True, "EdDSA")),
        ("coap_oscore", "cwt", False, None, (True, "AES-CCM-16-64-128")),
        ("bearer", "cwt", False, "EdDSA", "--key-alg needs --own-keys"),
        ("bearer", "jwt", True, "HMAC256/64", "MACed CWTs, not JWTs"),
        ("coap_oscore", "jwt", False, None, "encrypted CWTs, not JWTs"),
        ("coap_oscore", "cwt", True, "ES256", "coap_oscore audience's keys are AES"),
        ("bearer", "cwt", True, "AES-CCM-16-64-128", "for --profile coap_oscore"),
    ],
)
def test_own_key_family_decision(
    profile: str, token_format: str, own_keys: bool, key_alg: str | None, expected: Any
) -> None:
    if isinstance(expected, str):
        with pytest.raises(OperatorError, match=expected):
            own_key_family(profile, token_format, own_keys, key_alg)
    else:
        assert own_key_family(profile, token_format, own_keys, key_alg) == expected


def test_new_client_text_decisions() -> None:
    assert client_scope("temp:read  temp:write temp:read") == ("temp:read", "temp:write")
    for bad in ("", " \t", "temp:read bad\x00"):
        with pytest.raises(OperatorError):
            client_scope(bad)
    with pytest.raises(OperatorError, match="without control characters"):
        wire_text("sensor\n", "the client id")
    assert checked_lifetime(1) == 1
    with pytest.raises(OperatorError, match="--lifetime must be 1 to"):
        checked_lifetime(0)
