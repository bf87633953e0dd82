"""The one exception tree of coap-auth, and how each error renders on the wire.

    CoapAuthError                   base: carries a CoAP code and renders itself
    ├── AceError                    RFC 9200 §5.8.3 body {30: code, 31: text}, format 19
    │   ├── InvalidRequest          4.00, error 1
    │   ├── InvalidClient           4.01, error 2 (never says whether the client exists)
    │   ├── InvalidGrant            4.00, error 3
    │   ├── UnauthorizedClient      4.00, error 4
    │   ├── UnsupportedGrantType    4.00, error 5
    │   ├── InvalidScope            4.00, error 6
    │   └── UnsupportedPopKey       4.00, error 7
    ├── ProblemError                RFC 9290 body {-1: title, -2: detail}, format 257
    │   ├── BadRequest              4.00
    │   ├── Unauthorized            4.01: no OSCORE context for the kid, a replay
    │   │   └── ProtectionRequired  the resource takes OSCORE-protected requests only
    │   ├── BadOption               4.02 (a critical option not processed, RFC 7252 §5.4.1)
    │   ├── MethodNotAllowed        4.05
    │   ├── NotAcceptable           4.06
    │   ├── RequestEntityIncomplete 4.08 (RFC 7959: a block that continues no upload held)
    │   ├── PayloadTooLarge         4.13
    │   ├── UnsupportedContentFormat 4.15
    │   ├── TooManyRequests         4.29 with Max-Age (RFC 8516)
    │   ├── ServiceUnavailable      5.03 with Max-Age (retry after)
    │   │   └── StoreUnavailable    the database is unreachable for now
    │   └── TrlQueryError           4.00 with the RFC 9770 ace-trl-error entry
    ├── TokenError                  a token did not decode or verify (4.01 at an RS)
    │   ├── MalformedToken
    │   ├── InvalidSignature        also: unknown kid, algorithm not allowed
    │   └── InvalidClaims           expired, not yet valid, wrong issuer or audience
    └── OperatorError               bad operator input (CLI, configuration); never on the wire

Messages are one line and never contain a secret, a token or key material: callers pass
descriptions, not values.
"""

from __future__ import annotations

from typing import ClassVar

import cbor2

from coap_auth.wire import (
    AceErrorCode,
    AceParam,
    CoapCode,
    ContentFormat,
    ProblemDetail,
    TrlErrorId,
)

# An ace-trl-error without a cursor entry (RFC 9770 §6.3 says when it MUST NOT be present).
NO_CURSOR = object()


class CoapAuthError(Exception):
    """Base of every error coap-auth raises on purpose."""

    code: ClassVar[CoapCode] = CoapCode.BAD_REQUEST
    title: ClassVar[str] = "Bad Request"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def render(self, *, compact: bool = False) -> tuple[CoapCode, ContentFormat, bytes]:
        """The CoAP response code, content format and payload for this error.

        `compact` leaves out the human-readable text (RFC 7252 §11.3: an answer to a small
        unauthenticated request must not be much larger than the request)."""
        body: dict[int, object] = (
            {}
            if compact
            else {
                ProblemDetail.TITLE: self.title,
                ProblemDetail.DETAIL: self.description,
            }
        )
        return self.code, ContentFormat.PROBLEM_DETAILS_CBOR, cbor2.dumps(body)


class AceError(CoapAuthError):
    """An RFC 9200 §5.8.3 error response of /token, /introspect or /revoke."""

    ace_code: ClassVar[AceErrorCode]

    def render(self, *, compact: bool = False) -> tuple[CoapCode, ContentFormat, bytes]:
        body: dict[int, object] = {AceParam.ERROR: int(self.ace_code)}
        if not compact:
            body[AceParam.ERROR_DESCRIPTION] = self.description
        return self.code, ContentFormat.ACE_CBOR, cbor2.dumps(body)


class InvalidRequest(AceError):
    ace_code = AceErrorCode.INVALID_REQUEST


class InvalidClient(AceError):
    code = CoapCode.UNAUTHORIZED
    ace_code = AceErrorCode.INVALID_CLIENT


class InvalidGrant(AceError):
    ace_code = AceErrorCode.INVALID_GRANT


class UnauthorizedClient(AceError):
    ace_code = AceErrorCode.UNAUTHORIZED_CLIENT


class UnsupportedGrantType(AceError):
    ace_code = AceErrorCode.UNSUPPORTED_GRANT_TYPE


class InvalidScope(AceError):
    ace_code = AceErrorCode.INVALID_SCOPE


class UnsupportedPopKey(AceError):
    ace_code = AceErrorCode.UNSUPPORTED_POP_KEY


class ProblemError(CoapAuthError):
    """A failure outside the ACE error vocabulary: RFC 9290 concise problem details."""


class BadRequest(ProblemError):
    pass


class Unauthorized(ProblemError):
    """4.01 outside ACE: an OSCORE request under no context we hold, or a replay
    (RFC 8613 §8.2)."""

    code = CoapCode.UNAUTHORIZED
    title = "Unauthorized"


class ProtectionRequired(Unauthorized):
    """4.01: an unprotected request to a resource that requires OSCORE (docs/protocol.md
    "Protected channels")."""

    title = "Protection Required"


class BadOption(ProblemError):
    """4.02: a request with a critical option nothing here processes (RFC 7252 §5.4.1)."""

    code = CoapCode.BAD_OPTION
    title = "Bad Option"


class MethodNotAllowed(ProblemError):
    code = CoapCode.METHOD_NOT_ALLOWED
    title = "Method Not Allowed"


class NotAcceptable(ProblemError):
    code = CoapCode.NOT_ACCEPTABLE
    title = "Not Acceptable"


class RequestEntityIncomplete(ProblemError):
    code = CoapCode.REQUEST_ENTITY_INCOMPLETE
    title = "Request Entity Incomplete"


class PayloadTooLarge(ProblemError):
    code = CoapCode.REQUEST_ENTITY_TOO_LARGE
    title = "Request Entity Too Large"

    def __init__(self, description: str, size1: int | None = None) -> None:
        super().__init__(description)
        # RFC 7252 §5.9.2.9: the largest request body the server takes, sent as Size1.
        self.size1 = size1


class UnsupportedContentFormat(ProblemError):
    code = CoapCode.UNSUPPORTED_CONTENT_FORMAT
    title = "Unsupported Content-Format"


class TooManyRequests(ProblemError):
    """A rate limit (per address, per client) was hit: retry after `retry_after` s."""

    code = CoapCode.TOO_MANY_REQUESTS
    title = "Too Many Requests"

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = max(1, retry_after)


class ServiceUnavailable(ProblemError):
    code = CoapCode.SERVICE_UNAVAILABLE
    title = "Service Unavailable"
    # Seconds a client should wait before retrying: sent as Max-Age (RFC 7252 §5.9.3.4).
    retry_after: ClassVar[int] = 5


class StoreUnavailable(ServiceUnavailable):
    """The store cannot be reached (connection lost, refused); the pool reconnects."""


class TrlQueryError(ProblemError):
    """A bad /revoke/trl query (RFC 9770 §6.3): problem details with `ace-trl-error`."""

    def __init__(self, description: str, error_id: TrlErrorId, cursor: object = NO_CURSOR):
        super().__init__(description)
        self.error_id = error_id
        self.cursor = cursor

    def render(self, *, compact: bool = False) -> tuple[CoapCode, ContentFormat, bytes]:
        entry: dict[int, object] = {0: int(self.error_id)}
        if self.cursor is not NO_CURSOR:
            entry[1] = self.cursor
        # The ace-trl-error entry is required (RFC 9770 §6.1); only the text is optional.
        body: dict[int, object] = {ProblemDetail.ACE_TRL_ERROR: entry}
        if not compact:
            body[ProblemDetail.TITLE] = self.title
            body[ProblemDetail.DETAIL] = self.description
        return self.code, ContentFormat.PROBLEM_DETAILS_CBOR, cbor2.dumps(body)


class TokenError(CoapAuthError):
    """An access token (or client assertion) that does not decode or verify."""

    code = CoapCode.UNAUTHORIZED
    title = "Unauthorized"


class MalformedToken(TokenError):
    """A token (or assertion) that does not decode: not CBOR or JSON, not a COSE or JWS
    structure, a header or claim of the wrong type."""


class InvalidSignature(TokenError):
    """A signature or MAC that does not verify, or a key id no known key has."""


class InvalidClaims(TokenError):
    """A token that verified but whose claims refuse it: expired or not yet valid, another
    issuer or audience, a required claim missing."""


class OperatorError(CoapAuthError):
    """Bad input from an operator: the CLI prints the description and exits non-zero."""
