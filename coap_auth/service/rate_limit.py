"""Fixed-window request counters on the injected clock: per source address at the transport
(an IPv6 source by its /64), per authenticated client in the service.

Memory is bounded, and a key that reached its limit is never forgotten before its window
ends: past `max_keys` keys, counters of finished windows are dropped first, then the least
recently seen key still under its limit gives way; only a table full of limited keys refuses
a newcomer until the window ends.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from coap_auth.clock import Clock
from coap_auth.errors import TooManyRequests

MAX_KEYS = 100_000
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix


def address_key(host: str) -> str:
    """The rate-limit key of a source address: an IPv4 address whole (also when it reaches an
    IPv6 socket IPv4-mapped), an IPv6 address by its /64. One subnet is a /64 (RFC 4291
    §2.5.4) and an end site gets at least one (RFC 6177), so counting each /128 would hand a
    single attacker 2^64 budgets."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address in _NAT64:
            # RFC 6052: IPv4 peers behind a NAT64 share its /96; the last 32 bits are theirs.
            return str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        subnet = str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
        if address.is_link_local and address.scope_id:
            # fe80::/64 is on every link: the interface tells the subnets apart.
            return f"{subnet}%{address.scope_id}"
        return subnet
    return str(address)


class RateLimiter:
    def __init__(self, clock: Clock, limit: int, window: int, *, max_keys: int = MAX_KEYS):
        self.clock = clock
        self.limit = limit  # 0: no limit
        self.window = window
        self.max_keys = max_keys
        # Keys under their limit: key -> (window start, count), least recently seen first,
        # which also orders them by window start.
        self._open: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Keys that reached their limit: key -> window start, in the order they reached it.
        self._limited: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open) + len(self._limited)

    def hit(self, key: str, what: str) -> None:
        """Count one request for `key`; raise TooManyRequests (with the seconds until the
        window ends) once the limit is passed. `what` names the limit in the error."""
        if self.limit <= 0:
            return
        now = self.clock.now()
        start = now - now % self.window
        retry_after = start + self.window - now
        limited_since = self._limited.pop(key, None)
        if limited_since == start:
            self._limited[key] = start
            raise TooManyRequests(f"too many requests from this {what}", retry_after)
        entry = self._open.pop(key, None)
        if entry is None and limited_since is None:
            self._make_room(start, retry_after)
        count = entry[1] if entry is not None and entry[0] == start else 0
        if count + 1 >= self.limit:
            self._limited[key] = start
        else:
            self._open[key] = (start, count + 1)

    def _make_room(self, start: int, retry_after: int) -> None:
        """Room for one more key. Dropping a counter resets it, and new keys cost an attacker
        nothing (a spoofed UDP source), so only counters that cannot help one are dropped:
        those of finished windows, then the least recently seen key still under its limit (a
        reset gives that key a little more budget, never takes any from anyone). A limited
        key is kept to the end of its window, whatever the flood."""
        self._drop_finished(start)
        if len(self) < self.max_keys:
            return
        if self._open:
            self._open.popitem(last=False)
            return
        raise TooManyRequests("too many senders at once; retry later", retry_after)

    def _drop_finished(self, start: int) -> None:
        """Forget the counters of windows before `start` (amortised O(1): each key is dropped
        once, from the front)."""
        while self._open:
            oldest, (window_start, _count) = next(iter(self._open.items()))
            if window_start >= start:
                break
            del self._open[oldest]
        while self._limited:
            oldest, window_start = next(iter(self._limited.items()))
            if window_start >= start:
                break
            del self._limited[oldest]
