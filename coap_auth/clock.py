"""Time, injected: the service reads the clock only through a `Clock`.

Pure modules take `now` as an argument; tests drive a `SettableClock` instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> int:
        """Seconds since the Unix epoch (NumericDate, RFC 8392 §2)."""
        ...


class SystemClock:
    def now(self) -> int:
        return int(time.time())


class SettableClock:
    """A clock that moves only when told to."""

    def __init__(self, start: int = 1_700_000_000) -> None:
        self._now = start

    def now(self) -> int:
        return self._now

    def advance(self, seconds: int) -> None:
        self._now += seconds

    def set(self, when: int) -> None:
        self._now = when
