"""Thin aiocoap resources: decode the request, call the service, encode the answer.

Resources raise `CoapAuthError`; `Endpoint` (coap/endpoint.py) turns it into the PROTOCOL.md
body and logs the request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiocoap
from aiocoap import resource

from coap_auth.coap.endpoint import AceEndpoint, Endpoint, caller
from coap_auth.coap.messages import encode_token_response, parse_token_request
from coap_auth.coap.protection import peer, peer_id
from coap_auth.errors import NotAcceptable
from coap_auth.keys import cose_key_set, jwks
from coap_auth.service import AuthService
from coap_auth.wire import CoapCode, ContentFormat


class TokenResource(AceEndpoint, resource.Resource):
    """RFC 9200 §5.8 token endpoint."""

    path = "/token"

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        body = self.ace_body(request)
        token_request = replace(parse_token_request(body), peer=peer(request))
        caller.set(peer_id(request) or token_request.client_id or "assertion")
        issued = await self.service.issue_token(token_request)
        caller.set(issued.claims.sub)
        return aiocoap.Message(
            code=aiocoap.Code.CREATED,
            payload=encode_token_response(issued),
            content_format=ContentFormat.ACE_CBOR,
        )


class KeysResource(Endpoint, resource.ObservableResource):
    """The published verification keys: COSE_KeySet (102) or, on Accept 50, JWKS.

    Rendered bytes are cached per format and dropped on `keys_changed`, so notifying
    thousands of observers costs no re-encoding.
    """

    path = "/keys"

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service
        self._cache: dict[int, bytes] = {}
        # The COSE_KeySet observers were last given (None: none rendered yet).
        self._served: bytes | None = None

    def get_link_description(self) -> dict[str, str]:
        formats = f"{int(ContentFormat.COSE_KEY_SET)} {int(ContentFormat.JSON)}"
        return {**super().get_link_description(), "ct": formats}

    def keys_changed(self) -> None:
        """Notify observers, if the published set really changed (a reload can also come from
        an audience being added, or a change to a family that is never published)."""
        self._cache.clear()
        current = self._render(ContentFormat.COSE_KEY_SET)
        if current != self._served:
            self._served = current
            self.updated_state()

    def _render(self, content_format: int) -> bytes:
        if content_format not in self._cache:
            published = self.service.keys.published()
            encode = jwks if content_format == ContentFormat.JSON else cose_key_set
            self._cache[content_format] = encode(published)
            if self._served is None and content_format == ContentFormat.COSE_KEY_SET:
                self._served = self._cache[content_format]
        return self._cache[content_format]

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        accept = request.opt.accept
        if accept is None:
            content_format = ContentFormat.COSE_KEY_SET
        elif accept in (ContentFormat.COSE_KEY_SET, ContentFormat.JSON):
            content_format = ContentFormat(int(accept))
        else:
            raise NotAcceptable("/keys offers COSE_KeySet (102) and JWKS (50)")
        payload = self._render(content_format)
        etag = hashlib.sha256(payload).digest()[:8]
        if etag in (request.opt.etags or ()):
            response = aiocoap.Message(code=aiocoap.Code(CoapCode.VALID))
        else:
            response = aiocoap.Message(
                code=aiocoap.Code.CONTENT, payload=payload, content_format=content_format
            )
        response.opt.etag = etag
        # PROTOCOL.md: a cached copy never outlives the next scheduled change of the set.
        response.opt.max_age = self.service.keys.keys_max_age()
        return response


class WellKnownCore(Endpoint, resource.WKCResource):
    """RFC 6690 /.well-known/core, behind the same guard as every other resource (block-wise
    uploads, the log line)."""

    path = "/.well-known/core"

    def __init__(self, service: AuthService, links: Callable[[], Any]) -> None:
        super().__init__(links)
        self.service = service

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        response: aiocoap.Message = await super().render_get(request)
        if response.code is None:  # aiocoap's Resource.render would default it
            response.code = aiocoap.Code.CONTENT
        return response
