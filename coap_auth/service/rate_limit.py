"""Fixed-window request counters on the injected clock: per source address at the transport
(an IPv6 source by its /64), per authenticated client in the service.

Memory is bounded, and a key that reached its limit is never forgotten before its window
ends: past `max_keys` keys, counters of finished windows are dropped first, then the least
recently seen key still under its limit gives way; only a table full of limited keys refuses
a newcomer until the window ends.
"""

from __future__ import annotations

from collections import OrderedDict

from coap_auth.addresses import address_key
from coap_auth.clock import Clock
from coap_auth.errors import TooManyRequests

MAX_KEYS = 100_000

__all__ = ["MAX_KEYS", "RateLimiter", "address_key"]


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
