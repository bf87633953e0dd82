"""Time on the device, injected: device_client reads the time only through a `Clock`.

The same structural protocol as the service's clock (coap_auth.clock, which device code may
not import, DESIGN.md), so a test's SettableClock drives both sides.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """What device_client reads the time from; coap_auth.clock.SettableClock fits too."""

    def now(self) -> int:
        """Seconds since the Unix epoch (NumericDate, RFC 8392 §2). Must raise nothing."""
        ...


class SystemClock:
    """The wall clock. A device without a real-time clock must set it (NTP) before use:
    token lifetimes and validity checks are absolute times. Raises nothing."""

    def now(self) -> int:
        """`time.time()` in whole seconds. Raises nothing."""
        return int(time.time())
