"""The observe loop the watchers share: register (RFC 7641), take notifications, re-register.

It re-registers when a notification is overdue (Max-Age, RFC 7641 §3.3.1) or the observation
ends, polls behind Observe (a plain GET every `check_interval`, so an observation the AS lost
without a word is noticed), and backs off exponentially with jitter while the AS cannot be
reached. When the AS answers a registration without Observe (its observer limits, RFC 7641
§4.1), the loop takes the answer, polls every `check_interval` and registers again after a
back-off (`observe_retry_initial`, doubling), never in a tight loop. Plain-CoAP requests answer
the AS's Echo challenge (RFC 9175 §2.4) on their own. `confirmed_at` tells a verifier how
current the state is. Time comes from the injected clock; the loop only polls it. Given a
SecureChannel, every request goes out over OSCORE. When the AS has forgotten the context (it
restarted), the channel runs EDHOC again for whichever request meets that first; an
observation registered under the old context died with it, so the loop then re-registers.

aiocoap 0.4.17 leaves a stray error in a task of its own when a registration is answered
without Observe and the block-wise answer then fails to assemble (its blocks' ETags differ,
RFC 7959 §2.4: the resource changed, or someone on the path forged a block): the request fails
as it should, but the runner raises a second error into the observation it had already ended,
and nobody awaits that task, so asyncio would log "Task exception was never retrieved" with
a traceback. Plain-CoAP requests go out through `_RetrievingContext`, which retrieves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import aiocoap

from coap_auth.echo import request_answering_echo
from device_client._transport import backoff_delay, reliable_within, retry_hint
from device_client.clock import Clock, SystemClock
from device_client.errors import ChannelRefused, ServiceUnreachable
from device_client.secure_channel import SecureChannel, abandon

log = logging.getLogger("device_client.watch")

# RFC 7252 §5.10.5: a response without Max-Age is fresh for 60 s.
DEFAULT_MAX_AGE = 60
_ENDED = object()


@dataclass(frozen=True, slots=True)
class WatchPolicy:
    """Timing of an observer, in seconds. Raises ValueError for a non-positive timeout,
    interval or check_interval, backoff_max below backoff_initial, a jitter outside [0, 1],
    or observe_retry_initial not in (0, observe_retry_max]."""

    # Real time to wait for one response.
    request_timeout: float = 10.0
    # Real time between looks at the clock (for overdue notifications and wake-ups).
    poll_interval: float = 1.0
    backoff_initial: float = 1.0
    # Short on purpose: a resource server refuses tokens once its state is older than its
    # staleness bound, so once the AS is back it must hear of it within seconds.
    backoff_max: float = 15.0
    backoff_jitter: float = 0.5
    # Clock time between the plain GETs made while observing: a safety net behind Observe
    # (a lost observation, a dropped notification) that also confirms the state is current.
    check_interval: int = 30
    # Clock time between two fetches of /keys caused by unknown kids.
    min_refetch_interval: int = 10
    # Re-register no sooner than this after an answer, whatever its Max-Age (it may be 0
    # just before a scheduled change, which the AS then notifies anyway).
    min_freshness: int = 5
    # Clock time before registering again when the AS answered a registration without Observe
    # (RFC 7641 §4.1: it holds no more observers of this address, or of anyone); doubled each
    # time it declines in a row, up to observe_retry_max, less up to backoff_jitter of it. The
    # watcher polls every check_interval meanwhile.
    observe_retry_initial: int = 60
    observe_retry_max: int = 3600

    def __post_init__(self) -> None:
        if min(self.request_timeout, self.poll_interval, self.backoff_initial) <= 0:
            raise ValueError("timeouts and intervals must be positive")
        if self.check_interval <= 0:
            raise ValueError("check_interval must be positive")
        if self.backoff_max < self.backoff_initial or not 0 <= self.backoff_jitter <= 1:
            raise ValueError("need backoff_initial <= backoff_max and jitter in [0, 1]")
        if not 0 < self.observe_retry_initial <= self.observe_retry_max:
            raise ValueError("need 0 < observe_retry_initial <= observe_retry_max")

    def backoff_delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after `failures` failures in a row: exponential from
        backoff_initial up to backoff_max, less up to backoff_jitter of it. Raises nothing."""
        return backoff_delay(
            failures,
            initial=self.backoff_initial,
            maximum=self.backoff_max,
            jitter=self.backoff_jitter,
            rng=rng,
        )

    def observe_retry_delay(self, declined: int, rng: random.Random) -> int:
        """Clock seconds before registering again after `declined` registrations in a row
        were answered without Observe: exponential from observe_retry_initial up to
        observe_retry_max, less up to backoff_jitter of it; at least 1. Raises nothing."""
        delay = backoff_delay(
            declined,
            initial=self.observe_retry_initial,
            maximum=self.observe_retry_max,
            jitter=self.backoff_jitter,
            rng=rng,
        )
        return max(1, round(delay))


class Failure(Exception):
    """One attempt failed; the loop backs off (at least `retry_after` s) and tries again."""

    def __init__(self, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Observer:
    """The observe/re-register/back-off loop shared by both watchers."""

    path: ClassVar[str]

    def __init__(
        self,
        context: aiocoap.Context,
        as_uri: str,
        *,
        clock: Clock | None = None,
        policy: WatchPolicy | None = None,
        rng: random.Random | None = None,
        channel: SecureChannel | None = None,
    ) -> None:
        self._context = context
        self._channel = channel
        self._base = as_uri.rstrip("/")
        self._clock = clock if clock is not None else SystemClock()
        self._policy = policy if policy is not None else WatchPolicy()
        self._tuning = reliable_within(self._policy.request_timeout)
        self._rng = rng if rng is not None else random.Random()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._first_failure: str | None = None
        # Set with _first_failure: start(wait=True) waits on the two events, never polls.
        self._failed = asyncio.Event()
        self._deadline = 0
        self._next_check = 0
        self._failures = 0
        self._confirmed_at: int | None = None
        self._ended_in_a_row = 0
        # The channel's handshake count when the observation was registered.
        self._registered_under = 0
        self.registrations = 0  # how many times an observation was registered
        self.retry_at: int | None = None
        # Registrations the AS answered without Observe, in all and in a row; while it
        # declines, when the watcher will register again (None: observing, or not started).
        self.declined = 0
        self._declined_in_a_row = 0
        self.observe_retry_at: int | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._base}/{self.path}>"

    @property
    def uri(self) -> str:
        """The URI observed at the AS."""
        return f"{self._base}/{self.path}"

    @property
    def synced(self) -> bool:
        """Whether the watcher holds the AS's state (it may be stale while the AS is away)."""
        return self._synced.is_set()

    @property
    def check_interval(self) -> int:
        """Clock seconds between the polls behind Observe (WatchPolicy.check_interval)."""
        return self._policy.check_interval

    @property
    def confirmed_at(self) -> int | None:
        """Clock time of the last answer or notification from the AS that this watcher's
        state was current; None before the first. A verifier refuses tokens once this is
        older than its staleness bound (fail closed)."""
        return self._confirmed_at

    async def start(self, *, wait: bool = True) -> None:
        """Start observing. With `wait`, return once the first state is in, or raise
        ServiceUnreachable (and stop) if the first attempt fails."""
        if self._task is not None:
            return
        self._first_failure = None
        self._failed.clear()
        self._task = asyncio.create_task(self._run(), name=f"watch {self.uri}")
        if not wait:
            return
        waiters = [
            asyncio.create_task(self._synced.wait()),
            asyncio.create_task(self._failed.wait()),
        ]
        try:
            await asyncio.wait({*waiters, self._task}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The caller gave up on the start: the loop it began ends too, then it propagates.
            await self.stop()
            raise
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if not self._synced.is_set():
            reason = self._first_failure or "no answer"
            await self.stop()
            raise ServiceUnreachable(
                f"{self.uri}: {reason}",
                retry_at=self._clock.now(),
                host=self._base.split("://", 1)[-1],
            )

    async def stop(self) -> None:
        """Stop observing and wait until the loop has ended. Raises nothing: an error that
        ended the loop is logged; a caller's cancellation propagates."""
        task, self._task = self._task, None
        if task is None:
            return
        # Cancel until it ends: Python 3.11's asyncio.wait_for loses a cancellation that
        # arrives as its inner future completes (gh-86296), and the loop would run on.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: stopped after an error: %r", self.uri, task.exception())

    async def __aenter__(self) -> Observer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def reregister(self) -> None:
        """Drop the current observation and register again now. Raises nothing."""
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._observe()
            except (Failure, Exception) as failure:
                if not isinstance(failure, Failure):
                    log.exception("%s: unexpected error", self.uri)
                self._failures += 1
                if not self._synced.is_set() and self._first_failure is None:
                    self._first_failure = str(failure)
                    self._failed.set()
                delay = self._policy.backoff_delay(self._failures, self._rng)
                if isinstance(failure, Failure) and failure.retry_after is not None:
                    delay = max(delay, failure.retry_after)
                self.retry_at = self._clock.now() + max(1, round(delay))
                log.warning("%s: %s; retrying in %.0f s", self.uri, failure, delay)
                await self._sleep_until(self.retry_at)

    async def _sleep_until(self, when: int) -> None:
        while self._clock.now() < when and not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._policy.poll_interval)

    async def _observe(self) -> None:
        self._wake.clear()
        self.registrations += 1
        request, first = await self._send(self._observe_message)
        self._registered_under = self._handshakes()
        consumer: asyncio.Task[None] | None = None
        try:
            await self._registered(first)
            self._next_check = self._clock.now() + self._policy.check_interval
            self._synced.set()
            if self._ended_in_a_row == 0:
                # Observations that keep ending at once do not reset the back-off.
                self._failures = 0
            self.retry_at = None
            if first.opt.observe is None:
                await self._poll_unobserved()
                return
            self._declined_in_a_row = 0
            self.observe_retry_at = None
            queue: asyncio.Queue[object] = asyncio.Queue()
            consumer = asyncio.create_task(_consume(request.observation, queue))
            while True:
                if self._wake.is_set():
                    return
                now = self._clock.now()
                if now >= self._deadline:
                    # RFC 7641 §3.3.1: no fresh notification within Max-Age; the AS may have
                    # restarted and forgotten us.
                    log.info("%s: notification overdue; re-registering", self.uri)
                    return
                if now >= self._next_check:
                    self._next_check = now + self._policy.check_interval
                    if await self._check():
                        # The state changed without a notification: the observation is lost.
                        log.info("%s: change seen by polling; re-registering", self.uri)
                        return
                    if self._handshakes() != self._registered_under:
                        # The poll met an AS without our OSCORE context: it restarted, and
                        # our observation went with it.
                        log.info("%s: new OSCORE context; re-registering", self.uri)
                        return
                    self._ended_in_a_row = 0
                try:
                    item = await asyncio.wait_for(queue.get(), self._policy.poll_interval)
                except TimeoutError:
                    continue
                if item is _ENDED:
                    # Re-register at once: an observation the AS ended (or that an error
                    # ended) leaves us blind, and a back-off would keep us blind. Twice in a
                    # row with no notification between is a failure, and backs off.
                    self._ended_in_a_row += 1
                    if self._ended_in_a_row > 1:
                        raise Failure("observation ended")
                    log.info("%s: observation ended; re-registering", self.uri)
                    return
                assert isinstance(item, aiocoap.Message)
                self._ended_in_a_row = 0
                await self._notified(item)
        finally:
            if consumer is not None:
                consumer.cancel()
                await asyncio.wait({consumer})
            abandon(request)

    async def _poll_unobserved(self) -> None:
        """The AS answered the registration without Observe (RFC 7641 §4.1: its observer
        limits). Its answer is taken; poll every check_interval (sooner when that answer's
        Max-Age runs out) and return, to register again, once the back-off has passed. Raises
        Failure when a poll gets no answer."""
        self.declined += 1
        self._declined_in_a_row += 1
        delay = self._policy.observe_retry_delay(self._declined_in_a_row, self._rng)
        self.observe_retry_at = register_at = self._clock.now() + delay
        log.info("%s: not observed; polling, registering again in %d s", self.uri, delay)
        poll_at = min(self._next_check, self._deadline)
        while not self._wake.is_set():
            now = self._clock.now()
            if now >= register_at:
                return
            if now >= poll_at:
                await self._check()
                now = self._clock.now()
                self._next_check = now + self._policy.check_interval
                # At most one poll per clock second, whatever Max-Age says.
                poll_at = max(now + 1, min(self._next_check, self._deadline))
            await self._sleep_until(min(poll_at, register_at))

    def _handshakes(self) -> int:
        return 0 if self._channel is None else self._channel.handshakes

    async def _send(
        self, build: Callable[[], aiocoap.Message]
    ) -> tuple[aiocoap.protocol.Request, aiocoap.Message]:
        """Send `build()` (over the channel, if any); the request and its first answer. Plain
        CoAP answers the AS's Echo challenge (RFC 9175 §2.4: it verifies our address before
        answering with more than 3x our request, or registering us as an observer)."""
        try:
            if self._channel is None:
                return await request_answering_echo(
                    _RetrievingContext(self._context),
                    build,
                    timeout=self._policy.request_timeout,
                )
            return await self._channel.request(build, timeout=self._policy.request_timeout)
        except (TimeoutError, aiocoap.error.ConRetransmitsExceeded):
            raise Failure("no answer") from None
        except ChannelRefused as refused:
            raise Failure(refused.description) from None
        except aiocoap.error.Error as exc:
            raise Failure(type(exc).__name__) from None

    async def _get(self, uri: str) -> aiocoap.Message:
        """A GET without observe."""

        def build() -> aiocoap.Message:
            message = aiocoap.Message(code=aiocoap.GET, uri=uri, transport_tuning=self._tuning)
            self._decorate(message)
            return message

        _, response = await self._send(build)
        return response

    def _fresh_until(self, response: aiocoap.Message) -> None:
        """Note when an answer of the AS goes stale (its Max-Age)."""
        max_age = response.opt.max_age
        fresh = DEFAULT_MAX_AGE if max_age is None else max_age
        self._deadline = self._clock.now() + max(fresh, self._policy.min_freshness)

    def _confirm(self) -> None:
        """The state held is now the AS's (applied in full, or confirmed unchanged)."""
        self._confirmed_at = self._clock.now()

    # -- what each watcher fills in -----------------------------------------------------------

    def _observe_message(self) -> aiocoap.Message:
        message = aiocoap.Message(
            code=aiocoap.GET, uri=self.uri, observe=0, transport_tuning=self._tuning
        )
        self._decorate(message)
        return message

    def _decorate(self, message: aiocoap.Message) -> None:
        """Add options (Accept, ETag) to a request."""

    async def _registered(self, response: aiocoap.Message) -> None:
        """Handle the first response of a registration; raise Failure if unusable."""
        raise NotImplementedError

    async def _notified(self, notification: aiocoap.Message) -> None:
        raise NotImplementedError

    async def _check(self) -> bool:
        """The poll behind Observe: fetch the state with a plain GET and take it; True if it
        had changed without a notification. Raise Failure if the AS does not answer."""
        raise NotImplementedError


class _RetrievingContext:
    """The aiocoap context as request_answering_echo uses it (`request`), retrieving the
    outcome of each block-wise request's runner task when it ends (module docstring): what
    the request failed with reaches us through its response; the runner's second error is
    only logged at debug level."""

    def __init__(self, context: aiocoap.Context) -> None:
        self._context = context

    def request(self, message: aiocoap.Message, **kwargs: object) -> aiocoap.protocol.Request:
        request = self._context.request(message, **kwargs)
        # aiocoap's BlockwiseRequest keeps its runner task here (0.4.17); other request
        # kinds have none.
        runner = getattr(request, "_runner", None)
        if isinstance(runner, asyncio.Future):
            runner.add_done_callback(_retrieve)
        return request


def _retrieve(task: asyncio.Future[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("block-wise runner ended with %r", task.exception())


async def _consume(
    observation: aiocoap.protocol.ClientObservation, queue: asyncio.Queue[object]
) -> None:
    try:
        async for notification in observation:
            queue.put_nowait(notification)
    except aiocoap.error.Error:
        pass
    finally:
        queue.put_nowait(_ENDED)


def expect(response: aiocoap.Message, content_format: int, what: str) -> bytes:
    if response.code != aiocoap.CONTENT:
        raise Failure(f"{what} answered {response.code}", retry_hint(response))
    if response.opt.content_format != content_format:
        raise Failure(f"{what} answered content format {response.opt.content_format}")
    return bytes(response.payload)
