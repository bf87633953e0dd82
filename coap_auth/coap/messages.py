"""ACE messages on the wire: /token, /revoke and /introspect request and response maps.

Parsing is defensive: wrong content format, oversize, non-CBOR, wrong types. Unknown
parameters are ignored, as RFC 6749 §3.2 requires of a token endpoint.
"""

from __future__ import annotations

from typing import Any

import cbor2

from coap_auth import untagged
from coap_auth.errors import (
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedContentFormat,
    UnsupportedGrantType,
)
from coap_auth.service import (
    TOKEN_FORMATS,
    Claims,
    IssuedToken,
    TokenRequest,
    TokenSubmission,
)
from coap_auth.text import has_control_character
from coap_auth.wire import (
    CLIENT_ASSERTION,
    TOKEN_FORMAT,
    AceParam,
    CnfMethod,
    ContentFormat,
    CwtClaim,
    GrantType,
)

MAX_TEXT = 512
# Deepest nesting a request may have: the deepest legitimate parameter (req_cnf {1: COSE_Key})
# is three levels down. Also stops self-referencing values (CBOR tags 28/29).
MAX_DEPTH = 8

_TEXT_PARAMS = {
    AceParam.CLIENT_ID: "client_id",
    AceParam.CLIENT_SECRET: "client_secret",
    AceParam.AUDIENCE: "audience",
    AceParam.SCOPE: "scope",
    TOKEN_FORMAT: "token_format",
}
_BYTES_PARAMS = {
    AceParam.REFRESH_TOKEN: "refresh_token",
    CLIENT_ASSERTION: "client_assertion",
}


def decode_ace_payload(
    payload: bytes, content_format: int | None, max_payload: int
) -> dict[Any, Any]:
    """The CBOR map of an application/ace+cbor request body."""
    if content_format != ContentFormat.ACE_CBOR:
        raise UnsupportedContentFormat("expected application/ace+cbor (19)")
    if len(payload) > max_payload:
        raise PayloadTooLarge(f"request payload larger than {max_payload} bytes", size1=max_payload)
    try:
        body = untagged.loads(payload)
    except Exception:
        # Includes RecursionError for absurd nesting: any undecodable body is the client's fault.
        raise InvalidRequest("request body is not well-formed CBOR") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a CBOR map")
    for key in body:
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise InvalidRequest("request parameters must have integer or text keys")
    if _depth(body) > MAX_DEPTH:
        raise InvalidRequest(f"request nested deeper than {MAX_DEPTH} levels")
    return body


def _depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep `value` nests, counting no further than limit + 1. A body holds no tags
    (`untagged.loads` refused them; bignums are integers), so no sets or CBORTag objects: only
    maps and arrays (tuples, as map keys) nest."""
    if limit < 0:
        return 1
    if isinstance(value, dict):
        children: Any = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple):
        children = value
    else:
        return 0
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def _typed_params(body: dict[Any, Any], text: dict[Any, str]) -> dict[str, Any]:
    """The text and byte-string parameters of a request, type-checked."""
    values: dict[str, Any] = {}
    for key, name in text.items():
        if key in body:
            value = body[key]
            if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
                raise InvalidRequest(f"{name} must be a non-empty text string")
            # A control character has no place in an id, a scope or a secret: refused here,
            # it never reaches the store (PostgreSQL fails on NUL) or a log line.
            if has_control_character(value):
                raise InvalidRequest(f"{name} must not contain control characters")
            values[name] = value
    for key, name in _BYTES_PARAMS.items():
        if key in body:
            if not isinstance(body[key], bytes) or not body[key]:
                raise InvalidRequest(f"{name} must be a non-empty byte string")
            values[name] = body[key]
    return values


def parse_token_request(body: dict[Any, Any]) -> TokenRequest:
    values = _typed_params(body, _TEXT_PARAMS)
    if AceParam.REQ_CNF in body:
        if not isinstance(body[AceParam.REQ_CNF], dict):
            raise InvalidRequest("req_cnf must be a map")
        values["req_cnf"] = body[AceParam.REQ_CNF]
    if AceParam.GRANT_TYPE in body:
        grant = body[AceParam.GRANT_TYPE]
        if isinstance(grant, bool) or not isinstance(grant, int):
            raise InvalidRequest("grant_type must be an unsigned integer")
        try:
            values["grant_type"] = GrantType(grant)
        except ValueError:
            raise UnsupportedGrantType("grant type not supported") from None
    if values.get("token_format", "cwt") not in TOKEN_FORMATS:
        raise InvalidRequest('token_format must be "cwt" or "jwt"')
    return TokenRequest(**values)


def encode_token_response(issued: IssuedToken) -> bytes:
    """The /token response map (RFC 9200 §5.8.2), with ace_profile, cnf and rs_cnf as the
    audience's profile gives them."""
    body: dict[Any, Any] = {
        AceParam.ACCESS_TOKEN: issued.access_token,
        AceParam.EXPIRES_IN: issued.expires_in,
        # RFC 9200 §5.8.2: PoP is the default, so Bearer must be said; we always say which.
        AceParam.TOKEN_TYPE: issued.token_type,
    }
    if issued.narrowed_scope is not None:
        body[AceParam.SCOPE] = issued.narrowed_scope
    if issued.profile is not None:
        # RFC 9200 §5.8.4.3; RFC 9203 §3.2 (coap_oscore), draft-ietf-ace-edhoc-oscore-profile.
        body[AceParam.ACE_PROFILE] = issued.profile
    if issued.cnf is not None:
        # {1: COSE_Key} as bound, or RFC 9203 §3.2 {4: OSCORE input material}: the master
        # secret travels only in this response, which /token sends OSCORE-protected.
        body[AceParam.CNF] = issued.cnf
    if issued.rs_cnf is not None:
        body[AceParam.RS_CNF] = issued.rs_cnf  # RFC 9201: the RS's key, for EDHOC
    if issued.refresh_token is not None:
        body[AceParam.REFRESH_TOKEN] = issued.refresh_token
    return cbor2.dumps(body)


_CALLER_PARAMS = {
    AceParam.CLIENT_ID: "client_id",
    AceParam.CLIENT_SECRET: "client_secret",
}


def parse_token_submission(body: dict[Any, Any]) -> TokenSubmission:
    """A /revoke or /introspect request: {11: token} and the caller's credentials."""
    values = _typed_params(body, _CALLER_PARAMS)
    values.pop("refresh_token", None)
    token = body.get(AceParam.TOKEN)
    # RFC 9200 §5.9.1: the token is a byte string, or the text of a JWT.
    if isinstance(token, str) and token.isascii():
        token = token.encode("ascii")
    if not isinstance(token, bytes) or not token:
        raise InvalidRequest("token must be a non-empty byte string")
    return TokenSubmission(token=token, **values)


def encode_introspection(claims: Claims | None) -> bytes:
    """RFC 9200 §5.9.2: {active: true, claims...} or {active: false}."""
    if claims is None:
        return cbor2.dumps({AceParam.ACTIVE: False})
    body: dict[int, Any] = {
        AceParam.ACTIVE: True,
        CwtClaim.ISS: claims.iss,
        CwtClaim.SUB: claims.sub,
        CwtClaim.AUD: claims.aud,
        CwtClaim.EXP: claims.exp,
        CwtClaim.IAT: claims.iat,
        CwtClaim.CTI: claims.cti,
    }
    if claims.scope is not None:
        body[CwtClaim.SCOPE] = claims.scope
    if claims.cnf_key is not None:
        body[CwtClaim.CNF] = {CnfMethod.COSE_KEY: dict(claims.cnf_key)}
    return cbor2.dumps(body)
