"""Timing of requests to the AS: message-layer tuning that fits a request inside the time the
caller will wait, and exponential back-off with jitter between attempts.

RFC 7252 §4.7 (NSTART = 1): while one confirmable exchange with the AS is outstanding, the
next one waits behind it. An exchange we gave up on must therefore end by itself when we
give up, or the retry would sit in aiocoap's backlog until MAX_TRANSMIT_WAIT (93 s).
"""

from __future__ import annotations

import random

import aiocoap
from aiocoap.numbers.constants import TransportTuning


class _Tuning(TransportTuning):
    def __init__(self, ack_timeout: float, max_retransmit: int) -> None:
        self.ACK_TIMEOUT = ack_timeout
        self.MAX_RETRANSMIT = max_retransmit


def reliable_within(seconds: float) -> TransportTuning:
    """The RFC 7252 §4.8 defaults, with as many retransmissions as fit into `seconds`
    (MAX_TRANSMIT_WAIT <= seconds); below 3 s, a shorter ACK_TIMEOUT and none."""
    default = TransportTuning()
    for retransmits in range(default.MAX_RETRANSMIT, -1, -1):
        tuning = _Tuning(default.ACK_TIMEOUT, retransmits)
        if tuning.MAX_TRANSMIT_WAIT <= seconds:
            return tuning
    return _Tuning(seconds / default.ACK_RANDOM_FACTOR, 0)


def backoff_delay(
    failures: int, *, initial: float, maximum: float, jitter: float, rng: random.Random
) -> float:
    """Seconds to wait after `failures` failures in a row: initial * 2**(failures - 1), at
    most `maximum`, less up to `jitter` of it at random so a fleet does not retry in step."""
    ceiling = min(maximum, initial * 2.0 ** max(0, failures - 1))
    return float(ceiling * (1 - jitter * rng.random()))


def retry_hint(response: aiocoap.Message) -> int | None:
    """Max-Age on a 5.03 (RFC 7252 §5.9.3.4) or a 4.29 (RFC 8516 §2): when to try again."""
    if response.code in (aiocoap.SERVICE_UNAVAILABLE, aiocoap.Code.TOO_MANY_REQUESTS):
        max_age = response.opt.max_age
        return int(max_age) if max_age is not None else None
    return None
