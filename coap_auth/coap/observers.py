"""The site's Observe (RFC 7641) observations of /keys and /revoke/trl in one bounded registry,
and the one paced sender of their notifications (the resource side is coap/observable.py,
block-wise cutting coap/block2.py).

aiocoap's ObservableResource keeps a suspended render coroutine per observer (about 11 KiB),
renders the resource again for each of them, sends every notification confirmable (a backlog
per remote, retransmissions to whoever stopped listening) and never block-wise. Here an
observation is a small record: the resource renders a representation once per (shape,
version) and each notification is built from it; notifications go out NON, with a CON to an
observer whose last CON is notify_con_interval old (RFC 7641 §4.5), at most notify_rate a
second in all, each observer queued at most once and given the newest state when its turn
comes (RFC 7641 §4.5.2: intermediate states are skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiocoap

from coap_auth.addresses import address_key
from coap_auth.clock import Clock
from coap_auth.coap.block2 import first_block
from coap_auth.coap.protection import peer_id
from coap_auth.errors import CoapAuthError
from coap_auth.udp import error_message, source_host

log = logging.getLogger("coap_auth.server")

# RFC 7641 §4.4: the Observe option carries 24 bits of a per-observation increasing number.
OBSERVE_MASK = 0xFFFFFF
# A new registration from a source that already observes here may mean its earlier
# observations were lost (a device restarted, a NAT moved it to another port): they are sent
# their next notification as a CON at once, so that the dead ones end (RFC 7641 §4.5: an
# unacknowledged or reset CON ends the observation) and free their places. At most once per
# this many seconds per observation.
PROBE_INTERVAL = 60


class ObservedResource(Protocol):
    """What the registry asks of an observed resource."""

    async def notification(self, observation: Observation) -> aiocoap.Message:
        """The observer's current representation as a whole (unsliced) response; raises
        CoapAuthError when the observer may no longer read it (ends the observation)."""
        ...


@dataclass(frozen=True, slots=True)
class Representation:
    """One rendered state of a resource for one shape of request, shared by every observer
    and every GET of that shape until the state changes."""

    payload: bytes
    content_format: int
    etag: bytes

    @classmethod
    def of(cls, payload: bytes, content_format: int) -> Representation:
        return cls(payload, content_format, hashlib.sha256(payload).digest()[:8])

    def message(self) -> aiocoap.Message:
        response = aiocoap.Message(
            code=aiocoap.Code.CONTENT, payload=self.payload, content_format=self.content_format
        )
        response.opt.etag = self.etag
        return response


@dataclass(slots=True, eq=False)
class Observation:
    """One observer: a few references and numbers, nothing rendered."""

    resource: ObservedResource
    # The request's pipe (every notification a further response on it); None once detached.
    pipe: Any
    source: str  # an address key, or "peer:<id>" for an authenticated peer
    host: str | None  # the source address of an unauthenticated observer, else None
    shape: Hashable  # what the resource renders for it (content format, query, requester)
    szx: int  # Block2 size exponent of its notifications (RFC 7959 §2.6)
    number: int  # the Observe value last sent
    last_con: int  # injected clock: when it was last sent a CON (or registered)
    etag: bytes | None = None  # the representation it was last given
    queued: bool = False
    probe: bool = False  # its next notification is a CON (a liveness check)
    ended: bool = False
    closing: bool = False  # queued for a last notification without Observe
    # Set when the pipe cannot tell its end (ProtectedSite's IterablePipe): the render
    # coroutine awaits it, and its cancellation ends the observation.
    waiter: asyncio.Future[None] | None = None
    # Detached (an unprotected observer: see Observers.answer): its (message token, remote)
    # in aiocoap's token manager, and what the token manager calls to end it.
    key: tuple[bytes, Any] | None = None
    stopper: Callable[[], None] | None = None

    @property
    def request(self) -> aiocoap.Message:
        """The registration (only while attached to its pipe: authenticated observers)."""
        request: aiocoap.Message = self.pipe.request
        return request


class Observers:
    """Every observation of the site, the per-source and global limits, and the sender."""

    def __init__(
        self,
        clock: Clock,
        *,
        per_source: int,
        maximum: int,
        rate: int,
        con_interval: int,
        max_block_size: int,
    ) -> None:
        self.clock = clock
        self.per_source = per_source
        self.maximum = maximum
        self.rate = rate
        self.con_interval = con_interval
        self.max_szx = max_block_size.bit_length() - 5  # 16 bytes is SZX 0
        # At most 10 ms worth of notifications at once, then the event loop gets its turn
        # (ACKs, requests) before the next burst.
        self.burst = max(1, rate // 100)
        # Whether an address is verified (coap_auth.echo; the Server sets it): a CON, with its
        # retransmissions, goes to an unauthenticated observer only while it is.
        self.is_verified: Callable[[str], bool] = lambda host: True
        # aiocoap's token manager of the server's UDP socket (the Server sets it once bound):
        # unprotected observations are detached from their pipes into it (see `answer`).
        self.token_manager: Any | None = None
        self._by_resource: dict[Any, dict[Observation, None]] = {}
        self._by_source: dict[str, dict[Observation, None]] = {}
        self._count = 0
        self._queue: deque[Observation] = deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        # Counters for tests and metrics.
        self.sent = 0
        self.refused = 0

    def __len__(self) -> int:
        return self._count

    def of(self, resource: Any) -> list[Observation]:
        """The live observations of `resource`, oldest first."""
        return list(self._by_resource.get(resource, ()))

    def from_source(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def count(self, resource: Any) -> int:
        """How many observe `resource` (safe from another thread: the metrics listener's)."""
        return len(self._by_resource.get(resource, ()))

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name="coap-auth-notify"
            )

    async def stop(self) -> None:
        """Stop sending and forget every observation (the server is going away)."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        for observations in list(self._by_resource.values()):
            for observation in list(observations):
                self._forget(observation)
        self._queue.clear()

    # -- registration -------------------------------------------------------------------------

    def register(
        self, resource: ObservedResource, pipe: Any, shape: Hashable
    ) -> Observation | None:
        """Add an observation for the GET on `pipe`, or None when the server will not hold it:
        the caller then answers the GET without Observe (RFC 7641 §4.1)."""
        request = pipe.request
        requester = peer_id(request)
        authenticated = requester is not None
        source = f"peer:{requester}" if authenticated else address_key(source_host(request))
        mine = self._by_source.get(source, {})
        if not authenticated:
            self._probe(mine)
        if self._count >= self.maximum or (len(mine) >= self.per_source and not authenticated):
            self.refused += 1
            return None
        if len(mine) >= self.per_source:
            # An authenticated peer past its limit loses its oldest observation instead:
            # aiocoap's OSCORE client never cancels an observation it gave up (a new one is a
            # new token, the old one lingers here), so refusing would lock a device out after
            # a few restarts; and a peer pushing out its own observations hurts only itself.
            self.close(next(iter(mine)))
        block2 = request.opt.block2
        szx = self.max_szx if block2 is None else min(block2.size_exponent, self.max_szx)
        # RFC 7641 §4.4: numbers start anywhere; the loop's milliseconds make a renewed
        # registration (same endpoint and token, a new observation here) start above the
        # old one's, and grow by 256,000 in 256 s, well under the 2^23 allowed.
        start = int(asyncio.get_running_loop().time() * 1000) & OBSERVE_MASK
        host = None if authenticated else source_host(request)
        observation = Observation(resource, pipe, source, host, shape, szx, start, self.clock.now())
        key = (request.token, request.remote)
        manager = self.token_manager
        if not authenticated and manager is not None and key in manager.incoming_requests:
            observation.key = key  # detached once answered
            observation.stopper = functools.partial(self.end, observation)
        else:
            try:
                pipe.on_interest_end(functools.partial(self.end, observation))
            except RuntimeError:  # an IterablePipe already iterated: await in hold() instead
                observation.waiter = asyncio.get_running_loop().create_future()
            if observation.ended:  # no interest left at all (the pipe ended meanwhile)
                return None
        self._by_resource.setdefault(resource, {})[observation] = None
        self._by_source.setdefault(source, {})[observation] = None
        self._count += 1
        return observation

    def _probe(self, observations: Iterable[Observation]) -> None:
        """Check that `observations` (of one source that registers again) still have a
        listener: a CON each, now, unless one was sent within PROBE_INTERVAL."""
        now = self.clock.now()
        for observation in observations:
            if now - observation.last_con >= PROBE_INTERVAL and not observation.probe:
                observation.probe = True
                self.notify([observation], force=True)

    async def answer(self, observation: Observation, answer: aiocoap.Message) -> None:
        """Send the registration's `answer` (with Observe) and keep the observation until it
        ends.

        An unprotected observation is detached: its exchange ends for aiocoap (its pipes, its
        render task and both copies of the request go, most of what an observer cost), and
        the observation takes the request's place in aiocoap's token manager, so that all
        that would have ended the exchange ends it: a new request on its message token (a
        deregistration, RFC 7641 §3.6, or a new registration, §4.1), a reset or an
        unacknowledged CON (§4.5), the server's shutdown."""
        pipe = observation.pipe
        if observation.key is None:
            pipe.add_response(answer, is_last=False)
            await self.hold(observation)
            return
        pipe.add_response(answer, is_last=True)
        observation.pipe = None
        if not observation.ended:
            self.token_manager.incoming_requests[observation.key] = (None, observation.stopper)  # type: ignore[union-attr]

    def _deliver(self, observation: Observation, message: aiocoap.Message, last: bool) -> None:
        """Send one notification (or last response) of `observation`."""
        if observation.key is None:
            observation.pipe.add_response(message, is_last=last)
            return
        token, remote = observation.key
        message.token, message.remote = token, remote.as_response_address()
        self.token_manager.token_interface.send_message(message, observation.stopper)  # type: ignore[union-attr]
        # A reset answering a NON notification (RFC 7641 §3.6) is ignored, as aiocoap does:
        # resets are unauthenticated and message ids guessable, so a forged one would end an
        # honest device's observation, and a CON probe on it can be raced (outsider tests).
        # A device that forgot its observations is found out by its next registration's
        # probe or the periodic CON.

    def _detach(self, observation: Observation) -> None:
        """Take a detached observation's place in the token manager back (if still its)."""
        requests = getattr(self.token_manager, "incoming_requests", None)
        key = observation.key
        if requests and key is not None:
            entry = requests.get(key)
            if entry is not None and entry[1] is observation.stopper:
                del requests[key]

    async def hold(self, observation: Observation) -> None:
        """Keep the render coroutine of an observation whose pipe cannot report its end
        (OSCORE: ProtectedSite cancels it when the outer exchange ends) until it ends."""
        if observation.waiter is None:
            return  # the pipe tells us: the coroutine can finish now
        try:
            await observation.waiter
        finally:
            self.end(observation)

    def end(self, observation: Observation) -> None:
        """The observer went away (deregistered, RST or unacknowledged CON, a new request on
        its token) or the server ended it: forget it, now."""
        self._forget(observation)

    def close(self, observation: Observation) -> None:
        """End an observation with one last notification without Observe (RFC 7641 §3.2: the
        client learns it ended), sent in its turn; its place is free at once."""
        if observation.ended or observation.closing:
            return
        observation.closing = True
        self._unindex(observation)
        self._enqueue(observation)

    def _forget(self, observation: Observation) -> None:
        if observation.ended:
            return
        observation.ended = True
        self._detach(observation)
        if not observation.closing:
            self._unindex(observation)
        waiter = observation.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unindex(self, observation: Observation) -> None:
        indexed = False
        for index, key in (
            (self._by_resource, observation.resource),
            (self._by_source, observation.source),
        ):
            entries = index.get(key)
            if entries is not None and observation in entries:
                indexed = True
                del entries[observation]
                if not entries:
                    del index[key]
        if indexed:
            self._count -= 1

    # -- notification -------------------------------------------------------------------------

    def notify(self, observations: Iterable[Observation], *, force: bool = False) -> None:
        """Queue `observations` for a notification of the newest state; one already queued
        stays where it is (coalescing). Without `force`, an observer whose representation did
        not change by its turn is sent nothing."""
        for observation in observations:
            if force:
                observation.etag = None
            self._enqueue(observation)

    def _enqueue(self, observation: Observation) -> None:
        if observation.queued or observation.ended:
            return
        observation.queued = True
        self._queue.append(observation)
        self._wake.set()

    async def _send_loop(self) -> None:
        """Token bucket on the event loop's time: bursts of up to `burst` notifications, never
        more than `rate` a second on average; no sleep while under the rate."""
        loop = asyncio.get_running_loop()
        allowance, last = float(self.burst), loop.time()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            allowance = min(float(self.burst), allowance + (now - last) * self.rate)
            last = now
            if allowance < 1:
                await asyncio.sleep((1 - allowance) / self.rate)
                continue
            while allowance >= 1 and self._queue:
                observation = self._queue.popleft()
                observation.queued = False
                if observation.ended:
                    continue
                try:
                    if await self._send(observation):
                        allowance -= 1
                except Exception:  # the loop must go on for everyone else
                    log.exception("notification failed; the observation ends")
                    self._fail(observation)
            await asyncio.sleep(0)

    def _fail(self, observation: Observation) -> None:
        """End an observation whose notification could not be made: a last 5.00 tells the
        client (else its exchange would linger here and there, silent)."""
        with contextlib.suppress(Exception):
            failure = aiocoap.Message(code=aiocoap.INTERNAL_SERVER_ERROR)
            failure.mtype = aiocoap.NON
            self._deliver(observation, failure, True)
        self._forget(observation)

    async def _send(self, observation: Observation) -> bool:
        """Send `observation` its notification; False when there was nothing to send."""
        try:
            message = await observation.resource.notification(observation)
        except CoapAuthError as error:
            message = error_message(error, compact=True)
        if observation.ended:
            return False
        now = self.clock.now()
        confirm = observation.probe or now - observation.last_con >= self.con_interval
        if confirm and observation.host is not None and not self.is_verified(observation.host):
            # A CON is due, but the address is no longer verified (RFC 9175 §2.4: nothing
            # retransmitted to it): the observation ends with this NON, without Observe; a
            # client still there registers again, through the Echo.
            observation.closing = True
            self._unindex(observation)
            confirm = False
        last = observation.closing or not message.code.is_successful()
        if not last:
            if message.opt.etag is not None and message.opt.etag == observation.etag:
                return False  # changed back, or not for this observer: nothing new
            observation.etag = message.opt.etag
            observation.number = (observation.number + 1) & OBSERVE_MASK
            message.opt.observe = observation.number
        message = first_block(message, observation.szx)
        if confirm:
            # RFC 7641 §4.5: a CON at least every notify_con_interval (24 h by default), and
            # as a liveness probe (PROBE_INTERVAL); when it goes unacknowledged (or is reset),
            # aiocoap ends the exchange and with it the observation (the pipe's interest ends).
            message.mtype = aiocoap.CON
            observation.last_con = now
            observation.probe = False
        else:
            message.mtype = aiocoap.NON
        self.sent += 1
        self._deliver(observation, message, last)
        if last:
            self._forget(observation)
        return True
