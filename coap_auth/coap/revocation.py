"""The revocation half of the CoAP interface: /revoke, /revoke/trl (RFC 9770), /introspect."""

from __future__ import annotations

import aiocoap
import cbor2
from aiocoap import resource

from coap_auth.coap.endpoint import AceEndpoint, Endpoint, caller
from coap_auth.coap.messages import (
    encode_introspection,
    parse_token_submission,
)
from coap_auth.service import AuthService, TrlQuery, parse_trl_query
from coap_auth.wire import ContentFormat

# Distinct queries whose answers are cached at once (diff and cursor values vary).
MAX_CACHED_ANSWERS = 256


class RevokeResource(AceEndpoint, resource.Resource):
    """RFC 7009 semantics over CoAP: 2.04 whether or not the token was known."""

    path = "/revoke"

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        body = self.ace_body(request)
        submission = parse_token_submission(body)
        caller.set(submission.client_id or "assertion")
        await self.service.revoke(submission)
        return aiocoap.Message(code=aiocoap.Code.CHANGED)


class IntrospectResource(AceEndpoint, resource.Resource):
    """RFC 9200 §5.9: 2.01 with the claims of an active token, or {10: false}."""

    path = "/introspect"

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        body = self.ace_body(request)
        submission = parse_token_submission(body)
        caller.set(submission.client_id or "assertion")
        claims = await self.service.introspect(submission)
        return aiocoap.Message(
            code=aiocoap.Code.CREATED,
            payload=encode_introspection(claims),
            content_format=ContentFormat.ACE_CBOR,
        )


class TrlResource(Endpoint, resource.ObservableResource):
    """RFC 9770 token revocation list: full and diff queries, observable.

    Answers are cached per query until the list changes, so a notification to thousands of
    observers costs one store read per distinct query.
    """

    path = "/revoke/trl"

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service
        self._cache: dict[TrlQuery, bytes] = {}
        self._version = 0
        self._revocations_seen: int | None = None

    def get_link_description(self) -> dict[str, str]:
        return {**super().get_link_description(), "ct": str(int(ContentFormat.ACE_TRL_CBOR))}

    def trl_changed(self) -> None:
        self._version += 1
        self._cache.clear()
        self.updated_state()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        query = parse_trl_query(request.opt.uri_query)
        # A revocation this instance just made is answered at once, not after the next tick.
        revocations = (await self.service.store.change_counters()).revocations
        if revocations != self._revocations_seen:
            self._revocations_seen = revocations
            self._version += 1
            self._cache.clear()
        payload = self._cache.get(query)
        if payload is None:
            version = self._version
            payload = cbor2.dumps(await self.service.trl(query))
            # Cache only what was read before no change happened meanwhile.
            if version == self._version:
                if len(self._cache) >= MAX_CACHED_ANSWERS:
                    self._cache.clear()
                self._cache[query] = payload
        return aiocoap.Message(
            code=aiocoap.Code.CONTENT, payload=payload, content_format=ContentFormat.ACE_TRL_CBOR
        )
