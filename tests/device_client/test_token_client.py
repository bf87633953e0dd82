"""TokenClient against the real service over UDP: grant, cache, refresh, back off, fall back."""

from __future__ import annotations

import logging
import random
import socket

import aiocoap
import pytest

from coap_auth.clock import SettableClock
from coap_auth.tokens import token_hash, verify_cwt
from coap_auth.wire import AceErrorCode, TokenType
from device_client import (
    DeviceKey,
    RefreshPolicy,
    SecretCredentials,
    ServiceUnreachable,
    TokenClient,
    TokenRequestRefused,
)
from tests.conftest import Coap
from tests.device_client.conftest import FAST_REFRESH, ISSUER
from tests.device_client.lossy_proxy import LossyProxy


def _client(
    coap: Coap,
    context: aiocoap.Context,
    credentials: SecretCredentials | DeviceKey,
    clock: SettableClock,
    *,
    as_uri: str | None = None,
    policy: RefreshPolicy = FAST_REFRESH,
    **options: object,
) -> TokenClient:
    return TokenClient(
        context,
        as_uri or coap.base,
        credentials,
        audience="thermostat",
        issuer=ISSUER,
        clock=clock,
        policy=policy,
        rng=random.Random(7),
        **options,  # type: ignore[arg-type]
    )


async def _families(coap: Coap, client_id: str) -> int:
    return len(await coap.service.store.list_families(client_id, coap.service.clock.now()))


async def test_grant_then_cache_then_refresh_ahead_of_expiry(
    sensor: Coap, device_context: aiocoap.Context, secret_credentials, clock: SettableClock
) -> None:
    events: list[tuple[str, bytes]] = []
    client = _client(
        sensor,
        device_context,
        secret_credentials,
        clock,
        on_token=lambda kind, token: events.append((kind, token.value)),
    )
    first = await client.token()

    claims = verify_cwt(first.value, sensor.service.key_ring.lookup)
    assert (claims.sub, claims.aud, claims.iss) == ("sensor-1", "thermostat", ISSUER)
    assert first.token_type == TokenType.BEARER
    assert first.expires_at == clock.now() + 600  # the thermostat audience's lifetime
    # 0.75 of the lifetime less up to 10 % of that: between 405 s and 450 s.
    assert 405 <= first.refresh_at - clock.now() <= 450
    assert await _families(sensor, "sensor-1") == 1

    clock.advance(first.refresh_at - clock.now() - 1)
    assert (await client.token()).value == first.value  # cached: no request

    clock.advance(1)
    second = await client.token()
    assert second.value != first.value
    assert second.received_at == clock.now()
    # A refresh, not a new grant: still one family.
    assert await _families(sensor, "sensor-1") == 1
    assert events == [("grant", first.value), ("refresh", second.value)]
    verify_cwt(second.value, sensor.service.key_ring.lookup)


async def test_refresh_times_are_jittered_across_a_fleet(
    sensor: Coap, secret_credentials, clock: SettableClock
) -> None:
    policy = RefreshPolicy(refresh_fraction=0.5, refresh_jitter=0.2)
    delays = {policy.refresh_delay(600, random.Random(seed)) for seed in range(50)}
    assert all(240 <= d <= 300 for d in delays), delays
    assert len(delays) > 20  # not in step


async def test_dead_family_falls_back_to_a_new_grant_with_the_device_key(
    sensor: Coap, device_context: aiocoap.Context, meter: DeviceKey, clock: SettableClock
) -> None:
    client = _client(sensor, device_context, meter, clock)
    first = await client.token()
    assert await sensor.service.store.kill_families("meter-7", "test", clock.now(), "operator") == 1

    clock.advance(first.refresh_at - clock.now())
    second = await client.token()

    assert second.value != first.value
    assert verify_cwt(second.value, sensor.service.key_ring.lookup).sub == "meter-7"
    # The old family is dead and its token revoked; the new grant started a live family.
    assert await _families(sensor, "meter-7") == 1
    assert await sensor.service.store.is_revoked(token_hash(first.value))


async def test_back_off_is_exponential_with_jitter_and_keeps_the_valid_token(
    sensor: Coap, device_context: aiocoap.Context, secret_credentials, clock: SettableClock
) -> None:
    proxy = await LossyProxy(("127.0.0.1", sensor.server.port)).start()
    try:
        quick = RefreshPolicy(request_timeout=0.3, backoff_initial=2.0, backoff_max=16.0)
        client = _client(
            sensor, device_context, secret_credentials, clock, as_uri=proxy.uri, policy=quick
        )
        token = await client.token()
        proxy.lose(lambda m: m.path == "/token")  # the AS goes silent
        clock.advance(token.refresh_at - clock.now())

        delays = []
        for _ in range(4):
            # The refresh fails, but the token is still valid: the device keeps using it.
            assert (await client.token()).value == token.value
            assert client.retry_at is not None
            delays.append(client.retry_at - clock.now())
            # While backing off nothing is sent.
            sent = proxy.rules[0].matched
            assert (await client.token()).value == token.value
            assert proxy.rules[0].matched == sent
            clock.advance(client.retry_at - clock.now())
        # backoff_initial 2 s doubling, each drawn from [d/2, d]: 1-2, 2-4, 4-8, 8-16.
        for n, delay in enumerate(delays):
            assert 2**n <= delay <= 2 ** (n + 1), delays
    finally:
        proxy.close()


async def test_no_token_and_no_answer_raises_with_retry_time(
    device_context: aiocoap.Context, secret_credentials, clock: SettableClock
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never answers
        port = sock.getsockname()[1]
        client = TokenClient(
            device_context,
            f"coap://127.0.0.1:{port}",
            secret_credentials,
            audience="thermostat",
            clock=clock,
            policy=FAST_REFRESH,
        )
        with pytest.raises(ServiceUnreachable) as raised:
            await client.token()
    assert raised.value.retry_at > clock.now()
    # The error names the AS it failed on (issue 15).
    assert raised.value.host == f"127.0.0.1:{port}" and raised.value.host in str(raised.value)
    # Still backing off: refused at once, no request.
    with pytest.raises(ServiceUnreachable, match="backing off") as backing_off:
        await client.token()
    assert backing_off.value.host == f"127.0.0.1:{port}"


async def test_service_unavailable_max_age_is_honoured(
    sensor: Coap, device_context: aiocoap.Context, secret_credentials, clock: SettableClock
) -> None:
    proxy = await LossyProxy(("127.0.0.1", sensor.server.port)).start()
    try:
        rule = proxy.lose(lambda m: m.path == "/token", limit=1, unavailable_max_age=120)
        client = _client(sensor, device_context, secret_credentials, clock, as_uri=proxy.uri)
        with pytest.raises(ServiceUnreachable) as raised:
            await client.token()
        assert rule.dropped == 1
        # The hint (120 s) outweighs the 1-2 s back-off.
        assert raised.value.retry_at == clock.now() + 120
        clock.advance(119)
        with pytest.raises(ServiceUnreachable):
            await client.token()
        clock.advance(1)
        assert (await client.token()).value
    finally:
        proxy.close()


async def test_wrong_secret_is_refused_and_backs_off(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    wrong = SecretCredentials("sensor-1", "not-the-secret-0123456789")
    client = _client(sensor, device_context, wrong, clock)
    with pytest.raises(TokenRequestRefused) as raised:
        await client.token()
    assert raised.value.ace_code == AceErrorCode.INVALID_CLIENT
    assert raised.value.coap_code == aiocoap.UNAUTHORIZED
    assert raised.value.host == f"127.0.0.1:{sensor.server.port}"
    assert raised.value.host in str(raised.value)
    assert client.retry_at is not None and client.retry_at > clock.now()


async def test_jwt_and_pop_tokens(
    sensor: Coap, device_context: aiocoap.Context, meter: DeviceKey, clock: SettableClock
) -> None:
    client = _client(
        sensor,
        device_context,
        meter,
        clock,
        token_format="jwt",
        pop_key=meter.private_key.public_key(),
    )
    token = await client.token()
    assert token.value.startswith(b"ey")
    assert token.token_type == TokenType.POP


async def test_secrets_and_tokens_never_reach_logs_or_repr(
    sensor: Coap,
    device_context: aiocoap.Context,
    secret_credentials: SecretCredentials,
    clock: SettableClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = _client(sensor, device_context, secret_credentials, clock)
    first = await client.token()
    clock.advance(first.refresh_at - clock.now())
    second = await client.token()
    await sensor.service.store.kill_families("sensor-1", "test", clock.now(), "operator")
    client.discard_access_token()
    third = await client.token()  # refresh refused, then a new grant

    texts = [caplog.text, repr(client), repr(first), repr(secret_credentials)]
    texts += [repr(client._state)]
    assert "refresh refused" in caplog.text  # the logs did cover the interesting path
    for text in texts:
        assert secret_credentials.secret not in text
        for token in (first, second, third):
            for form in (token.value, token.value.hex(), repr(token.value)):
                assert str(form) not in text


async def test_revoke_gives_the_grant_back(
    sensor: Coap, device_context: aiocoap.Context, meter: DeviceKey, clock: SettableClock
) -> None:
    client = _client(sensor, device_context, meter, clock)
    token = await client.token()
    await client.revoke()

    # RFC 7009 semantics: the refresh token's family dies with its access tokens.
    assert await _families(sensor, "meter-7") == 0
    assert await sensor.service.store.is_revoked(token_hash(token.value))
    assert client.cached is None
    fresh = await client.token()  # a new grant
    assert fresh.value != token.value
    assert await _families(sensor, "meter-7") == 1
