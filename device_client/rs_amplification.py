"""The resource server as a good UDP citizen (RFC 7252 §11.3, RFC 9175 §2.4): what it tells
coap_auth.echo's AmplificationGuard, and AS Request Creation Hints that fit the bound.

The guard (outermost, in front of OSCORE) keeps every unprotected answer to an unverified
source address within 3x its request, replacing a larger one by a 4.01 with an Echo option.
An answer that was rendered has done its work, though: one that leaves state behind (a held
token, a derived OSCORE context, a pending EDHOC handshake) must not then be withheld, or the
client would repeat a request whose effect already happened (RFC 9203's nonce1 would be
refused as reused). Measured with the real credentials, every such answer is far below its
request: /authz-info's 2.01 is at most LARGEST_STATEFUL_ANSWER bytes and a request carrying a
token is larger than that; message_2 (ID_CRED_R by reference, method 3) is about the size of
the message_1 request. So they are rendered first; `leaves_state` makes the guard challenge
first only an unprotected POST to those resources too small for the largest such answer to
fit, which never carries a valid token or message_1, so that the rule holds by construction.

The 4.01 of an unprotected request to a protected resource carries the hints (RFC 9200 §5.3,
all optional); to an unverified source they are cut down until they fit (scope first, then
audience: the AS's URI is the one a client cannot guess), and only when even that does not
fit does the guard's Echo challenge come first, the full hints after the round trip.

EDHOC's pending handshakes are bounded, fairly by address (coap_auth.secure.edhoc): spoofed
addresses each holding one would all tie, and a real device's handshake would be the oldest
to go. So once the responder is under pressure (half its table taken), message_1 from an
unverified address gets the Echo challenge first (`echo_first_for`), and only addresses that
proved themselves add handshakes.

Block-wise uploads (RFC 7959 §2.5) are put together by aiocoap per resource, with no limit of
their own and copying the whole so far for every block: `UploadBound` (inside the OSCORE
layer, so the inner Block1 of a protected request is bounded too) refuses a Block1 request
reaching past the RS's upload cap with 4.13 and Size1 (§2.9.3) before any of it is held,
refuses Block1 on /.well-known/edhoc altogether (EDHOC messages are small), and answers a
block that does not follow the ones held with 4.08 (§2.5) and one log line per minute, where
aiocoap would log a traceback per datagram.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import aiocoap
import cbor2

from coap_auth import untagged
from coap_auth.addresses import network_list as comma_separated_networks
from coap_auth.echo import AMPLIFICATION_FACTOR, VerifiedAddresses, request_size, within_bound
from coap_auth.errors import PayloadTooLarge
from coap_auth.udp import DropLog, error_message, source_host
from coap_auth.wire import ContentFormat
from device_client.clock import Clock
from device_client.rs_common import HINT_AS, HINT_AUDIENCE, HINT_SCOPE

log = logging.getLogger("device_client.rs")

# A device's table of verified addresses: a few clients, each verified for an hour.
MAX_VERIFIED = 1024
VERIFIED_LIFETIME = 3600
# A new random key per process (ResourceServer's default): an Echo value outstanding across
# a restart no longer verifies, and its client gets a fresh challenge.
ECHO_KEY_BYTES = 32
# The largest unprotected answer that leaves state behind, without its message token (which
# the request carries too): a 2.01 from /authz-info with Content-Format 19 and
# {42: nonce2 (8 bytes), 44: ace_server_recipientid (at most 7)} is 29 bytes; a 2.04 with
# message_2 (G_Y 32, C_R at most 8, ID_CRED_R a kid of at most 17, MAC_2 9, two length bytes)
# and Content-Format 64 at most 75. 80 with room to spare.
LARGEST_STATEFUL_ANSWER = 80
_EDHOC_PATH = (".well-known", "edhoc")
_STATEFUL_PATHS = (("authz-info",), _EDHOC_PATH)
# message_1 starts with CBOR true (RFC 9528 Appendix A.2.1; coap_auth.secure.edhoc).
_MESSAGE_1_PREFIX = b"\xf5"
# The largest EDHOC message /.well-known/edhoc takes, as Size1 when refusing Block1 there:
# message_3 is C_R (at most 9 bytes) and a CIPHERTEXT_3 under 256 bytes (2 length bytes).
EDHOC_MESSAGE_BYTES = 267

__all__ = [
    "EDHOC_MESSAGE_BYTES",
    "HintFitting",
    "LARGEST_STATEFUL_ANSWER",
    "MAX_VERIFIED",
    "UploadBound",
    "VERIFIED_LIFETIME",
    "echo_first_for",
    "fitted_hints",
    "hints_message",
    "leaves_state",
    "network_list",
    "starts_handshake",
]


def network_list(networks: str | Iterable[str]) -> tuple[str, ...]:
    """Always-verified networks as a tuple: a comma-separated string ("" for none, parsed as
    the AS's `verified_networks` setting is) or an iterable of CIDR strings. Raises
    ValueError for a string naming something that is not a network (an iterable's bad
    network fails in VerifiedAddresses, with ValueError too)."""
    if isinstance(networks, str):
        return comma_separated_networks(networks)
    return tuple(networks)


def leaves_state(request: aiocoap.Message) -> bool:
    """The guard's `echo_first`: an unprotected POST to /authz-info or /.well-known/edhoc so
    small that the largest answer leaving state behind would not fit its bound (module
    docstring). Raises nothing."""
    if request.code != aiocoap.POST or request.opt.oscore is not None:
        return False
    if tuple(request.opt.uri_path) not in _STATEFUL_PATHS:
        return False
    largest = LARGEST_STATEFUL_ANSWER + len(request.token)
    return AMPLIFICATION_FACTOR * request_size(request) < largest


def starts_handshake(request: aiocoap.Message) -> bool:
    """Whether `request` is an unprotected POST of EDHOC message_1 to /.well-known/edhoc.
    Raises nothing."""
    return (
        request.code == aiocoap.POST
        and request.opt.oscore is None
        and tuple(request.opt.uri_path) == _EDHOC_PATH
        and bytes(request.payload).startswith(_MESSAGE_1_PREFIX)
    )


def echo_first_for(under_pressure: Callable[[], bool]) -> Callable[[aiocoap.Message], bool]:
    """The guard's `echo_first` for an RS: `leaves_state`, and message_1 while
    `under_pressure()` (the EDHOC responder holds half its pending handshakes or more;
    module docstring). Raises nothing but what `under_pressure` raises."""

    def echo_first(request: aiocoap.Message) -> bool:
        return leaves_state(request) or (starts_handshake(request) and under_pressure())

    return echo_first


def hints_message(hints: dict[int, Any]) -> aiocoap.Message:
    """4.01 with AS Request Creation Hints (RFC 9200 §5.3), application/ace+cbor. Raises
    nothing."""
    return aiocoap.Message(
        code=aiocoap.UNAUTHORIZED,
        payload=cbor2.dumps(hints),
        content_format=ContentFormat.ACE_CBOR,
    )


def fitted_hints(response: aiocoap.Message, request: aiocoap.Message) -> aiocoap.Message:
    """`response` if it fits the bound of `request` or carries no hints; else its hints
    without scope, then without audience, whichever fits first; `response` itself when even
    the AS alone does not fit (the guard then sends its Echo challenge instead). Raises
    nothing."""
    hints = _hints_of(response)
    if hints is None or within_bound(response, request):
        return response
    for label in (HINT_SCOPE, HINT_AUDIENCE):
        hints.pop(label, None)
        smaller = hints_message(hints)
        if within_bound(smaller, request):
            return smaller
    return response


def _hints_of(response: aiocoap.Message) -> dict[int, Any] | None:
    if response.code != aiocoap.UNAUTHORIZED or response.opt.oscore is not None:
        return None
    if response.opt.content_format != ContentFormat.ACE_CBOR:
        return None
    try:
        hints = untagged.loads(response.payload)
    except Exception:  # cbor2 raises more than CBORDecodeError on odd input
        return None
    return hints if isinstance(hints, dict) and HINT_AS in hints else None


class HintFitting:
    """A server site in front of another (inside the amplification guard): the 4.01 with
    hints to an unprotected request from an unverified source address is cut down to fit
    (`fitted_hints`). It works on the request as it arrived: a resource sees it with its
    Uri-Path stripped (aiocoap's Site), smaller than what the bound is taken on."""

    def __init__(self, site: Any, verified: VerifiedAddresses) -> None:
        self.site = site
        self.verified = verified

    def __getattr__(self, name: str) -> Any:
        return getattr(self.site, name)

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if request.opt.oscore is not None or self.verified.is_verified(source_host(request)):
            await self.site.render_to_pipe(pipe)
        else:
            await self.site.render_to_pipe(_FittingPipe(pipe))


class _FittingPipe:
    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        # aiocoap's Site replaces `request` with its path-stripped copy: the bound is taken on
        # the request as it arrived.
        self._arrived = self.request = pipe.request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def add_response(self, response: aiocoap.Message, is_last: bool = False) -> None:
        self._pipe.add_response(fitted_hints(response, self._arrived), is_last)


class UploadBound:
    """A server site in front of another (inside the OSCORE layer: it sees every unprotected
    request and the inner request of every protected one) bounding block-wise uploads
    (module docstring): a Block1 request whose blocks reach past `max_upload` bytes gets 4.13
    with Size1 `max_upload`; one to /.well-known/edhoc gets 4.13 with Size1
    EDHOC_MESSAGE_BYTES; a block aiocoap cannot append to the ones it holds (a gap, an
    overlap) gets 4.08 Request Entity Incomplete. Refusals are logged one line per kind per
    minute (`clock`), naming the sender, never the payload."""

    def __init__(self, site: Any, max_upload: int, clock: Clock) -> None:
        self.site = site
        self.max_upload = max_upload
        self._log = DropLog(log, clock, what="block-wise upload refused from", level=logging.INFO)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.site, name)

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        block1 = request.opt.block1
        if block1 is None:
            await self.site.render_to_pipe(pipe)
            return
        if tuple(request.opt.uri_path) == _EDHOC_PATH:
            self._refuse(pipe, "Block1 to /.well-known/edhoc", too_large(EDHOC_MESSAGE_BYTES))
            return
        if upload_end(request) > self.max_upload:
            self._refuse(pipe, "Block1 past the upload cap", too_large(self.max_upload))
            return
        try:
            # aiocoap's Site replaces pipe.request with its path-stripped copy: `request`
            # stays the one that arrived.
            await self.site.render_to_pipe(pipe)
        except ValueError as error:
            if not _from_reassembly(error):
                raise
            incomplete = aiocoap.Message(code=aiocoap.REQUEST_ENTITY_INCOMPLETE)
            self._refuse(pipe, "Block1 block out of order", incomplete)

    def _refuse(self, pipe: Any, kind: str, answer: aiocoap.Message) -> None:
        # The source address is the same on the path-stripped copy aiocoap's Site made.
        self._log.dropped(kind, (source_host(pipe.request),))
        pipe.add_response(answer, is_last=True)


def upload_end(request: aiocoap.Message) -> int:
    """How far into the request body a Block1 request reaches: the end of its payload, or of
    its block when more follow ((block number + 1) x size; a BERT block may carry several).
    Raises nothing (0 without Block1)."""
    block1 = request.opt.block1
    if block1 is None:
        return 0
    end: int = block1.start + len(request.payload)
    if block1.more:
        end = max(end, (block1.block_number + 1) * block1.size)
    return end


def too_large(limit: int) -> aiocoap.Message:
    """4.13 Request Entity Too Large with Size1 `limit` (RFC 7959 §2.9.3), a short problem
    detail. Raises nothing."""
    return error_message(PayloadTooLarge(f"body over {limit} bytes", size1=limit), compact=True)


def _from_reassembly(error: ValueError) -> bool:
    """Whether `error` is aiocoap's bare ValueError for a block that does not follow the ones
    held (aiocoap.message.Message._append_request_block, where it is raised)."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_code.co_name == "_append_request_block"
