"""Echo (RFC 9175) address verification and the amplification bound (RFC 7252 §11.3, RFC 9175
§2.4), for every server here: the AS and device_client's resource server.

A source address that has not shown it receives our datagrams is *unverified*. An unprotected
answer to it is at most AMPLIFICATION_FACTOR times its request (datagram sizes, RFC 7252 §3);
a larger one is replaced by a 4.01 Unauthorized carrying an Echo option (252) and no payload.
A request that returns a fresh Echo value issued for its own address is answered, and its
address counts as verified for a while. Observe registrations from unverified addresses get
the Echo at once, and so do requests that change state when rendered (`echo_first`): their
answer must not be rendered and then withheld.

Echo values are stateless (RFC 9175 Appendix A, the integrity-protected timestamp): 4 bytes
of the clock and 8 bytes of HMAC-SHA-256 over them and the source IP address, under a key of
the server's (derived from the master key on the AS, so every instance accepts every other's).

Answers to unverified addresses go out piggybacked or NON, never as a separate CON that would
be retransmitted. OSCORE-protected requests pass (their peer is authenticated), but an
unprotected refusal of one (a context not found, a replay) loses its payload if it would
exceed the bound.

The client side is `request_answering_echo`: what device_client and the AS's own EDHOC
initiator use for every unprotected request.

Pure but for aiocoap: no store, no service.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import hmac
import ipaddress
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import aiocoap

from coap_auth.addresses import address_key
from coap_auth.clock import Clock
from coap_auth.udp import DropLog, source_host

log = logging.getLogger("coap_auth.echo")

# While an unprotected request that does not prove its source (no fresh Echo value, not from
# verified_networks) is rendered: the Echo challenge to answer it with (else None). Its sender
# may be forged, so what is logged about it is rate-limited (one line per kind and minute),
# and what it spends of a per-address budget is a budget of its own, past which it gets the
# challenge: forged requests must neither flood the log nor spend the budget of the address
# they name.
unverified_source: contextvars.ContextVar[Callable[[], aiocoap.Message] | None] = (
    contextvars.ContextVar("unverified_source", default=None)
)

# RFC 7252 §11.3, RFC 9175 §2.4: a response to an unverified source is at most this many times
# the size of its request.
AMPLIFICATION_FACTOR = 3
TIMESTAMP_BYTES = 4
MAC_BYTES = 8
ECHO_VALUE_BYTES = TIMESTAMP_BYTES + MAC_BYTES
# How long (s) an Echo value may be returned after it was issued: a round trip and a
# retransmission or two, with room for a slow device.
ECHO_VALUE_LIFETIME = 60
# How far (s) the clock of the instance that issued a value may be ahead of this one's.
CLOCK_SKEW = 5
# Defaults of the verified-address table (settings override them on the AS).
VERIFIED_LIFETIME = 3600
MAX_VERIFIED = 100_000
# At most this many verified addresses per address_key() (an IPv6 /64): one subnet holds 2^64
# addresses, and must not push every other verified address out of the table.
MAX_VERIFIED_PER_PREFIX = 64
# Where a spoofed source cannot come from: the kernel drops datagrams from the outside that
# claim a loopback source (martians), so loopback peers count as verified.
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


def datagram_size(message: aiocoap.Message, token_length: int) -> int:
    """The size of `message` as a datagram with a message token of `token_length` bytes
    (RFC 7252 §3: 4-byte header, token, options, payload marker and payload)."""
    payload = len(message.payload)
    return 4 + token_length + len(message.opt.encode()) + (payload + 1 if payload else 0)


def request_size(request: aiocoap.Message) -> int:
    """The size of a received request, as re-encoded (never more than what arrived)."""
    return datagram_size(request, len(request.token))


def within_bound(
    response: aiocoap.Message, request: aiocoap.Message, *, size: int | None = None
) -> bool:
    """Whether `response`, sent for `request`, is within the amplification bound; `size` is
    the request's size as received when it was measured before rendering (a site may grow
    the request it routes: aiocoap expands Uri-Path-Abbrev in place)."""
    limit = AMPLIFICATION_FACTOR * (request_size(request) if size is None else size)
    return datagram_size(response, len(request.token)) <= limit


class EchoValues:
    """Issues and checks stateless Echo values bound to a source IP address."""

    def __init__(self, key: bytes, clock: Clock, lifetime: int = ECHO_VALUE_LIFETIME) -> None:
        if len(key) < 16:
            raise ValueError("an Echo key has at least 16 bytes")
        self._key = key
        self.clock = clock
        self.lifetime = lifetime

    def issue(self, host: str) -> bytes:
        """A fresh Echo value for requests from `host` (an IP address as source_host gives)."""
        stamp = struct.pack(">I", self.clock.now() & 0xFFFFFFFF)
        return stamp + self._mac(stamp, host)

    def check(self, value: bytes | None, host: str) -> bool:
        """Whether `value` is an Echo value issued for `host` within the lifetime."""
        if value is None or len(value) != ECHO_VALUE_BYTES:
            return False
        stamp, mac = value[:TIMESTAMP_BYTES], value[TIMESTAMP_BYTES:]
        if not hmac.compare_digest(mac, self._mac(stamp, host)):
            return False
        age = (self.clock.now() - int.from_bytes(stamp, "big")) & 0xFFFFFFFF
        # A value from an instance whose clock is a little ahead is "from the future" here.
        return age <= self.lifetime or age >= (1 << 32) - CLOCK_SKEW

    def _mac(self, stamp: bytes, host: str) -> bytes:
        return hmac.new(self._key, stamp + _host_bytes(host), hashlib.sha256).digest()[:MAC_BYTES]


class VerifiedAddresses:
    """Source IP addresses that returned an Echo value, each for `lifetime` seconds, at most
    `max_entries` (least recently verified go first) and `per_prefix` per address_key();
    addresses in `networks` are always verified."""

    def __init__(
        self,
        clock: Clock,
        *,
        lifetime: int = VERIFIED_LIFETIME,
        max_entries: int = MAX_VERIFIED,
        per_prefix: int = MAX_VERIFIED_PER_PREFIX,
        networks: Iterable[str] = LOOPBACK_NETWORKS,
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.max_entries = max_entries
        self.per_prefix = per_prefix
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        # host -> verified until, least recently verified first; and the same hosts by
        # address_key(), least recently verified first in each.
        self._until: OrderedDict[str, int] = OrderedDict()
        self._by_prefix: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def is_verified(self, host: str) -> bool:
        if self.in_networks(host):
            return True
        until = self._until.get(host)
        if until is None:
            return False
        if until > self.clock.now():
            return True
        self._drop(host)
        return False

    def verify(self, host: str) -> None:
        """`host` returned an Echo value: verified for `lifetime` seconds from now."""
        if self.in_networks(host):
            return
        now = self.clock.now()
        while self._until:  # the expired first: they are the least recently verified
            oldest, until = next(iter(self._until.items()))
            if until > now:
                break
            self._drop(oldest)
        prefix = address_key(host)
        if host in self._until:
            self._until.move_to_end(host)
            self._by_prefix[prefix].move_to_end(host)
        else:
            mine = self._by_prefix.get(prefix)
            if mine is not None and len(mine) >= self.per_prefix:
                self._drop(next(iter(mine)))  # the subnet's least recently verified
            while len(self._until) >= self.max_entries:
                self._drop(next(iter(self._until)))
            self._by_prefix.setdefault(prefix, OrderedDict())[host] = None
        self._until[host] = now + self.lifetime

    def _drop(self, host: str) -> None:
        if self._until.pop(host, None) is None:
            return
        prefix = address_key(host)
        mine = self._by_prefix[prefix]
        del mine[host]
        if not mine:
            del self._by_prefix[prefix]

    def in_networks(self, host: str) -> bool:
        """Whether `host` is in the always-verified networks."""
        return bool(self.networks) and _in_networks(host, self.networks)


class AmplificationGuard:
    """A server site in front of another, keeping every answer to an unverified source within
    the bound (module docstring). `echo_first(request)` names the unprotected requests that
    must come from a verified address before they are rendered at all."""

    def __init__(
        self,
        site: Any,
        echo: EchoValues,
        verified: VerifiedAddresses,
        *,
        echo_first: Callable[[aiocoap.Message], bool] = lambda request: False,
    ) -> None:
        self.site = site
        self.echo = echo
        self.verified = verified
        self.echo_first = echo_first
        # How many requests were answered with an Echo challenge (for tests and metrics).
        self.challenges = 0
        self._log = DropLog(log, echo.clock, what="Echo challenge to", level=logging.INFO)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.site, name)

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        # Measured before anything renders it (aiocoap's Site grows a request in place when it
        # expands Uri-Path-Abbrev: an outsider test drew 8.4x that way).
        size = request_size(request)
        host = source_host(request)
        echoed = self.echo.check(request.opt.echo, host)
        if echoed:
            self.verified.verify(host)
        # This very request shows it comes from `host` (or `host` cannot be forged).
        proven = echoed or self.verified.in_networks(host)
        protected = request.opt.oscore is not None
        if (
            not protected
            and request.opt.observe == 0
            and request.code in (aiocoap.GET, aiocoap.FETCH)
        ):
            # An observation lasts, and its notifications go to the registering endpoint: a
            # registration carries a fresh Echo value of its own (a verified address is not
            # enough: a forged registration from it, to any port, would take its places and
            # have notifications sent there), unless it comes from verified_networks.
            if proven:
                await self.site.render_to_pipe(pipe)
            else:
                pipe.add_response(self.challenge(request, size), is_last=True)
            return
        verified = proven or self.verified.is_verified(host)
        if protected:
            # Authenticated if it verifies; from an unverified source, a refusal of one that
            # does not is capped.
            if verified:
                await self.site.render_to_pipe(pipe)
            else:
                await self.site.render_to_pipe(_BoundedPipe(pipe, self, size, strip_only=True))
            return
        if proven:
            await self.site.render_to_pipe(pipe)
            return
        if not verified and self.echo_first(request):
            pipe.add_response(self.challenge(request, size), is_last=True)
            return
        # Not proven by this request: forgeable, even from a verified address (which only
        # lifts the bound). Its log lines and its per-address budget are those of an unproven
        # sender (unverified_source), so forgers neither flood the log nor spend the
        # address's budget, past which they get the challenge (an outsider test spent a
        # verified device's budget with 125 forged datagrams a minute).
        target = pipe if verified else _BoundedPipe(pipe, self, size, strip_only=False)
        marked = unverified_source.set(functools.partial(self.challenge, request, size))
        try:
            await self.site.render_to_pipe(target)
        finally:
            unverified_source.reset(marked)

    def challenge(self, request: aiocoap.Message, size: int | None = None) -> aiocoap.Message:
        """The 4.01 Unauthorized with a fresh Echo value for the request's source (`size`:
        the request's, as received); for a request too small for even that to fit the bound
        (a handful of bytes, no Uri-Path), a bare 4.01 (header and token: never more than the
        request)."""
        host = source_host(request)
        self.challenges += 1
        self._log.dropped("address not verified", (host,))
        response = aiocoap.Message(code=aiocoap.UNAUTHORIZED)
        response.opt.echo = self.echo.issue(host)
        # Not to be reused from a cache (RFC 7252 §5.10.5), when there is room for it.
        response.opt.max_age = 0
        if not within_bound(response, request, size=size):
            response.opt.max_age = None
        if not within_bound(response, request, size=size):
            response = aiocoap.Message(code=aiocoap.UNAUTHORIZED)
        # Piggybacked on the ACK of a CON request, else NON (RFC 9175 §2.4).
        response.mtype = aiocoap.NON
        return response


class _BoundedPipe:
    """A pipe whose responses are held to the bound: NON unless piggybacked, and either
    replaced by the Echo challenge or (`strip_only`) stripped of their payload when too
    large."""

    def __init__(
        self, pipe: Any, guard: AmplificationGuard, size: int, *, strip_only: bool
    ) -> None:
        self._pipe = pipe
        self._guard = guard
        self._strip_only = strip_only
        self.request = pipe.request
        # As received, and its size then: aiocoap's Site sets `request` to a copy without the
        # Uri-Path it routed by, and may expand Uri-Path-Abbrev into the request in place.
        self._received = pipe.request
        self._size = size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def add_response(self, response: aiocoap.Message, is_last: bool = False) -> None:
        request = self._received
        if self._strip_only:
            if response.opt.oscore is not None:
                # Protected: its request authenticated the peer, which may be sent a CON (the
                # periodic one of an observation, RFC 7641 §4.5).
                self._pipe.add_response(response, is_last)
                return
            if not within_bound(response, request, size=self._size):
                response.payload = b""
                response.opt.content_format = None
        elif not within_bound(response, request, size=self._size):
            response, is_last = self._guard.challenge(request, self._size), True
        # Piggybacked on the ACK of a CON request when sent at once; otherwise NON, never a
        # separate CON that aiocoap would retransmit up to four times.
        response.mtype = aiocoap.NON
        self._pipe.add_response(response, is_last)


def is_echo_challenge(response: aiocoap.Message) -> bool:
    """Whether `response` asks the client to repeat its request with an Echo value (RFC 9175
    §2.3: a 4.01 Unauthorized carrying an Echo option)."""
    return response.code == aiocoap.UNAUTHORIZED and response.opt.echo is not None


async def request_answering_echo(
    context: Any, build: Callable[[], aiocoap.Message], *, timeout: float | None = None
) -> tuple[Any, aiocoap.Message]:
    """Send `build()` over the aiocoap `context`; when the answer is an Echo challenge (the
    server has not verified our address yet), send a fresh `build()` once more carrying the
    Echo value (RFC 9175 §2.3). Returns the aiocoap request (for an observation) and its
    answer; a challenged Observe registration leaves no observation behind, nor does one that
    fails. Raises TimeoutError when the answers take over `timeout` s in all, the challenge
    and the repeat together (None: aiocoap's own limits): a server that challenges just
    before the deadline gets no second full one. What aiocoap raises (network errors)
    passes; cancellation propagates."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    request = context.request(build())
    try:
        response = await _answer(request, deadline)
        if not is_echo_challenge(response):
            return request, response
        _let_go(request)
        repeat = build()
        repeat.opt.echo = response.opt.echo
        request = context.request(repeat)
        return request, await _answer(request, deadline)
    except BaseException:
        _let_go(request)
        raise


async def _answer(request: Any, deadline: float | None) -> aiocoap.Message:
    async with asyncio.timeout_at(deadline):
        response: aiocoap.Message = await request.response
    return response


def _let_go(request: Any) -> None:
    """End the observation a request began, if it has one still running."""
    observation = getattr(request, "observation", None)
    if observation is not None and not observation.cancelled:
        observation.cancel()


@functools.lru_cache(maxsize=65_536)  # parsing an address is ~10 µs; hosts repeat
def _in_networks(host: str, networks: tuple[Any, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return any(address in network for network in networks)


def _host_bytes(host: str) -> bytes:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).packed
    except ValueError:
        return host.encode()
