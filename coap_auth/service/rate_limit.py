"""Fixed-window request counters on the injected clock: per source address at the transport,
per authenticated client in the service.

Memory is bounded: past `max_keys` distinct keys, counters of finished windows are dropped,
and if a flood of distinct keys fills one window, counting restarts (fail open: a limiter
must not become the way to exhaust memory).
"""

from __future__ import annotations

from coap_auth.clock import Clock
from coap_auth.errors import TooManyRequests

MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, clock: Clock, limit: int, window: int, *, max_keys: int = MAX_KEYS):
        self.clock = clock
        self.limit = limit  # 0: no limit
        self.window = window
        self.max_keys = max_keys
        self._counts: dict[str, tuple[int, int]] = {}  # key -> (window start, count)

    def hit(self, key: str, what: str) -> None:
        """Count one request for `key`; raise TooManyRequests (with the seconds until the
        window ends) once the limit is passed. `what` names the limit in the error."""
        if self.limit <= 0:
            return
        now = self.clock.now()
        start = now - now % self.window
        window_start, count = self._counts.get(key, (start, 0))
        if window_start != start:
            count = 0
        if count >= self.limit:
            raise TooManyRequests(f"too many requests from this {what}", start + self.window - now)
        if key not in self._counts and len(self._counts) >= self.max_keys:
            self._prune(start)
        self._counts[key] = (start, count + 1)

    def _prune(self, start: int) -> None:
        self._counts = {k: v for k, v in self._counts.items() if v[0] == start}
        if len(self._counts) >= self.max_keys:
            self._counts.clear()
