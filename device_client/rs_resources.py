"""`/authz-info` of the resource server (RFC 9200 §5.10.1), by content format and protection:

- unprotected, application/ace+cbor (19): the RFC 9203 exchange (rs_oscore.post_oscore);
- unprotected, application/cwt (61) or none: a raw token. One with cnf COSE_Key (EDHOC + OSCORE
  profile) is held for an EDHOC peer proving that key; one without cnf is a bearer token,
  kept for the sending endpoint with allow_bearer only (4.01 otherwise); an OSCORE-profile
  token belongs in the ace+cbor map (4.00);
- OSCORE-protected (either format): an update of access rights for that context (RFC 9203
  §4.2, draft-ietf-ace-edhoc-oscore-profile-11 §4.6): 2.01 with no payload, or 4.01 when the
  new token is bound to other material or another key.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import aiocoap
from aiocoap import resource

from coap_auth.errors import (
    BadRequest,
    CoapAuthError,
    PayloadTooLarge,
    TokenError,
    UnsupportedContentFormat,
)
from coap_auth.tokens import public_key_from_cose
from coap_auth.wire import AceParam, ContentFormat
from device_client.rs_common import MAX_TOKEN_BYTES, context_of, endpoint_of, refusal

if TYPE_CHECKING:
    from coap_auth.secure.contexts import OscoreContext
    from device_client.rs import ResourceServer

log = logging.getLogger("device_client.rs")

_FORMATS = (None, ContentFormat.CWT, ContentFormat.ACE_CBOR)


class AuthzInfoResource(resource.Resource):
    """POST an access token (module docstring); 2.01, or 4.00/4.01/4.03 with a reason that
    never quotes the token. Made by ResourceServer.add_to; the constructor raises nothing."""

    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server

    def get_link_description(self) -> dict[str, str]:
        """aiocoap's /.well-known/core entry, with the content formats taken (`ct`). Raises
        nothing."""
        formats = f"{int(ContentFormat.CWT)} {int(ContentFormat.ACE_CBOR)}"
        return {**super().get_link_description(), "ct": formats}

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """Take a token upload (or, under a security context, an update of access rights).
        Raises nothing: every refusal is an answer (4.00, 4.01, 4.03, 4.13, 4.15, 5.03)."""
        rs = self.resource_server
        content_format = request.opt.content_format
        payload = bytes(request.payload)
        try:
            if content_format not in _FORMATS:
                raise UnsupportedContentFormat(
                    "expected application/cwt (61) or application/ace+cbor (19)"
                )
            if len(payload) > MAX_TOKEN_BYTES:
                raise PayloadTooLarge(f"token larger than {MAX_TOKEN_BYTES} bytes")
        except CoapAuthError as error:
            return refusal(error)
        context = context_of(request)
        if context is not None:
            return await self._update(context, payload, content_format)
        if content_format == ContentFormat.ACE_CBOR:
            from device_client.rs_oscore import post_oscore

            return await post_oscore(rs, payload)
        try:
            verified = await rs.verifier.verify(payload)
            if verified.profile == "coap_oscore":
                raise BadRequest(
                    "an OSCORE-profile token is posted in an application/ace+cbor map with"
                    " nonce1 and ace_client_recipientid"
                )
            if verified.profile == "edhoc_oscore":
                if rs.edhoc is None:
                    raise TokenError("this resource server runs no EDHOC: PoP token not usable")
                try:
                    public_key_from_cose(dict(verified.claims.cnf_key or {}))
                except (ValueError, CoapAuthError):
                    raise BadRequest("cnf key is not usable for EDHOC") from None
                key = f"pop:{verified.token_hash.hex()}"
            elif rs.allow_bearer:
                key = endpoint_of(request)
            else:
                raise TokenError("bearer tokens are not accepted here: use an OSCORE profile")
        except CoapAuthError as error:
            log.info("authz-info: refused a token: %s", error.description)
            return refusal(error)
        rs.keep(key, verified)
        log.info(
            "authz-info: %s token of %s accepted (scope %s)",
            verified.profile,
            verified.claims.sub,
            verified.claims.scope,
        )
        return aiocoap.Message(code=aiocoap.CREATED)

    async def _update(
        self, context: OscoreContext, payload: bytes, content_format: int | None
    ) -> aiocoap.Message:
        from device_client.rs_oscore import read_ace_map, same_binding

        rs = self.resource_server
        try:
            if content_format == ContentFormat.ACE_CBOR:
                # RFC 9203 §4.2: only access_token counts; nonces and ids are ignored.
                payload = read_ace_map(payload)[AceParam.ACCESS_TOKEN]
            verified = await rs.verifier.verify(payload)
            if context.withdrawn or not same_binding(context, context.access_token, verified):
                raise TokenError("the new token is not bound to this security context")
        except CoapAuthError as error:
            log.info("authz-info: refused an update for %s: %s", context.peer.id, error.description)
            return refusal(error)
        context.access_token = verified
        rs.bindings.confirm(context)
        log.info(
            "authz-info: access rights of %s updated (scope %s)",
            context.peer.id,
            verified.claims.scope,
        )
        return aiocoap.Message(code=aiocoap.CREATED)
