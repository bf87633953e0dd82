"""The pieces of coap_auth/echo.py on their own: Echo values (RFC 9175 Appendix A), the
verified-address table and the size of the challenge. Over UDP: tests/coap/test_amplification.py
and tests/device_client/test_echo.py."""

from __future__ import annotations

import asyncio

import aiocoap
import aiocoap.resource
import pytest

from coap_auth import echo
from coap_auth.clock import SettableClock
from coap_auth.coap.server import _bound_port
from coap_auth.echo import (
    CLOCK_SKEW,
    ECHO_VALUE_BYTES,
    ECHO_VALUE_LIFETIME,
    AmplificationGuard,
    EchoValues,
    VerifiedAddresses,
    datagram_size,
    is_echo_challenge,
    within_bound,
)
from coap_auth.udp import create_client_context, create_server_context

KEY = bytes(range(32))


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


def test_an_echo_value_is_12_bytes_and_checks_for_its_host_only(clock: SettableClock) -> None:
    values = EchoValues(KEY, clock)
    value = values.issue("192.0.2.1")
    assert len(value) == ECHO_VALUE_BYTES == 12
    assert values.check(value, "192.0.2.1")
    assert not values.check(value, "192.0.2.2")
    assert not values.check(value, "2001:db8::1")
    v6 = values.issue("2001:db8::1")
    assert values.check(v6, "2001:db8::1") and not values.check(v6, "2001:db8::2")


def test_an_echo_value_lives_a_minute(clock: SettableClock) -> None:
    values = EchoValues(KEY, clock)
    value = values.issue("192.0.2.1")
    clock.advance(ECHO_VALUE_LIFETIME)
    assert values.check(value, "192.0.2.1")
    clock.advance(1)
    assert not values.check(value, "192.0.2.1")


def test_a_value_from_the_future_is_refused(clock: SettableClock) -> None:
    # Another instance whose clock runs ahead (or a forged timestamp): the age wraps around.
    ahead = EchoValues(KEY, SettableClock(clock.now() + 120))
    assert not EchoValues(KEY, clock).check(ahead.issue("192.0.2.1"), "192.0.2.1")


@pytest.mark.parametrize("ahead", [1, CLOCK_SKEW])
def test_a_value_from_an_instance_a_little_ahead_is_accepted(
    clock: SettableClock, ahead: int
) -> None:
    # Two instances behind one address, their clocks on either side of a second boundary.
    other = EchoValues(KEY, SettableClock(clock.now() + ahead))
    assert EchoValues(KEY, clock).check(other.issue("192.0.2.1"), "192.0.2.1")


def test_every_instance_with_the_key_accepts_the_value_and_no_other(clock: SettableClock) -> None:
    value = EchoValues(KEY, clock).issue("192.0.2.1")
    assert EchoValues(KEY, clock).check(value, "192.0.2.1")
    assert not EchoValues(bytes(32), clock).check(value, "192.0.2.1")


@pytest.mark.parametrize("bad", [None, b"", b"\x00" * 11, b"\x00" * 13, b"\x00" * 12])
def test_malformed_or_forged_values_are_refused(clock: SettableClock, bad: bytes | None) -> None:
    assert not EchoValues(KEY, clock).check(bad, "192.0.2.1")


def test_a_tampered_value_is_refused(clock: SettableClock) -> None:
    values = EchoValues(KEY, clock)
    value = bytearray(values.issue("192.0.2.1"))
    value[0] ^= 1  # the timestamp: the MAC covers it
    assert not values.check(bytes(value), "192.0.2.1")


def test_a_short_key_is_refused(clock: SettableClock) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        EchoValues(b"short", clock)


def test_verified_for_the_lifetime(clock: SettableClock) -> None:
    table = VerifiedAddresses(clock, lifetime=100, networks=())
    assert not table.is_verified("192.0.2.1")
    table.verify("192.0.2.1")
    clock.advance(99)
    assert table.is_verified("192.0.2.1") and len(table) == 1
    clock.advance(1)
    assert not table.is_verified("192.0.2.1")
    assert len(table) == 0  # forgotten, not only expired


def test_the_table_is_bounded_least_recently_verified_first(clock: SettableClock) -> None:
    table = VerifiedAddresses(clock, max_entries=3, networks=())
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        table.verify(host)
    table.verify("192.0.2.1")  # verified again: now the most recent
    table.verify("192.0.2.4")
    assert len(table) == 3
    assert not table.is_verified("192.0.2.2")
    assert all(table.is_verified(h) for h in ("192.0.2.1", "192.0.2.3", "192.0.2.4"))


def test_one_ipv6_subnet_cannot_fill_the_table(clock: SettableClock) -> None:
    table = VerifiedAddresses(clock, max_entries=100, per_prefix=4, networks=())
    table.verify("192.0.2.1")
    for i in range(1, 50):
        table.verify(f"2001:db8::{i:x}")
    assert len(table) == 5
    assert table.is_verified("192.0.2.1")
    assert table.is_verified("2001:db8::31") and not table.is_verified("2001:db8::1")
    table.verify("2001:db8:0:1::1")  # another /64 has its own share
    assert table.is_verified("2001:db8:0:1::1")


def test_verified_networks_are_always_verified_and_take_no_entry(clock: SettableClock) -> None:
    table = VerifiedAddresses(clock, networks=("127.0.0.0/8", "::1/128", "10.1.0.0/16"))
    for host in ("127.0.0.1", "127.3.2.1", "::1", "10.1.200.3"):
        assert table.is_verified(host)
        table.verify(host)
    assert len(table) == 0
    assert not table.is_verified("10.2.0.1") and not table.is_verified("-")
    assert not VerifiedAddresses(clock, networks=()).is_verified("127.0.0.1")


def _request(*path: str, token: bytes = b"") -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.GET, uri_path=path)
    request.token = token
    return request


@pytest.mark.parametrize(
    ("path", "token", "with_echo", "max_age"),
    [
        (("keys",), b"\x01\x02", True, True),  # 11 bytes: the challenge (22) fits 33
        (("keys",), b"", True, True),  # 9 bytes: 20 fits 27
        (("k",), b"", True, False),  # 6 bytes: 18 without Max-Age fits 18
        ((), b"\x01", False, False),  # 5 bytes: only a bare 4.01 (5) fits 15
        ((), b"", False, False),
    ],
)
def test_the_challenge_itself_fits_the_bound(
    clock: SettableClock, path: tuple[str, ...], token: bytes, with_echo: bool, max_age: bool
) -> None:
    guard = AmplificationGuard(None, EchoValues(KEY, clock), VerifiedAddresses(clock))
    request = _request(*path, token=token)
    challenge = guard.challenge(request)
    assert within_bound(challenge, request)
    assert challenge.code == aiocoap.UNAUTHORIZED and challenge.mtype == aiocoap.NON
    assert is_echo_challenge(challenge) == with_echo
    assert (challenge.opt.max_age == 0) == max_age
    if not with_echo:
        assert datagram_size(challenge, len(token)) == 4 + len(token)
    assert guard.challenges == 1


def test_evicting_within_a_full_subnet_does_not_walk_the_table(
    clock: SettableClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: the subnet's oldest entry was found by walking the whole table (348 ms
    a verify at 100,000 entries): one /64 churning fresh addresses would burn a core."""
    table = VerifiedAddresses(clock, max_entries=20_000, per_prefix=4, networks=())
    for n in range(10_000):
        table.verify(f"198.51.{n // 250}.{n % 250}")
    calls = 0
    real = echo.address_key

    def counting(host: str) -> str:
        nonlocal calls
        calls += 1
        return real(host)

    monkeypatch.setattr(echo, "address_key", counting)
    for n in range(200):
        table.verify(f"2001:db8::{n:x}")
    assert calls <= 2 * 200  # one per verify and one per eviction, never one per entry
    assert len(table) == 10_004
    assert table.is_verified("2001:db8::c7") and not table.is_verified("2001:db8::0")


class _SlowChallenger(aiocoap.resource.Resource):
    """Challenges a request without Echo, answers one with it; each after DELAY s."""

    DELAY = 0.3

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        await asyncio.sleep(self.DELAY)  # a slow path to the server, not the test's clock
        if request.opt.echo is None:
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED, echo=b"\x01" * 12)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=b"late")


async def test_the_timeout_covers_the_challenge_and_the_repeat_together() -> None:
    """Attack round 2 of issue 18: a server that challenged just before the deadline got a
    second full timeout (`show keys --timeout 60` could take 120 s). Two answers 0.3 s apart
    each fit a 0.5 s timeout alone, and not together."""
    site = aiocoap.resource.Site()
    site.add_resource(["slow"], _SlowChallenger())
    server = await create_server_context(site, ("127.0.0.1", 0))
    client = await create_client_context()
    try:
        uri = f"coap://127.0.0.1:{_bound_port(server)}/slow"

        def build() -> aiocoap.Message:
            return aiocoap.Message(code=aiocoap.GET, uri=uri)

        with pytest.raises(TimeoutError):
            await echo.request_answering_echo(client, build, timeout=0.5)
        _, answer = await echo.request_answering_echo(client, build, timeout=5)
        assert answer.payload == b"late"
    finally:
        await client.shutdown()
        await server.shutdown()
