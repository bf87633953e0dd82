"""TokenVerifier on tokens the real service issued over UDP: accepts good CWTs and JWTs and
rejects expired, not-yet-valid, foreign-audience, foreign-issuer, revoked, unknown-key,
tampered and out-of-scope ones. Keys and the TRL are fetched from the running server."""

from __future__ import annotations

from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.keys import symmetric_cose_key
from coap_auth.store import Audience
from coap_auth.tokens import Claims, encode_cwt
from coap_auth.wire import AceParam
from device_client import (
    InsufficientScope,
    InvalidClaims,
    InvalidSignature,
    KeySet,
    MalformedToken,
    SecretCredentials,
    TokenClient,
    TokenRevoked,
    TokenVerifier,
)
from tests.conftest import Coap
from tests.device_client.conftest import ISSUER, fetch_key_set, fetch_trl, issue_token

LIFETIME = 600  # the thermostat audience (tests/conftest.py)
LEEWAY = 30


def _verifier(keys: KeySet, clock: SettableClock, **options: Any) -> TokenVerifier:
    return TokenVerifier(
        keys,
        **{"issuer": ISSUER, "audience": "thermostat", "clock": clock, "leeway": LEEWAY, **options},
    )


async def test_accepts_a_cwt_and_reports_its_claims(sensor: Coap, clock: SettableClock) -> None:
    token = await issue_token(sensor, clock)
    verified = await _verifier(await fetch_key_set(sensor), clock).verify(token, scope="temp:read")
    assert verified.format == "cwt"
    assert (verified.claims.sub, verified.claims.aud) == ("sensor-1", "thermostat")
    assert verified.scopes == {"temp:read", "temp:write"}
    assert verified.token_hash[0] == 1 and len(verified.token_hash) == 33
    assert verified.kid == sensor.service.key_ring.active.kid


async def test_accepts_a_jwt(sensor: Coap, clock: SettableClock) -> None:
    token = await issue_token(sensor, clock, audience="dashboard")
    assert token.startswith(b"ey")
    verifier = _verifier(await fetch_key_set(sensor), clock, audience="dashboard")
    verified = await verifier.verify(token, scope=["temp:read", "temp:write"])
    assert verified.format == "jwt" and verified.claims.aud == "dashboard"


@pytest.mark.parametrize("token_format", ["cwt", "jwt"])
async def test_expiry_with_leeway(sensor: Coap, clock: SettableClock, token_format: str) -> None:
    token = await issue_token(sensor, clock, token_format=token_format)
    verifier = _verifier(await fetch_key_set(sensor), clock)
    clock.advance(LIFETIME + LEEWAY - 1)  # expired, but within the leeway
    verifier.verify_offline(token)
    clock.advance(1)
    with pytest.raises(InvalidClaims, match="expired"):
        verifier.verify_offline(token)
    # No leeway: expired as soon as exp passes.
    strict = _verifier(await fetch_key_set(sensor), clock, leeway=0)
    clock.advance(-LEEWAY)
    with pytest.raises(InvalidClaims, match="expired"):
        strict.verify_offline(token)


async def test_not_before_with_leeway(sensor: Coap, clock: SettableClock) -> None:
    # A token the AS's own active key signs with an nbf 60 s ahead.
    key = sensor.service.key_ring.active
    now = clock.now()
    claims = Claims(
        iss=ISSUER,
        sub="sensor-1",
        aud="thermostat",
        exp=now + 600,
        iat=now,
        cti=b"nbf-test",
        nbf=now + 60,
    )
    token = encode_cwt(claims, key.private_key, key.alg, key.kid)
    verifier = _verifier(await fetch_key_set(sensor), clock)
    with pytest.raises(InvalidClaims, match="not yet valid"):
        verifier.verify_offline(token)
    clock.advance(60 - LEEWAY)
    verifier.verify_offline(token)


async def test_foreign_audience_and_issuer(sensor: Coap, clock: SettableClock) -> None:
    keys = await fetch_key_set(sensor)
    token = await issue_token(sensor, clock, audience="dashboard", token_format="cwt")
    with pytest.raises(InvalidClaims, match="another audience"):
        _verifier(keys, clock).verify_offline(token)
    token = await issue_token(sensor, clock)
    with pytest.raises(InvalidClaims, match="another issuer"):
        _verifier(keys, clock, issuer="coap://other-as").verify_offline(token)


async def test_revoked_token_is_rejected(sensor: Coap, clock: SettableClock) -> None:
    revoked = await issue_token(sensor, clock)
    kept = await issue_token(sensor, clock)
    response, body = await sensor.post_ace(
        "/revoke",
        {
            AceParam.TOKEN: revoked,
            AceParam.CLIENT_ID: "sensor-1",
            AceParam.CLIENT_SECRET: sensor.secrets["sensor-1"],
        },
    )
    assert response.code == aiocoap.CHANGED, body
    verifier = _verifier(await fetch_key_set(sensor), clock, revocations=await fetch_trl(sensor))

    with pytest.raises(TokenRevoked, match="revoked"):
        await verifier.verify(revoked)
    assert (await verifier.verify(kept)).claims.sub == "sensor-1"
    # Without the TRL the same token passes: the check is the TRL's, not a side effect.
    await _verifier(await fetch_key_set(sensor), clock).verify(revoked)


async def test_unknown_key_tampered_and_garbage(sensor: Coap, clock: SettableClock) -> None:
    keys = await fetch_key_set(sensor)
    await sensor.service.rotate_keys(force=True, actor="operator")
    await sensor.service.rotate_keys(
        force=True, actor="operator"
    )  # the active key is one `keys` never held
    await sensor.server.check_changes()
    token = await issue_token(sensor, clock)
    verifier = _verifier(keys, clock)
    with pytest.raises(InvalidSignature, match="unknown key id"):
        await verifier.verify(token)  # a fixed KeySet cannot fetch: rejected

    fresh = _verifier(await fetch_key_set(sensor), clock)
    await fresh.verify(token)
    tampered = bytearray(token)
    tampered[-1] ^= 1
    with pytest.raises(InvalidSignature):
        fresh.verify_offline(bytes(tampered))
    for garbage in (b"\x01\x02", b"ey.not.a.jwt", b"", cbor2.dumps({1: 2})):
        with pytest.raises(MalformedToken):
            fresh.verify_offline(garbage)


async def test_required_scope(sensor: Coap, clock: SettableClock) -> None:
    token = await issue_token(sensor, clock, scope="temp:read")
    verifier = _verifier(await fetch_key_set(sensor), clock)
    assert verifier.verify_offline(token, scope="temp:read").allows("temp:read")
    with pytest.raises(InsufficientScope):
        verifier.verify_offline(token, scope="temp:write")
    with pytest.raises(InsufficientScope):
        verifier.verify_offline(token, scope="temp:read temp:write")


async def test_symmetric_audience_with_exported_keys(sensor: Coap, clock: SettableClock) -> None:
    # An audience with its own HMAC family: tokens are 61(17(...)), keys never at /keys.
    await sensor.service.store.add_audience(
        Audience("lock", "cwt", 300, clock.now(), key_family="lock", key_alg="HMAC256/64"),
        "operator",
    )
    await sensor.service.load_keys()
    await sensor.add_secret_client("opener", ("lock",), "door:open")
    client = TokenClient(
        sensor.context,
        sensor.base,
        SecretCredentials("opener", sensor.secrets["opener"]),
        audience="lock",
        issuer=ISSUER,
        clock=clock,
    )
    token = (await client.token()).value
    assert cbor2.loads(token).value.tag == 17  # COSE_Mac0

    # What `coap-auth keys export --family lock` prints, decoded: a COSE_KeySet of kty 4.
    exported = cbor2.dumps(
        [symmetric_cose_key(k) for k in sensor.service.keys.ring("lock").published]
    )
    keys = KeySet.from_cose_key_set(exported)
    assert keys.keys == () and len(keys.shared) >= 1
    for secret in keys.shared.values():
        assert repr(secret) not in repr(keys) and secret.hex() not in repr(keys)
    verifier = TokenVerifier(
        KeySet(), issuer=ISSUER, audience="lock", clock=clock, shared_keys=keys.shared
    )
    verified = await verifier.verify(token, scope="door:open")
    assert verified.claims.sub == "opener" and verified.kid in keys.shared

    with pytest.raises(InvalidSignature, match="unknown key id"):
        await TokenVerifier(KeySet(), issuer=ISSUER, audience="lock", clock=clock).verify(token)
    tampered = bytearray(token)
    tampered[-1] ^= 1
    with pytest.raises(InvalidSignature):
        verifier.verify_offline(bytes(tampered))
