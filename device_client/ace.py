"""ACE messages as the device reads them (RFC 9200 §5.8): the /token answer and error bodies.

Parsed defensively: a malformed answer is a ValueError, never a half-filled token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coap_auth import untagged
from coap_auth.wire import AceErrorCode, AceParam, ProblemDetail, TokenType

MAX_RESPONSE_BYTES = 4096
MAX_DESCRIPTION = 200


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A 2.01 answer of /token (docs/protocol.md "/token success")."""

    access_token: bytes = field(repr=False)
    expires_in: int
    token_type: TokenType
    refresh_token: bytes | None = field(default=None, repr=False)
    # Present when the AS granted less than was asked for (RFC 6749 §5.1).
    scope: str | None = None


def parse_token_response(payload: bytes, default_type: TokenType) -> TokenResponse:
    body = _load_map(payload)
    if body is None:
        raise ValueError("/token answer is not a CBOR map")
    value = body.get(AceParam.ACCESS_TOKEN)
    expires_in = body.get(AceParam.EXPIRES_IN)
    if not isinstance(value, bytes) or not value:
        raise ValueError("/token answer has no access_token byte string")
    # expires_in is optional in RFC 9200 but docs/protocol.md always sends it, and without it
    # the device cannot know when to refresh.
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        raise ValueError("/token answer has no positive expires_in")
    refresh_token = body.get(AceParam.REFRESH_TOKEN)
    scope = body.get(AceParam.SCOPE)
    try:
        # RFC 9200 §5.8.2: without token_type the default is PoP; we say what we asked for.
        token_type = TokenType(body.get(AceParam.TOKEN_TYPE, default_type))
    except ValueError:
        raise ValueError("/token answer has an unknown token_type") from None
    return TokenResponse(
        access_token=value,
        expires_in=expires_in,
        token_type=token_type,
        refresh_token=refresh_token if isinstance(refresh_token, bytes) else None,
        scope=scope if isinstance(scope, str) else None,
    )


def parse_error(payload: bytes) -> tuple[int | None, str]:
    """The RFC 9200 §5.8.3 error code and a one-line description (or RFC 9290 details)."""
    body = _load_map(payload)
    if body is None:
        return None, "no error details"
    code = body.get(AceParam.ERROR)
    text = body.get(AceParam.ERROR_DESCRIPTION, body.get(ProblemDetail.DETAIL))
    description = " ".join(text.split())[:MAX_DESCRIPTION] if isinstance(text, str) else "-"
    ace_code = code if isinstance(code, int) and not isinstance(code, bool) else None
    if ace_code is not None:
        try:
            description = f"{AceErrorCode(ace_code).name.lower()}: {description}"
        except ValueError:
            pass
    return ace_code, description


def _load_map(payload: bytes) -> dict[Any, Any] | None:
    if not payload or len(payload) > MAX_RESPONSE_BYTES:
        return None
    try:
        body = untagged.loads(payload)
    except Exception:
        return None
    return body if isinstance(body, dict) else None
