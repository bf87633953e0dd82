"""Thin aiocoap resources: decode the request, call the service, encode the answer.

Resources raise `CoapAuthError`; `render_errors` turns it into the PROTOCOL.md body. Anything
else is a server fault: logged once with a request id, answered 5.00 with no internals.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
from aiocoap import resource

from coap_auth.coap.messages import decode_ace_payload, encode_token_response, parse_token_request
from coap_auth.errors import CoapAuthError, MethodNotAllowed, NotAcceptable
from coap_auth.keys import cose_key_set, jwks
from coap_auth.service import AuthService
from coap_auth.wire import CoapCode, ContentFormat

log = logging.getLogger("coap_auth.coap")

Render = Callable[[Any, aiocoap.Message], Awaitable[aiocoap.Message]]


def _error_message(error: CoapAuthError) -> aiocoap.Message:
    code, content_format, payload = error.render()
    return aiocoap.Message(code=aiocoap.Code(code), payload=payload, content_format=content_format)


def render_errors(method: Render) -> Render:
    @functools.wraps(method)
    async def wrapper(self: Any, request: aiocoap.Message) -> aiocoap.Message:
        try:
            return await method(self, request)
        except CoapAuthError as error:
            log.info("%s %s -> %s", request.code, self.path, error.description)
            return _error_message(error)
        except Exception:
            request_id = secrets.token_hex(4)
            log.exception("request %s to %s failed", request_id, self.path)
            return aiocoap.Message(code=aiocoap.Code.INTERNAL_SERVER_ERROR)

    return wrapper


class MethodCheck:
    """Answer a method a resource does not offer with 4.05 and a problem-details body."""

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        if getattr(self, f"render_{str(request.code).lower()}", None) is None:
            return _error_message(MethodNotAllowed(f"{request.code} not allowed on {self.path}"))
        return await super().render(request)  # type: ignore[misc]


class TokenResource(MethodCheck, resource.Resource):
    """RFC 9200 §5.8 token endpoint."""

    path = "/token"

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service

    def get_link_description(self) -> dict[str, str]:
        return {**super().get_link_description(), "ct": str(int(ContentFormat.ACE_CBOR))}

    @render_errors
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        body = decode_ace_payload(
            request.payload, request.opt.content_format, self.service.settings.max_payload
        )
        issued = await self.service.issue_token(parse_token_request(body))
        log.info("token issued to %s for %s", issued.claims.sub, issued.claims.aud)
        return aiocoap.Message(
            code=aiocoap.Code.CREATED,
            payload=encode_token_response(issued),
            content_format=ContentFormat.ACE_CBOR,
        )


class KeysResource(MethodCheck, resource.ObservableResource):
    """The published verification keys: COSE_KeySet (102) or, on Accept 50, JWKS.

    Rendered bytes are cached per format and dropped on `keys_changed`, so notifying
    thousands of observers costs no re-encoding.
    """

    path = "/keys"
    MAX_AGE = 3600

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service
        self._cache: dict[int, bytes] = {}

    def get_link_description(self) -> dict[str, str]:
        formats = f"{int(ContentFormat.COSE_KEY_SET)} {int(ContentFormat.JSON)}"
        return {**super().get_link_description(), "ct": formats}

    def keys_changed(self) -> None:
        self._cache.clear()
        self.updated_state()

    def _render(self, content_format: int) -> bytes:
        if content_format not in self._cache:
            published = self.service.key_ring.published
            encode = jwks if content_format == ContentFormat.JSON else cose_key_set
            self._cache[content_format] = encode(published)
        return self._cache[content_format]

    @render_errors
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
        response.opt.max_age = self.MAX_AGE
        return response
