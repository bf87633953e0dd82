"""Fixed-window request counters on the injected clock: per source address at the transport
(an IPv6 source by its /64), per authenticated client in the service.

Memory is bounded, and no counter of the current window is ever forgotten: past `max_keys`
keys, counters of finished windows are dropped, and a new key that still finds no room is
refused until the window ends.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from coap_auth.clock import Clock
from coap_auth.errors import TooManyRequests

MAX_KEYS = 100_000


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
        # int() drops a zone index (fe80::1%eth0) too: the prefix is what counts.
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class RateLimiter:
    def __init__(self, clock: Clock, limit: int, window: int, *, max_keys: int = MAX_KEYS):
        self.clock = clock
        self.limit = limit  # 0: no limit
        self.window = window
        self.max_keys = max_keys
        # key -> (window start, count), in order of window start: a key moves to the end when
        # its window changes, so the counters of finished windows are always at the front.
        self._counts: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def hit(self, key: str, what: str) -> None:
        """Count one request for `key`; raise TooManyRequests (with the seconds until the
        window ends) once the limit is passed. `what` names the limit in the error."""
        if self.limit <= 0:
            return
        now = self.clock.now()
        start = now - now % self.window
        retry_after = start + self.window - now
        entry = self._counts.get(key)
        if entry is None:
            self._drop_finished(start)
            if len(self._counts) >= self.max_keys:
                # Full of counters of this window. Refusing the newcomer is the safe choice:
                # dropping (or evicting the least recently used of) live counters resets them,
                # and new keys are cheap to make (a spoofed UDP source address costs nothing),
                # so a flood of them would reset exactly the key that is being limited. A
                # refusal only delays newcomers until this window ends and frees the table.
                raise TooManyRequests("too many senders at once; retry later", retry_after)
            self._counts[key] = (start, 1)
            return
        window_start, count = entry
        if window_start != start:
            count = 0
            self._counts.move_to_end(key)
        if count >= self.limit:
            raise TooManyRequests(f"too many requests from this {what}", retry_after)
        self._counts[key] = (start, count + 1)

    def _drop_finished(self, start: int) -> None:
        """Forget the counters of windows before `start` (amortised O(1): each key is dropped
        once, from the front)."""
        while self._counts:
            oldest = next(iter(self._counts))
            if self._counts[oldest][0] >= start:
                return
            del self._counts[oldest]
