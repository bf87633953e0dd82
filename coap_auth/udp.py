"""aiocoap 0.4.17's UDP transport (`transports/udp6.py`), fixed where a stranger can hurt us:
an ICMP error reaches only the peer it is about, and a bad datagram costs one log line.

Shared by the AS (coap_auth.coap) and devices (device_client, which re-exports the two context
constructors): like the secure-channel code DESIGN.md places under coap_auth/, it is used on
both sides, imports aiocoap, and imports no store, service or CLI.

The flaw. With IPV6_RECVERR/IP_RECVERR on (aiocoap sets both), Linux queues each ICMP error
on the socket's error queue, addressed, and *also* leaves it pending on the socket; the next
sendmsg() to any peer then fails with it (ECONNREFUSED) and sends nothing. aiocoap's transport
(util/asyncio/recvmsg.py `sendmsg`, udp6.py `send` and `error_received`) reports that failure
as an error of the peer being sent to: that peer's requests fail and its observation is
cancelled, inside the pipe event that was sending, which then dies with a TypeError
(pipe.py `_add_event`). A stranger who registers Observe from sockets it then closes makes the
AS drop an honest observer's notification and observation; the same happens to a device's
requests and observations whenever a send to the AS follows one to a peer that is gone.

The fix. A failed send is retried at once (the failure consumed the pending error); only an
error that every attempt reports, and that a send can report about its own destination (no
route, prohibited, too large), is that peer's, and it is reported after the send has returned.
Every other ICMP error reaches its peer through the error queue (aiocoap's
`datagram_errqueue_received`, which reads the address the error is about) on a client context.
A server context ignores ICMP errors altogether: they are unauthenticated, and anyone who can
send ICMP to the AS could otherwise name an honest observer in a forged "port unreachable" and
have its observation dropped without a word (found by an outsider test: three forged datagrams
delayed a key withdrawal at a resource server from 1 s to 30 s). A gone observer is still
dropped when a confirmable notification goes unacknowledged or is answered with RST
(RFC 7641 §4.5).

Servers made here also refuse a request with a critical option they do not process with 4.02
Bad Option (RFC 7252 §5.4.1), which aiocoap's Site does not do. `error_message` is how both sides
render one of our errors as a CoAP response.

Server sockets share their port with another process only when asked (`reuse_port`, for
`coap-auth serve --workers`), not whenever aiocoap would: coap_auth.server_socket binds them,
and raises its BindError, one line naming address:port, when that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap.message import Direction
from aiocoap.numbers import COAP_PORT, OptionNumber
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress
from aiocoap.util.asyncio.getaddrinfo_addrconfig import getaddrinfo_routechecked

from coap_auth.clock import Clock, SystemClock
from coap_auth.errors import BadOption, CoapAuthError
from coap_auth.exchanges import RememberedExchanges
from coap_auth.server_socket import Resolver, bind_server_socket

# What a send can report about its own datagram: no route, a route or firewall prohibiting
# it, too large, an address the socket cannot use. ECONNREFUSED is not among them: for an
# unconnected socket it is always the pending error of an earlier datagram.
ERRORS_ABOUT_THIS_DATAGRAM = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EACCES,
        errno.EPERM,
        errno.EMSGSIZE,
        errno.EINVAL,
        errno.EADDRNOTAVAIL,
        errno.EAFNOSUPPORT,
    }
)
# The datagram is lost locally (buffers full), as it could be on the wire: nobody's fault.
LOCAL_LOSS = frozenset({errno.EAGAIN, errno.ENOBUFS})
SEND_ATTEMPTS = 3
# A server socket's receive buffer: a crowd answering at once (a notified crowd fetching its
# second blocks, its ACKs) must not be dropped by the kernel. Linux caps it at
# net.core.rmem_max (often 208 KiB: raise that sysctl where bursts of thousands are expected).
SERVER_RECEIVE_BUFFER = 2 * 1024 * 1024
# One log line per kind of dropped datagram per this many seconds.
DROP_LOG_INTERVAL = 60
# RFC 7252 §5.4.6: an odd option number is critical. These are the critical options aiocoap's
# Site and our resources act on (Uri-Path-Abbrev is resolved by the Site); any other one in a
# request is refused with 4.02.
PROCESSED_CRITICAL_OPTIONS = frozenset(
    {
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_PATH_ABBREV,
        OptionNumber.URI_QUERY,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK2,
        OptionNumber.BLOCK1,
    }
)


def bad_option(request: aiocoap.Message) -> BadOption | None:
    """The 4.02 error for a request with critical options nothing here processes, or None."""
    numbers = {int(option.number) for option in request.opt.option_list()}
    unprocessed = sorted(n for n in numbers if n & 1 and n not in PROCESSED_CRITICAL_OPTIONS)
    if not unprocessed:
        return None
    return BadOption(f"critical option {' '.join(map(str, unprocessed))} not processed")


def error_message(error: CoapAuthError, *, compact: bool = False) -> aiocoap.Message:
    """`error` as a CoAP response: its code and body, Max-Age when it says when to retry
    (RFC 7252 §5.9.3.4, RFC 8516), Size1 when it names the size accepted (RFC 7959 §4)."""
    code, content_format, payload = error.render(compact=compact)
    message = aiocoap.Message(
        code=aiocoap.Code(code), payload=payload, content_format=content_format
    )
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        message.opt.max_age = retry_after
    size1 = getattr(error, "size1", None)
    if size1 is not None:
        message.opt.size1 = size1
    return message


class CriticalOptionGuard:
    """A server site in front of another: 4.02 Bad Option (RFC 9290 problem details) for a
    request with an unprocessed critical option, everything else to the site behind it."""

    def __init__(self, site: Any) -> None:
        self.site = site

    async def render_to_pipe(self, pipe: Any) -> None:
        error = bad_option(pipe.request)
        if error is None:
            await self.site.render_to_pipe(pipe)
            return
        pipe.add_response(error_message(error), is_last=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.site, name)


@dataclass(slots=True)
class _Window:
    start: int
    suppressed: int = 0


class DropLog:
    """One warning per kind of dropped datagram per `interval` seconds; the ones in between
    are counted and the count goes into the next line of that kind. The line names the kind
    and the sender's address, never the datagram's content (it may carry a secret)."""

    def __init__(
        self,
        log: logging.Logger,
        clock: Clock,
        interval: int = DROP_LOG_INTERVAL,
        *,
        what: str = "dropped a datagram from",
        level: int = logging.WARNING,
    ) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self.what = what  # the start of each line, before the sender's address
        self.level = level
        # Kinds are a fixed set of phrases (plus exception class names): bounded.
        self._windows: dict[str, _Window] = {}

    def dropped(self, kind: str, address: Any) -> None:
        now = self.clock.now()
        window = self._windows.get(kind)
        if window is not None and window.start <= now < window.start + self.interval:
            window.suppressed += 1
            return
        earlier = window.suppressed if window is not None else 0
        self._windows[kind] = _Window(now)
        more = f"; {earlier} more since the last such line" if earlier else ""
        self.log.log(self.level, "%s %s: %s%s", self.what, _host(address), kind, more)


class UDP6(MessageInterfaceUDP6):
    """aiocoap's udp6 message interface with errors attributed to the right peer, bad
    datagrams dropped quietly, and server sockets shared only when asked (see the module
    docstring)."""

    @classmethod
    async def create_server_transport_endpoint(
        cls,
        ctx: Any,
        log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        bind: tuple[str, int | None] | None,
        multicast: list[Any],
        *,
        reuse_port: bool = False,
    ) -> UDP6:
        host, port = bind or ("::", None)
        sock = await bind_server_socket(
            (host, COAP_PORT if port is None else port),
            log,
            _resolver(log),
            reuse_port=reuse_port,
        )
        try:
            created: UDP6 = await cls._create_transport_endpoint(sock, ctx, log, loop, multicast)
        except BaseException:
            sock.close()
            raise
        return created

    def __init__(self, ctx: Any, log: logging.Logger, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(ctx, log, loop)
        self.drops = DropLog(log, SystemClock())
        # Whether ICMP errors from the error queue end the exchanges with the peer they name
        # (a client's requests); a server ignores them (see the module docstring).
        self.trust_icmp = True

    def datagram_errqueue_received(
        self, data: bytes, ancdata: list[Any], flags: int, address: Any
    ) -> None:
        if not self.trust_icmp:
            self.log.debug("ICMP error about %s ignored (unauthenticated)", _host(address))
            return
        super().datagram_errqueue_received(data, ancdata, flags, address)

    def send(self, message: aiocoap.Message) -> None:
        remote = message.remote
        ancdata = []
        if remote.pktinfo is not None:
            ancdata.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, remote.pktinfo))
        data = message.encode()
        sock = self.transport.get_extra_info("socket")
        failures: list[OSError] = []
        for _ in range(SEND_ATTEMPTS):
            try:
                sock.sendmsg((data,), ancdata, 0, remote.sockaddr)
                return
            except OSError as exc:
                failures.append(exc)
                if exc.errno in LOCAL_LOSS:
                    break
        # Each failed attempt consumed one pending error. Only an error every attempt
        # reports, and that a send can report about its own destination, is this peer's.
        first = failures[0].errno
        if (
            len(failures) == SEND_ATTEMPTS
            and first in ERRORS_ABOUT_THIS_DATAGRAM
            and all(f.errno == first for f in failures)
        ):
            # Not from inside send(): that runs within the event of the pipe being answered,
            # which aiocoap cannot end reentrantly (its pipe.py TypeError).
            self.loop.call_soon(self._report, failures[-1], remote)
        else:
            self.log.debug("datagram to %s not sent: %s", _host(remote.sockaddr), failures[-1])

    def _report(self, exc: OSError, remote: UDP6EndpointAddress) -> None:
        ctx = getattr(self, "_ctx", None)  # gone once the interface is shut down
        if ctx is not None:
            ctx.dispatch_error(exc, remote)

    def error_received(self, exc: Exception) -> None:
        # Only receive-side socket errors come here (send() handles its own): the pending
        # error an ICMP message left behind. It names no peer; the error queue delivers the
        # same error with its address, so nothing is dispatched from here.
        self.log.debug("socket error without an address (the error queue has it): %s", exc)

    def datagram_msg_received(
        self, data: bytes, ancdata: list[Any], flags: int, address: Any
    ) -> None:
        pktinfo = next(
            (
                value
                for level, kind, value in ancdata
                if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
            ),
            None,
        )
        remote = UDP6EndpointAddress(address, self, pktinfo=pktinfo)
        try:
            message = aiocoap.Message.decode(data, remote)
        except Exception as exc:  # untrusted bytes: whatever fails to decode is dropped
            self.drops.dropped(_decode_failure(exc), address)
            return
        if not _code_fits_type(message):
            # aiocoap would log a warning per datagram for these.
            self.drops.dropped("code and type do not fit", address)
            return
        message.direction = Direction.INCOMING
        if message.mtype == aiocoap.CON and message.code.is_request():
            refusal = self._check_exchange(message, remote, len(data))
            if refusal is not None:
                self.drops.dropped(refusal, address)
                return
        try:
            self._ctx.dispatch_message(message)
        except Exception as exc:
            # A datagram aiocoap fails on: the class of failure, never a traceback per datagram.
            self.drops.dropped(f"aiocoap failed on it ({type(exc).__name__})", address)

    def _check_exchange(self, message: aiocoap.Message, remote: Any, length: int) -> str | None:
        """Why a confirmable request must be dropped before aiocoap sees it, or None.

        RFC 7252 §4.5: a duplicate is the same message again. aiocoap takes any datagram with
        the endpoint and message id of one it remembers for a duplicate, and sends it the
        remembered answer: a 4-byte datagram would draw an answer sized for the request it
        was for, past the amplification bound (RFC 9175 §2.4; found by an outsider test:
        49x). So a duplicate must be as long as the request first received (a real
        retransmission is byte for byte the same)."""
        recent = getattr(self._ctx, "_recent_messages", None)
        if not isinstance(recent, RememberedExchanges):  # a client's: nothing to guard
            return None
        key = (remote, message.mid)
        if key in recent:
            if recent.lengths.get(key) != length:
                return "a duplicate message id unlike the request first received"
            return None
        recent.lengths[key] = length  # kept, and forgotten, with aiocoap's entry
        return None


def _decode_failure(exc: Exception) -> str:
    if isinstance(exc, aiocoap.error.UnparsableMessage):
        return "not a CoAP message"
    if isinstance(exc, UnicodeDecodeError):
        return "a string option that is not UTF-8"
    return f"an undecodable option ({type(exc).__name__})"


def _code_fits_type(message: aiocoap.Message) -> bool:
    """What aiocoap's message layer accepts (RFC 7252 §4.2-4.3): an empty message as CON
    (ping), ACK or RST; a request as CON or NON; a response as CON, NON or ACK."""
    code, mtype = message.code, message.mtype
    if code == aiocoap.EMPTY:
        return mtype in (aiocoap.CON, aiocoap.ACK, aiocoap.RST)
    if code.is_request():
        return mtype in (aiocoap.CON, aiocoap.NON)
    if code.is_response():
        return mtype in (aiocoap.CON, aiocoap.NON, aiocoap.ACK)
    return False


def _host(sockaddr: Any) -> str:
    """The IP address of a socket address (an IPv4 peer without its ::ffff: prefix)."""
    return str(sockaddr[0]).removeprefix("::ffff:")


def source_host(message: aiocoap.Message) -> str:
    """The source IP address of a received message (an IPv4 peer of the IPv6 socket without
    its ::ffff: prefix), or "-" when it has none. Raises nothing."""
    sockaddr = getattr(message.remote, "sockaddr", None)
    return _host(sockaddr) if sockaddr else "-"


def _resolver(log: logging.Logger) -> Resolver:
    """aiocoap's resolution of a bind address (udp6.py create_server_transport_endpoint)."""
    loop = asyncio.get_running_loop()
    return lambda host, port: getaddrinfo_routechecked(loop, log, host, port)


async def check_port_free(bind: tuple[str, int], log: logging.Logger) -> None:
    """Raises coap_auth.server_socket.BindError if `bind` cannot be bound without
    SO_REUSEPORT (another process serves it, or it cannot be served at all); binds nothing."""
    (await bind_server_socket(bind, log, _resolver(log))).close()


class ServerContext(aiocoap.Context):
    """aiocoap's Context, with each request's rendering task named plainly. aiocoap names it
    `"Rendering for %r" % request`, formatting the whole request and its addresses (through
    `ipaddress`) for every request it serves: about a fifth of a plain request's CPU, for a
    name nobody reads. Otherwise what `aiocoap.Context.render_to_pipe` does."""

    def render_to_pipe(self, pipe: Any) -> None:
        run_driving_pipe(
            error_to_message(pipe, self.log), self._render_to_pipe(pipe), name=RENDER_TASK
        )


RENDER_TASK = "coap-auth request"


async def create_server_context(
    site: Any,
    bind: tuple[str, int],
    *,
    clock: Clock | None = None,
    check_options: bool = True,
    reuse_port: bool = False,
) -> aiocoap.Context:
    """What `aiocoap.Context.create_server_context(site, bind, transports=["udp6"])` makes,
    on the fixed transport, ignoring ICMP errors, and (with `check_options`) answering 4.02 to
    unprocessed critical options. `clock` times the drop log (default: the system clock). The
    port is shared with other sockets (SO_REUSEPORT, of the same user) only if `reuse_port`.
    Raises coap_auth.server_socket.BindError (an OSError) when the address cannot be
    bound."""
    loop = asyncio.get_running_loop()
    serversite = CriticalOptionGuard(site) if check_options else site
    context = ServerContext(loop=loop, serversite=serversite, loggername="coap-server")

    async def interface(message_manager: Any) -> UDP6:
        created = await UDP6.create_server_transport_endpoint(
            message_manager, context.log, loop, bind, [], reuse_port=reuse_port
        )
        created.trust_icmp = False
        if clock is not None:
            created.drops.clock = clock
        # aiocoap's unbounded memory of recent messages, bounded (RememberedExchanges).
        message_manager._recent_messages = RememberedExchanges()
        sock = created.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # what the kernel allows is a tuning, not a need
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SERVER_RECEIVE_BUFFER)
        return created

    # aiocoap's own constructors build their transports with this method too.
    await context._append_tokenmanaged_messagemanaged_transport(interface)
    return context


async def create_client_context(*, clock: Clock | None = None) -> aiocoap.Context:
    """What `aiocoap.Context.create_client_context(transports=["oscore", "udp6"])` makes
    (coap:// on a random port), on the fixed transport. A request whose URI matches an entry
    of `context.client_credentials` holding an OSCORE context goes out protected under it;
    without lakers-python (no wheel on 32-bit ARM) there is no OSCORE transport. Raises
    OSError when no UDP socket can be opened, RuntimeError without a running event loop."""
    loop = asyncio.get_running_loop()
    context = aiocoap.Context(loop=loop, serversite=None, loggername="coap")

    async def interface(message_manager: Any) -> UDP6:
        created: UDP6 = await UDP6.create_client_transport_endpoint(
            message_manager, log=context.log, loop=loop
        )
        if clock is not None:
            created.drops.clock = clock
        return created

    await context._append_tokenmanaged_messagemanaged_transport(interface)
    for manager in context.request_interfaces:
        if hasattr(manager, "next_token"):
            # aiocoap's tokens count up from a random start, in one or two bytes: a forger who
            # knows a device's address and port could guess the token of its observation and
            # end it with a request on it. Eight random bytes (RFC 9175 §4) cannot be guessed.
            manager.next_token = _random_token
    try:
        from aiocoap.transports.oscore import TransportOSCORE
    except ImportError:  # lakers-python missing: plain CoAP only
        return context
    # First, so that it claims the requests it has a context for; it sends them on through
    # the same context, where the UDP transport takes them.
    context.request_interfaces.insert(0, TransportOSCORE(context, context))
    return context


def _random_token() -> bytes:
    return secrets.token_bytes(8)
