"""What the resource server's modules share: how a refusal renders (RFC 9200 §5.10.1.1 codes,
RFC 9290 problem details that never quote a token), the hints' labels, the size bound."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import aiocoap
import cbor2

from coap_auth.errors import BadRequest, CoapAuthError, MalformedToken, TokenError
from coap_auth.udp import error_message
from coap_auth.wire import ContentFormat, ProblemDetail
from device_client.verify import UnusableClaims, WrongAudience

if TYPE_CHECKING:
    from coap_auth.secure.contexts import OscoreContext

MAX_TOKEN_BYTES = 4096
# RFC 9200 §5.3 AS Request Creation Hints (CBOR labels).
HINT_AS = 1
HINT_AUDIENCE = 5
HINT_SCOPE = 9


def problem(code: aiocoap.Code, error: CoapAuthError) -> aiocoap.Message:
    """`code` with the RFC 9290 problem details {title, detail} of `error`."""
    body = {ProblemDetail.TITLE: str(code.name_printable), ProblemDetail.DETAIL: error.description}
    return aiocoap.Message(
        code=code, payload=cbor2.dumps(body), content_format=ContentFormat.PROBLEM_DETAILS_CBOR
    )


def refusal(error: CoapAuthError) -> aiocoap.Message:
    """The answer to a refused token or /authz-info request (RFC 9200 §5.10.1.1, RFC 9203
    §4.2): 4.03 for a token of another audience, 4.01 for any other token failure (one that
    does not decode or verify included), 4.00 (BadRequest) for a missing or malformed
    parameter; our other errors (4.13, 4.15, 5.03 ...) as they render."""
    if isinstance(error, WrongAudience):
        return problem(aiocoap.FORBIDDEN, error)
    if isinstance(error, UnusableClaims):
        return problem(aiocoap.BAD_REQUEST, error)
    if isinstance(error, TokenError):
        return problem(aiocoap.UNAUTHORIZED, error)
    return error_message(error)


def endpoint_of(request: aiocoap.Message) -> str:
    """The transport endpoint a request came from (what a bearer token is kept under)."""
    remote = request.remote
    underlying = getattr(remote, "underlying_address", None)
    return str((underlying or remote).uri_base)


def context_of(request: aiocoap.Message) -> OscoreContext | None:
    """The OSCORE context a request arrived under (coap_auth.secure.site), or None."""
    from coap_auth.secure.contexts import OscoreContext

    context = getattr(request.remote, "security_context", None)
    return context if isinstance(context, OscoreContext) else None


def bad_parameter(error: MalformedToken) -> BadRequest:
    """A parameter check's MalformedToken (coap_auth.secure.ace_oscore) as the 4.00 it is."""
    return BadRequest(error.description)


class NonceMemory:
    """The last `size` (material id, nonce1) pairs seen (RFC 9203 /authz-info), oldest
    forgotten first. Raises ValueError for a size below 1."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the nonce memory needs room for one nonce")
        self.size = size
        self._seen: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, material_id: bytes, nonce1: bytes) -> bool:
        return (material_id, nonce1) in self._seen

    def remember(self, material_id: bytes, nonce1: bytes) -> None:
        self._seen[(material_id, nonce1)] = None
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
