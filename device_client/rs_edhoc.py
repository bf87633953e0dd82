"""The EDHOC + OSCORE profile of ACE at the resource server (draft-ietf-ace-edhoc-oscore-profile
-11, forward message flow: the client is the EDHOC initiator; code points PROVISIONAL, wire.py).

The RS is an EDHOC responder at /.well-known/edhoc (coap_auth.secure.edhoc.Responder) with its
own credential. It accepts an initiator iff the key its ID_CRED_I names is the cnf of a valid
access token for this audience that is either carried in EAD_3 of that message_3 (label 24,
critical; verified before the credential is looked up; a token whose cnf is another key fails
the handshake with EDHOC error 1), or was POSTed to /authz-info before (application/cwt) by
the same subject. The OSCORE context EDHOC makes is bound to that token; any earlier context
bound to the same token is deleted (§4.2).

Deviation: the draft uploads the first token of a series in EAD_3 only (§4.2, and
"never ... to an unprotected /authz-info" §13); we also hold a token POSTed unprotected, usable
only by an EDHOC peer proving its cnf key, for tokens too large for message_3.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiocoap
from aiocoap import resource

from coap_auth.addresses import address_key
from coap_auth.errors import CoapAuthError, ServiceUnavailable, UnsupportedContentFormat
from coap_auth.tokens import public_key_from_cose
from coap_auth.udp import error_message, source_host
from coap_auth.wire import EAD_ACCESS_TOKEN, ContentFormat
from device_client.rs_common import endpoint_of
from device_client.verify import VerifiedToken

if TYPE_CHECKING:
    from coap_auth.secure.contexts import OscoreContext
    from coap_auth.secure.edhoc import EadItem, Message3Binding, Responder
    from device_client.rs import ResourceServer

log = logging.getLogger("device_client.rs")


class EdhocBinding:
    """The RS's EDHOC responder, and how it ties each handshake to an access token."""

    def __init__(self, rs: ResourceServer) -> None:
        self.rs = rs
        self._responder: Responder | None = None

    @property
    def responder(self) -> Responder:
        """Made on first use (lakers-python is imported only then)."""
        if self._responder is None:
            from coap_auth.secure.edhoc import Responder

            assert self.rs.identity is not None
            self._responder = Responder(
                self.rs.identity,
                self.rs.contexts,
                self._resolve_held,
                self.rs.verifier.clock.now,
                ead_3=self.on_message_3,
            )
        return self._responder

    async def _resolve_held(self, subject: str) -> list[Any]:
        return _keys(self._held(subject))

    def _held(self, subject: str) -> list[VerifiedToken]:
        """The subject's held PoP tokens that are still valid (EdhocFailure while stale)."""
        from coap_auth.secure.edhoc import EdhocFailure

        try:
            return [t for t in self.rs.held_pop_tokens(subject) if self.rs._valid(t)]
        except ServiceUnavailable:
            raise EdhocFailure("keys or revocations not current; try again later") from None

    async def on_message_3(self, items: list[EadItem]) -> Message3Binding:
        """The Responder's EAD_3 hook (coap_auth.secure.edhoc.Ead3Handler)."""
        from coap_auth.secure.edhoc import EdhocFailure, Message3Binding

        if any(critical and label != EAD_ACCESS_TOKEN for label, critical, _ in items):
            raise EdhocFailure("critical EAD item not supported")
        carried = [(crit, value) for label, crit, value in items if label == EAD_ACCESS_TOKEN]
        if len(carried) > 1:
            raise EdhocFailure("more than one access token in EAD_3")
        candidates: Callable[[str], list[VerifiedToken]] = self._held
        if carried:
            critical, value = carried[0]
            if not critical or not value:
                raise EdhocFailure("the access token EAD item must be critical and non-empty")
            try:
                verified = await self.rs.verifier.verify(value)
            except CoapAuthError as error:
                log.info("EDHOC: access token in EAD_3 refused: %s", error.description)
                raise EdhocFailure("access token not accepted") from None
            if verified.claims.cnf_key is None:
                raise EdhocFailure("access token not accepted: no cnf key")

            def carried_token(subject: str) -> list[VerifiedToken]:
                # The id EDHOC authenticates is the token's sub: a client naming another
                # (by kid or in a CCS) with its own token and key is refused.
                return [verified] if verified.claims.sub == subject else []

            candidates = carried_token

        async def resolve(subject: str) -> list[Any]:
            return _keys(candidates(subject))

        def bind(context: OscoreContext) -> None:
            credential = context.peer.credential
            if credential is not None:
                for token in candidates(credential.subject):
                    key = token.claims.cnf_key
                    if (
                        key is not None
                        and token.claims.sub == credential.subject
                        and credential.same_key(dict(key))
                    ):
                        self.rs.bindings.bind(context, token)
                        if self.rs.on_token is not None:
                            self.rs.on_token(token, f"oscore:{context.recipient_id.hex()}")
                        log.info(
                            "EDHOC: OSCORE context for %s (scope %s)",
                            credential.subject,
                            token.claims.scope,
                        )
                        return
            raise EdhocFailure("message_3 not accepted")

        return Message3Binding(resolve, bind)


def _host(request: aiocoap.Message) -> str:
    """Whom pending handshakes are counted against: the source host (an IPv6 one by its /64),
    not host and port, or one host would hold a share per port."""
    host = source_host(request)
    return endpoint_of(request) if host == "-" else address_key(host)


def _keys(tokens: list[VerifiedToken]) -> list[Any]:
    """The P-256 public keys of the tokens' cnf (others cannot run EDHOC suite 2)."""
    keys = []
    for token in tokens:
        try:
            keys.append(public_key_from_cose(dict(token.claims.cnf_key or {})))
        except (ValueError, CoapAuthError):
            continue
    return keys


class EdhocResource(resource.Resource):
    """`/.well-known/edhoc` of the RS (RFC 9528 Appendix A.2): POST true + message_1 -> 2.04
    message_2; POST C_R + message_3 -> 2.04 (no message_4). A failure is an EDHOC error message
    (4.00, application/edhoc+cbor-seq) that never carries a token or key."""

    def __init__(self, binding: EdhocBinding) -> None:
        super().__init__()
        self.binding = binding

    def get_link_description(self) -> dict[str, str]:
        return {**super().get_link_description(), "rt": "core.edhoc"}

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        from coap_auth.secure.edhoc import MESSAGE_1_PREFIX, EdhocFailure

        if request.opt.content_format not in (None, ContentFormat.CID_EDHOC_CBOR_SEQ):
            unsupported = UnsupportedContentFormat(
                "EDHOC messages are application/cid-edhoc+cbor-seq"
            )
            return error_message(unsupported)
        payload = bytes(request.payload)
        responder = self.binding.responder
        try:
            if payload.startswith(MESSAGE_1_PREFIX):
                message_2 = responder.message_1(payload[len(MESSAGE_1_PREFIX) :], _host(request))
                return aiocoap.Message(
                    code=aiocoap.CHANGED,
                    payload=message_2,
                    content_format=ContentFormat.EDHOC_CBOR_SEQ,
                )
            await responder.message_3(payload)
        except EdhocFailure as failure:
            log.info("EDHOC refused: %s", failure.info)
            return aiocoap.Message(
                code=aiocoap.BAD_REQUEST,
                payload=failure.message(),
                content_format=ContentFormat.EDHOC_CBOR_SEQ,
            )
        return aiocoap.Message(code=aiocoap.CHANGED)
