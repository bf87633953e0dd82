"""Refresh tokens over real UDP: rotation, reuse detection, grace window, scope rules, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from typing import Any

import aiocoap
import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.store.records import RegistryChange
from coap_auth.tokens import cose_key_from_public, token_hash, verify_cwt
from coap_auth.wire import AceParam, CoapCode, GrantType
from tests.conftest import Coap

TOKEN = "/token"


def _cred(coap: Coap) -> dict[int, Any]:
    return {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: coap.secrets["sensor-1"]}


async def _grant(coap: Coap, extra: dict[Any, Any] | None = None) -> dict[int, Any]:
    response, body = await coap.post_ace(
        TOKEN, {**_cred(coap), AceParam.AUDIENCE: "thermostat", **(extra or {})}
    )
    assert response.code == aiocoap.CREATED, body
    assert len(body[AceParam.REFRESH_TOKEN]) == 32
    return body


async def _refresh(
    coap: Coap, refresh_token: bytes, extra: dict[Any, Any] | None = None
) -> tuple[Any, dict]:
    return await coap.post_ace(
        TOKEN,
        {
            **_cred(coap),
            AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN,
            AceParam.REFRESH_TOKEN: refresh_token,
            **(extra or {}),
        },
    )


async def _trl(coap: Coap) -> list[bytes]:
    """The full TRL, read over UDP (RFC 9770 full query)."""
    response = await coap.request(aiocoap.GET, "/revoke/trl")
    assert response.code == aiocoap.CONTENT
    return cbor2.loads(response.payload)[0]


def _is_invalid_grant(response: aiocoap.Message, body: dict) -> bool:
    return response.code == CoapCode.BAD_REQUEST and body[AceParam.ERROR] == 3


async def test_rotation_chain_of_50(sensor: Coap) -> None:
    body = await _grant(sensor)
    seen = {body[AceParam.REFRESH_TOKEN]}
    refresh_token = body[AceParam.REFRESH_TOKEN]
    for _ in range(50):
        sensor.service.clock.advance(60)
        response, body = await _refresh(sensor, refresh_token)
        assert response.code == aiocoap.CREATED, body
        claims = verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup)
        assert claims.sub == "sensor-1" and claims.aud == "thermostat"
        assert claims.iat == sensor.service.clock.now()
        refresh_token = body[AceParam.REFRESH_TOKEN]
        assert refresh_token not in seen
        seen.add(refresh_token)
    families = await sensor.service.store.list_families("sensor-1", sensor.service.clock.now())
    assert len(families) == 1


async def test_reuse_after_grace_kills_family_and_revokes_its_tokens(sensor: Coap) -> None:
    first = await _grant(sensor)
    hashes = [token_hash(first[AceParam.ACCESS_TOKEN])]
    response, second = await _refresh(sensor, first[AceParam.REFRESH_TOKEN])
    hashes.append(token_hash(second[AceParam.ACCESS_TOKEN]))
    other_family = await _grant(sensor)

    sensor.service.clock.advance(31)  # outside the 30 s grace window
    response, body = await _refresh(sensor, first[AceParam.REFRESH_TOKEN])
    assert _is_invalid_grant(response, body)
    assert "reused" in body[AceParam.ERROR_DESCRIPTION]

    revoked = await _trl(sensor)
    assert set(hashes) <= set(revoked)
    assert token_hash(other_family[AceParam.ACCESS_TOKEN]) not in revoked
    # The thief's successor is dead too, and so is the legitimate one.
    response, body = await _refresh(sensor, second[AceParam.REFRESH_TOKEN])
    assert _is_invalid_grant(response, body)
    # Other families of the same client are untouched.
    response, _ = await _refresh(sensor, other_family[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED


async def test_reuse_inside_grace_gets_a_successor_and_spends_the_previous(sensor: Coap) -> None:
    first = await _grant(sensor)
    response, lost = await _refresh(sensor, first[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED  # pretend this response never arrived
    sensor.service.clock.advance(10)
    response, retry = await _refresh(sensor, first[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED
    assert retry[AceParam.REFRESH_TOKEN] != lost[AceParam.REFRESH_TOKEN]
    # The device carries on with the successor it did receive.
    response, body = await _refresh(sensor, retry[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED
    # The successor of the lost response was spent: using it now is theft.
    sensor.service.clock.advance(31)
    response, body = await _refresh(sensor, lost[AceParam.REFRESH_TOKEN])
    assert _is_invalid_grant(response, body)


async def test_grace_does_not_apply_once_the_successor_was_used(sensor: Coap) -> None:
    first = await _grant(sensor)
    _, second = await _refresh(sensor, first[AceParam.REFRESH_TOKEN])
    response, _ = await _refresh(sensor, second[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED
    response, body = await _refresh(sensor, first[AceParam.REFRESH_TOKEN])
    assert _is_invalid_grant(response, body)
    assert await sensor.service.store.list_families("sensor-1", sensor.service.clock.now()) == []


async def test_concurrent_refreshes_have_one_winner(sensor: Coap) -> None:
    sensor.service.settings = dataclasses.replace(sensor.service.settings, refresh_grace=0)
    for _ in range(20):
        body = await _grant(sensor)
        results = await asyncio.gather(
            *[_refresh(sensor, body[AceParam.REFRESH_TOKEN]) for _ in range(20)]
        )
        winners = [r for r, _ in results if r.code == aiocoap.CREATED]
        assert len(winners) == 1
        assert all(_is_invalid_grant(r, b) for r, b in results if r.code != aiocoap.CREATED)


async def test_concurrent_refreshes_inside_grace_leave_one_live_successor(sensor: Coap) -> None:
    body = await _grant(sensor)
    results = await asyncio.gather(
        *[_refresh(sensor, body[AceParam.REFRESH_TOKEN]) for _ in range(20)]
    )
    successors = [b[AceParam.REFRESH_TOKEN] for r, b in results if r.code == aiocoap.CREATED]
    # Inside the grace window every racer is answered, but each answer spends the one before.
    assert len(set(successors)) == 20
    database = sensor.service.settings.data_dir / "coap-auth.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as conn:
        (unspent,) = conn.execute(
            "SELECT count(*) FROM refresh_tokens WHERE spent_at IS NULL"
        ).fetchone()
    assert unspent == 1


async def test_scope_may_narrow_but_not_widen(sensor: Coap) -> None:
    body = await _grant(sensor, {AceParam.SCOPE: "temp:read"})
    response, narrowed = await _refresh(sensor, body[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED
    response, body = await _refresh(
        sensor, narrowed[AceParam.REFRESH_TOKEN], {AceParam.SCOPE: "temp:read temp:write"}
    )
    assert _is_invalid_grant(response, body)
    # The rejected request changed nothing: the same token still refreshes.
    full = await _grant(sensor)
    response, body = await _refresh(
        sensor, full[AceParam.REFRESH_TOKEN], {AceParam.SCOPE: "temp:write"}
    )
    assert response.code == aiocoap.CREATED
    assert body[AceParam.SCOPE] == "temp:write"
    assert (
        verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup).scope
        == "temp:write"
    )
    response, body = await _refresh(sensor, narrowed[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED


async def test_audience_and_key_cannot_change(sensor: Coap) -> None:
    holder = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    other = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    body = await _grant(sensor, {AceParam.REQ_CNF: {1: holder}})
    token = body[AceParam.REFRESH_TOKEN]
    response, err = await _refresh(sensor, token, {AceParam.AUDIENCE: "dashboard"})
    assert _is_invalid_grant(response, err)
    response, err = await _refresh(sensor, token, {AceParam.REQ_CNF: {1: other}})
    assert _is_invalid_grant(response, err)
    response, body = await _refresh(sensor, token)
    assert response.code == aiocoap.CREATED
    assert body[AceParam.TOKEN_TYPE] == 2
    claims = verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup)
    assert claims.cnf_key == holder


async def test_refresh_needs_the_same_client(sensor: Coap) -> None:
    await sensor.add_secret_client("sensor-2", ("thermostat",), "temp:read")
    body = await _grant(sensor)
    response, err = await sensor.post_ace(
        TOKEN,
        {
            AceParam.CLIENT_ID: "sensor-2",
            AceParam.CLIENT_SECRET: sensor.secrets["sensor-2"],
            AceParam.GRANT_TYPE: 3,
            AceParam.REFRESH_TOKEN: body[AceParam.REFRESH_TOKEN],
        },
    )
    assert _is_invalid_grant(response, err)
    response, err = await sensor.post_ace(
        TOKEN, {AceParam.GRANT_TYPE: 3, AceParam.REFRESH_TOKEN: body[AceParam.REFRESH_TOKEN]}
    )
    assert response.code == CoapCode.UNAUTHORIZED
    response, _ = await _refresh(sensor, body[AceParam.REFRESH_TOKEN])
    assert response.code == aiocoap.CREATED


async def test_idle_timeout_and_absolute_lifetime(sensor: Coap) -> None:
    settings = sensor.service.settings
    body = await _grant(sensor)
    sensor.service.clock.advance(settings.refresh_idle_timeout)
    response, err = await _refresh(sensor, body[AceParam.REFRESH_TOKEN])
    assert _is_invalid_grant(response, err)

    body = await _grant(sensor)
    token = body[AceParam.REFRESH_TOKEN]
    step = settings.refresh_idle_timeout // 2
    elapsed = 0
    while elapsed + step < settings.refresh_max_lifetime:
        sensor.service.clock.advance(step)
        elapsed += step
        response, body = await _refresh(sensor, token)
        assert response.code == aiocoap.CREATED, elapsed
        token = body[AceParam.REFRESH_TOKEN]
    sensor.service.clock.advance(settings.refresh_max_lifetime - elapsed)
    response, err = await _refresh(sensor, token)
    assert _is_invalid_grant(response, err)


async def test_malformed_refresh_requests(sensor: Coap) -> None:
    for extra in ({}, {AceParam.REFRESH_TOKEN: "text"}, {AceParam.REFRESH_TOKEN: b""}):
        response, body = await sensor.post_ace(
            TOKEN, {**_cred(sensor), AceParam.GRANT_TYPE: 3, **extra}
        )
        assert response.code == CoapCode.BAD_REQUEST and body[AceParam.ERROR] == 1
    response, body = await _refresh(sensor, b"\x00" * 32)
    assert _is_invalid_grant(response, body)


async def test_expiry_ends_the_family_without_revoking_its_access_tokens(sensor: Coap) -> None:
    body = await _grant(sensor)
    sensor.service.clock.advance(sensor.service.settings.refresh_idle_timeout)
    response, err = await _refresh(sensor, body[AceParam.REFRESH_TOKEN])
    assert _is_invalid_grant(response, err)
    # Make the (long-lived) access token still valid at this time to check it is not revoked.
    assert await _trl(sensor) == []


async def test_refresh_follows_an_operator_narrowing_the_client(sensor: Coap) -> None:
    body = await _grant(sensor)
    # What an operator tool does through the store (the row sealed again, the audit head
    # moved with it, in one transaction).
    narrowed = await sensor.service.store.update_client(
        "sensor-1",
        lambda client: RegistryChange(
            dataclasses.replace(client, scope=("temp:write",)), "client.scope_narrowed"
        ),
        "operator",
        sensor.service.clock.now(),
    )
    assert narrowed is not None
    response, err = await _refresh(sensor, body[AceParam.REFRESH_TOKEN])
    assert _is_invalid_grant(response, err)
    response, body = await _refresh(
        sensor, body[AceParam.REFRESH_TOKEN], {AceParam.SCOPE: "temp:write"}
    )
    assert response.code == aiocoap.CREATED
    assert (
        verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup).scope
        == "temp:write"
    )
