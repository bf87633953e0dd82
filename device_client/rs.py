"""A resource server's side of ACE on aiocoap: `/authz-info` (RFC 9200 §5.10.1) and a scope guard.

Clients POST their token to /authz-info; the RS verifies it offline and keeps it for the
endpoint that sent it. `require_scope(...)` guards a resource's render methods with that token,
re-checked on every use (expiry, TRL, its key still published, the verifier's staleness bound).
The table is bounded per subject, so one client cannot push out another's tokens.
Without DTLS or OSCORE the endpoint is only a UDP address: the token is a bearer token.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
import cbor2
from aiocoap import resource

from coap_auth.errors import (
    CoapAuthError,
    PayloadTooLarge,
    ServiceUnavailable,
    TokenError,
    UnsupportedContentFormat,
)
from coap_auth.udp import error_message
from coap_auth.wire import ContentFormat, ProblemDetail
from device_client.errors import InsufficientScope
from device_client.verify import TokenVerifier, VerifiedToken

log = logging.getLogger("device_client.rs")

MAX_TOKEN_BYTES = 4096
# RFC 9200 §5.3 AS Request Creation Hints (CBOR labels).
HINT_AS = 1
HINT_AUDIENCE = 5
HINT_SCOPE = 9

Render = Callable[[Any, aiocoap.Message], Awaitable[aiocoap.Message]]


def endpoint_of(request: aiocoap.Message) -> str:
    """The key a token is kept under: the requesting transport endpoint."""
    return str(request.remote.uri_base)


class ResourceServer:
    """Tokens uploaded to /authz-info, verified and kept per client endpoint.

    At most `max_tokens` in all and `max_tokens_per_subject` per subject (the token's `sub`,
    the client it was issued to): a subject over its share loses its own oldest upload, and a
    full table makes room by dropping the oldest token of the subject holding the most. One
    client uploading its token from many ports cannot evict anyone else's.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        as_uri: str | None = None,
        max_tokens: int = 64,
        max_tokens_per_subject: int = 4,
        on_token: Callable[[VerifiedToken, str], None] | None = None,
    ) -> None:
        if not 1 <= max_tokens_per_subject <= max_tokens:
            raise ValueError("need 1 <= max_tokens_per_subject <= max_tokens")
        self.verifier = verifier
        # Named in 4.01 answers so a client knows where to get a token (RFC 9200 §5.3).
        self.as_uri = as_uri
        self.max_tokens = max_tokens
        self.max_tokens_per_subject = max_tokens_per_subject
        self.on_token = on_token
        # endpoint -> token, oldest upload first.
        self._tokens: dict[str, VerifiedToken] = {}

    def add_to(self, site: resource.Site) -> None:
        site.add_resource(["authz-info"], AuthzInfoResource(self))

    # -- tokens -------------------------------------------------------------------------------

    async def accept(self, token: bytes, endpoint: str) -> VerifiedToken:
        """Verify a token and keep it for `endpoint`, replacing that endpoint's previous one."""
        verified = await self.verifier.verify(token)
        self._tokens.pop(endpoint, None)
        self._tokens[endpoint] = verified
        subject = verified.claims.sub
        mine = [e for e, t in self._tokens.items() if t.claims.sub == subject]
        for oldest in mine[: max(0, len(mine) - self.max_tokens_per_subject)]:
            del self._tokens[oldest]
        if len(self._tokens) > self.max_tokens:
            self.purge()
            while len(self._tokens) > self.max_tokens:
                self._evict_from_largest_subject()
        if self.on_token is not None:
            self.on_token(verified, endpoint)
        return verified

    def _evict_from_largest_subject(self) -> None:
        """Drop the oldest token of the subject holding the most (the oldest such on a tie)."""
        held: dict[str, list[str]] = {}
        for endpoint, token in self._tokens.items():
            held.setdefault(token.claims.sub, []).append(endpoint)
        largest = max(held.values(), key=len)
        del self._tokens[largest[0]]

    def token_for(self, request_or_endpoint: aiocoap.Message | str) -> VerifiedToken | None:
        """The token kept for the endpoint of a request (no validity check)."""
        endpoint = (
            request_or_endpoint
            if isinstance(request_or_endpoint, str)
            else endpoint_of(request_or_endpoint)
        )
        return self._tokens.get(endpoint)

    def purge(self) -> list[tuple[str, VerifiedToken]]:
        """Drop expired and revoked tokens and those of withdrawn keys (say after a TRL or key
        set change); return what was dropped. While the verifier is stale nothing is dropped."""
        dropped = []
        for endpoint, verified in list(self._tokens.items()):
            try:
                self.verifier.still_valid(verified)
            except ServiceUnavailable:
                return dropped
            except TokenError:
                dropped.append((endpoint, self._tokens.pop(endpoint)))
        return dropped

    def check(self, request: aiocoap.Message, scopes: tuple[str, ...]) -> aiocoap.Message | None:
        """None if the request's endpoint holds a valid token covering `scopes`; otherwise the
        answer RFC 9200 §5.10.2 asks for: 4.01 (no valid token) or 4.03 (scope too narrow)."""
        endpoint = endpoint_of(request)
        verified = self._tokens.get(endpoint)
        if verified is None:
            return self._unauthorized("no access token from this client", scopes)
        try:
            self.verifier.still_valid(verified)
        except ServiceUnavailable as error:
            # Stale keys or TRL: refuse for now, keep the token for when we are current.
            return error_message(error)
        except TokenError as error:
            del self._tokens[endpoint]
            return self._unauthorized(error.description, scopes)
        if not verified.allows(*scopes):
            return _problem(
                aiocoap.FORBIDDEN, InsufficientScope("token scope does not cover this request")
            )
        return None

    def _unauthorized(self, reason: str, scopes: tuple[str, ...]) -> aiocoap.Message:
        if self.as_uri is None:
            return _problem(aiocoap.UNAUTHORIZED, TokenError(reason))
        # RFC 9200 §5.3: the unauthorized answer tells the client which AS to ask, and for what.
        hints: dict[int, Any] = {HINT_AS: self.as_uri, HINT_AUDIENCE: self.verifier.audience}
        if scopes:
            hints[HINT_SCOPE] = " ".join(scopes)
        return aiocoap.Message(
            code=aiocoap.UNAUTHORIZED,
            payload=cbor2.dumps(hints),
            content_format=ContentFormat.ACE_CBOR,
        )


def _problem(code: aiocoap.Code, error: CoapAuthError) -> aiocoap.Message:
    body = {ProblemDetail.TITLE: str(code.name_printable), ProblemDetail.DETAIL: error.description}
    return aiocoap.Message(
        code=code, payload=cbor2.dumps(body), content_format=ContentFormat.PROBLEM_DETAILS_CBOR
    )


class AuthzInfoResource(resource.Resource):
    """RFC 9200 §5.10.1: POST a CWT (content format 61) or a JWT; 2.01, or 4.01 with a reason."""

    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server

    def get_link_description(self) -> dict[str, str]:
        return {**super().get_link_description(), "ct": str(int(ContentFormat.CWT))}

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        try:
            if request.opt.content_format not in (None, ContentFormat.CWT):
                raise UnsupportedContentFormat("expected application/cwt (61)")
            if len(request.payload) > MAX_TOKEN_BYTES:
                raise PayloadTooLarge(f"token larger than {MAX_TOKEN_BYTES} bytes")
            endpoint = endpoint_of(request)
            verified = await self.resource_server.accept(request.payload, endpoint)
        except CoapAuthError as error:
            # TokenError renders 4.01 with the reason; never the token itself.
            log.info("authz-info: refused a token: %s", error.description)
            return error_message(error)
        log.info(
            "authz-info: token of %s accepted (scope %s)",
            verified.claims.sub,
            verified.claims.scope,
        )
        return aiocoap.Message(code=aiocoap.CREATED)


def require_scope(*scopes: str) -> Callable[[Render], Render]:
    """Guard a `render_*` method: the requesting endpoint must hold a valid token whose scope
    covers `scopes`. The resource must have a `resource_server` attribute.

        class Temperature(resource.Resource):
            def __init__(self, resource_server):
                super().__init__()
                self.resource_server = resource_server

            @require_scope("temp:read")
            async def render_get(self, request): ...
    """

    def decorate(render: Render) -> Render:
        @functools.wraps(render)
        async def guarded(self: Any, request: aiocoap.Message) -> aiocoap.Message:
            resource_server: ResourceServer = self.resource_server
            refusal = resource_server.check(request, scopes)
            if refusal is not None:
                return refusal
            return await render(self, request)

        return guarded

    return decorate
