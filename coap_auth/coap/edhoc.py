"""`/.well-known/edhoc`: the EDHOC responder's resource (RFC 9528 Appendix A.2).

POST `true` + message_1 -> 2.04 message_2; POST C_R + message_3 -> 2.04 with no payload (no
message_4: the first OSCORE response confirms the keys). A failure is an EDHOC error message
(4.00, application/edhoc+cbor-seq) and the request's log line naming the reason, never key
material.
"""

from __future__ import annotations

import aiocoap
from aiocoap import resource

from coap_auth.coap.endpoint import Endpoint, caller
from coap_auth.errors import CoapAuthError, UnsupportedContentFormat
from coap_auth.secure.edhoc import MESSAGE_1_PREFIX, EdhocFailure, Responder
from coap_auth.service import AuthService
from coap_auth.udp import source_host
from coap_auth.wire import CoapCode, ContentFormat


class EdhocError(CoapAuthError):
    """An EDHOC error message (RFC 9528 §6) as the answer to a handshake request."""

    def __init__(self, failure: EdhocFailure) -> None:
        super().__init__(f"EDHOC: {failure.info}")
        self.failure = failure

    def render(self, *, compact: bool = False) -> tuple[CoapCode, ContentFormat, bytes]:
        payload = self.failure.message(compact=compact)
        return CoapCode.BAD_REQUEST, ContentFormat.EDHOC_CBOR_SEQ, payload


class EdhocResource(Endpoint, resource.Resource):
    path = "/.well-known/edhoc"
    # Every message_1 costs two P-256 key agreements: counted toward the per-address budget.
    rate_limited = True

    def __init__(self, service: AuthService, responder: Responder) -> None:
        super().__init__()
        self.service = service
        self.responder = responder

    def get_link_description(self) -> dict[str, str]:
        return {**super().get_link_description(), "rt": "core.edhoc"}

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.content_format not in (None, ContentFormat.CID_EDHOC_CBOR_SEQ):
            raise UnsupportedContentFormat("EDHOC messages are application/cid-edhoc+cbor-seq")
        payload = bytes(request.payload)
        try:
            if payload.startswith(MESSAGE_1_PREFIX):
                message_2 = self.responder.message_1(
                    payload[len(MESSAGE_1_PREFIX) :], source_host(request)
                )
                return aiocoap.Message(
                    code=aiocoap.CHANGED,
                    payload=message_2,
                    content_format=ContentFormat.EDHOC_CBOR_SEQ,
                )
            context = await self.responder.message_3(payload)
        except EdhocFailure as failure:
            raise EdhocError(failure) from None
        caller.set(context.peer.id)
        return aiocoap.Message(code=aiocoap.CHANGED)
