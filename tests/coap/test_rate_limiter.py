"""The per-address and per-client RateLimiter on an injected clock: a bounded table that never
forgets a limited key before its window ends, and the source-address key (IPv6 by /64,
IPv4-mapped and NAT64 as IPv4, link-local per interface).
"""

from __future__ import annotations

import pytest

from coap_auth.clock import SettableClock
from coap_auth.errors import TooManyRequests
from coap_auth.service.rate_limit import RateLimiter, address_key

WINDOW = 60


@pytest.fixture
def clock() -> SettableClock:
    clock = SettableClock()
    clock.set(clock.now() - clock.now() % WINDOW)  # the start of a window
    return clock


def allowed(limiter: RateLimiter, key: str) -> bool:
    try:
        limiter.hit(key, "address")
    except TooManyRequests:
        return False
    return True


def test_a_flood_of_new_keys_cannot_reset_a_limited_key(clock: SettableClock) -> None:
    limiter = RateLimiter(clock, limit=3, window=WINDOW, max_keys=100)
    assert [allowed(limiter, "victim-target") for _ in range(4)] == [True, True, True, False]
    clock.advance(10)
    flood = [allowed(limiter, f"198.51.100.{n}/{m}") for n in range(100) for m in range(100)]
    assert all(flood)  # newcomers push out each other, the least recently seen first
    assert len(limiter) == 100
    assert not allowed(limiter, "victim-target")
    with pytest.raises(TooManyRequests) as refused:
        limiter.hit("victim-target", "address")
    assert refused.value.retry_after == WINDOW - 10
    clock.advance(WINDOW - 10)  # the window is over: every counter starts again
    assert allowed(limiter, "victim-target")


def test_a_newcomer_pushes_out_the_least_recently_seen_key_under_its_limit(
    clock: SettableClock,
) -> None:
    limiter = RateLimiter(clock, limit=3, window=WINDOW, max_keys=3)
    assert allowed(limiter, "quiet") and allowed(limiter, "quiet")
    assert allowed(limiter, "busy")
    assert allowed(limiter, "quiet")  # "quiet" is at its limit now; "busy" is not
    assert allowed(limiter, "other")
    assert allowed(limiter, "newcomer")  # "busy", under its limit and least recent, gave way
    assert len(limiter) == 3
    assert not allowed(limiter, "quiet")  # the limited key was kept
    assert [allowed(limiter, "busy") for _ in range(4)] == [True, True, True, False]


def test_a_table_full_of_limited_keys_refuses_newcomers_until_the_window_ends(
    clock: SettableClock,
) -> None:
    limiter = RateLimiter(clock, limit=1, window=WINDOW, max_keys=3)
    for key in ("a", "b", "c"):
        assert allowed(limiter, key)  # each at its limit of one
    clock.advance(45)
    with pytest.raises(TooManyRequests) as refused:
        limiter.hit("d", "address")
    assert refused.value.retry_after == 15
    assert not allowed(limiter, "a")  # still limited
    clock.advance(15)
    assert allowed(limiter, "d")  # the finished counters made room
    assert allowed(limiter, "a")
    assert len(limiter) <= 3


def test_finished_windows_are_dropped_first(clock: SettableClock) -> None:
    limiter = RateLimiter(clock, limit=2, window=WINDOW, max_keys=3)
    assert allowed(limiter, "old")
    clock.advance(WINDOW)
    assert allowed(limiter, "busy") and allowed(limiter, "busy")
    assert allowed(limiter, "new-1")
    assert allowed(limiter, "new-2")  # "old" (a finished window) gave way, not "busy"
    assert not allowed(limiter, "busy")
    assert allowed(limiter, "new-3")  # "new-1", under its limit, gave way; "busy" did not
    assert not allowed(limiter, "busy")
    assert len(limiter) == 3


def test_an_off_limiter_holds_nothing(clock: SettableClock) -> None:
    limiter = RateLimiter(clock, limit=0, window=WINDOW, max_keys=1)
    assert all(allowed(limiter, str(n)) for n in range(10))
    assert len(limiter) == 0


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 peer of an IPv6 socket
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64%eth0"),  # link-local: every link has its own fe80::/64
        ("fe80::2%wpan0", "fe80::/64%wpan0"),
        ("64:ff9b::c000:207", "192.0.2.7"),  # NAT64 (RFC 6052): the IPv4 peer behind it
        ("::1", "::/64"),
        ("-", "-"),  # no address known: the text as it is
    ],
)
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key


def test_one_ipv6_subnet_shares_one_budget(clock: SettableClock) -> None:
    limiter = RateLimiter(clock, limit=2, window=WINDOW)
    assert allowed(limiter, address_key("2001:db8:1:2::1"))
    assert allowed(limiter, address_key("2001:db8:1:2::2"))
    assert not allowed(limiter, address_key("2001:db8:1:2:ffff::3"))
    assert allowed(limiter, address_key("2001:db8:1:3::1"))  # the next /64 is someone else
