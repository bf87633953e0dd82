"""Thin aiocoap resources: decode the request, call the service, encode the answer.

Resources raise `CoapAuthError`; `Endpoint` (coap/endpoint.py) turns it into the docs/protocol.md
body and logs the request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiocoap
from aiocoap import resource

from coap_auth.coap.endpoint import AceEndpoint, Endpoint, caller, note_issued
from coap_auth.coap.messages import encode_token_response, parse_token_request
from coap_auth.coap.observable import ObservableEndpoint
from coap_auth.coap.observers import Observation, Representation
from coap_auth.coap.protection import peer, peer_id
from coap_auth.errors import NotAcceptable
from coap_auth.service import AuthService
from coap_auth.wire import CoapCode, ContentFormat


class TokenResource(AceEndpoint, resource.Resource):
    """RFC 9200 §5.8 token endpoint."""

    path = "/token"

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        accept = request.opt.accept
        if accept is not None and accept != ContentFormat.ACE_CBOR:
            # RFC 7252 §5.10.4: the answer is application/ace+cbor (19) or nothing.
            raise NotAcceptable("/token answers application/ace+cbor (19) only")
        body = self.ace_body(request)
        token_request = replace(parse_token_request(body), peer=peer(request))
        caller.set(peer_id(request) or token_request.client_id or "assertion")
        issued = await self.service.issue_token(token_request)
        note_issued(issued)
        return aiocoap.Message(
            code=aiocoap.Code.CREATED,
            payload=encode_token_response(issued),
            content_format=ContentFormat.ACE_CBOR,
        )


class KeysResource(Endpoint, ObservableEndpoint, resource.Resource):
    """The published verification keys: COSE_KeySet (102) or, on Accept 50, JWKS.

    Each format is rendered once per key set (with its ETag) and shared by every GET and
    every observer (coap/observers.py); `keys_changed` drops them and queues the observers.
    """

    path = "/keys"

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service
        self._cache: dict[int, Representation] = {}
        # The COSE_KeySet observers were last given (None: none rendered yet).
        self._served: bytes | None = None

    def get_link_description(self) -> dict[str, str]:
        formats = f"{int(ContentFormat.COSE_KEY_SET)} {int(ContentFormat.JSON)}"
        return {**super().get_link_description(), "ct": formats}

    def keys_changed(self) -> None:
        """Notify observers, if the published set really changed (a reload can also come from
        an audience being added, or a change to a family that is never published)."""
        self._cache.clear()
        current = self._render(ContentFormat.COSE_KEY_SET).payload
        if current != self._served:
            self._served = current
            self.updated_state()

    def updated_state(self) -> None:
        """Queue every observer for a notification of the current set."""
        if self.observers is not None:
            self.observers.notify(self.observers.of(self))

    def _render(self, content_format: int) -> Representation:
        if content_format not in self._cache:
            document = self.service.key_set_document(content_format)
            self._cache[content_format] = Representation.of(document, content_format)
            if self._served is None and content_format == ContentFormat.COSE_KEY_SET:
                self._served = self._cache[content_format].payload
        return self._cache[content_format]

    def observation_shape(self, request: aiocoap.Message) -> int:
        accept = request.opt.accept
        if accept is None:
            return ContentFormat.COSE_KEY_SET
        if accept in (ContentFormat.COSE_KEY_SET, ContentFormat.JSON):
            return ContentFormat(int(accept))
        raise NotAcceptable("/keys offers COSE_KeySet (102) and JWKS (50)")

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        representation = self._render(self.observation_shape(request))
        if representation.etag in (request.opt.etags or ()):
            response = aiocoap.Message(code=aiocoap.Code(CoapCode.VALID))
            response.opt.etag = representation.etag
        else:
            response = representation.message()
        # docs/protocol.md: a cached copy never outlives the next scheduled change of the set.
        response.opt.max_age = self.service.keys_max_age()
        return response

    async def notification(self, observation: Observation) -> aiocoap.Message:
        response = self._render(int(observation.shape)).message()  # type: ignore[call-overload]
        response.opt.max_age = self.service.keys_max_age()
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
