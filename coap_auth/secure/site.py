"""A server site behind OSCORE: protected requests are unprotected under their context,
rendered by the inner site with the authenticated peer on `request.remote.peer`, and their
responses (and notifications) protected again. Unprotected requests pass through unchanged;
each resource decides whether it needs protection.

Adapted from aiocoap 0.4.17's `OscoreSiteWrapper`, with our own context table (a dict lookup,
bounded) instead of its credentials scan, no EDHOC of its own (the inner site serves
`/.well-known/edhoc`), and refusals logged without secrets, one line per kind per minute.
"""

from __future__ import annotations

import logging
from typing import Any

import aiocoap
import aiocoap.pipe
from aiocoap import interfaces, oscore
from aiocoap.numbers.codes import FETCH, POST
from aiocoap.transports.oscore import OSCOREAddress

from coap_auth.clock import Clock
from coap_auth.errors import BadOption, BadRequest, CoapAuthError, Unauthorized
from coap_auth.secure.contexts import ContextTable
from coap_auth.secure.credentials import PeerCredential
from coap_auth.udp import DropLog, error_message

log = logging.getLogger("coap_auth.oscore")

MAX_PIV_BYTES = 5


class ProtectedRemote(OSCOREAddress):
    """The remote of an unprotected request: its context, and the datagram's address."""

    @property
    def peer(self) -> PeerCredential:
        return self.security_context.peer  # type: ignore[no-any-return]

    @property
    def sockaddr(self) -> Any:
        return getattr(self.underlying_address, "sockaddr", None)


class ProtectedSite(interfaces.Resource):
    def __init__(self, inner_site: Any, contexts: ContextTable, clock: Clock) -> None:
        self._inner_site = inner_site
        self.contexts = contexts
        # One line per kind of refusal per interval, never a flood of them.
        self._refusals = DropLog(log, clock)

    def get_resources_as_linkheader(self) -> Any:
        return self._inner_site.get_resources_as_linkheader()

    async def render(self, request: Any) -> Any:
        raise RuntimeError("ProtectedSite renders through render_to_pipe only")

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        raise RuntimeError("ProtectedSite renders through render_to_pipe only")

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        try:
            unprotected = oscore.verify_start(request)
        except oscore.NotAProtectedMessage:
            await self._inner_site.render_to_pipe(pipe)
            return
        # aiocoap 0.4.17 raises IndexError for flag h (kid context) with no length byte after.
        except (oscore.DecodeError, IndexError):
            self._refuse(pipe, BadOption("malformed OSCORE option"))
            return
        # RFC 8613 §8.2: a request that does not decode as OSCORE (an outer code other than
        # POST or FETCH, no kid; the Group OSCORE flag, which aiocoap fails on with an
        # AttributeError under a non-group context) gets 4.02; an unknown kid gets 4.01.
        # Partial IV lengths 6 and 7 are reserved (RFC 8613 §6.1); aiocoap asserts on them.
        if (
            request.code not in (FETCH, POST)
            or oscore.COSE_KID not in unprotected
            or oscore.COSE_COUNTERSIGNATURE0 in unprotected
            or len(unprotected.get(oscore.COSE_PIV, b"")) > MAX_PIV_BYTES
        ):
            self._refuse(pipe, BadOption("not a decodable OSCORE request"))
            return
        try:
            context = self.contexts.find_oscore(unprotected)
        except KeyError:
            self._refuse(pipe, Unauthorized("security context not found"))
            return
        try:
            inner, seqno = context.unprotect(request)
        except oscore.ReplayErrorWithEcho as recovery:
            # RFC 8613 Appendix B.1.2: a provisioned context's replay window is unknown after
            # a crash; a protected 4.01 with Echo asks the device to repeat the request.
            log.info("OSCORE replay window of %s unknown: asking for Echo", context.peer.id)
            pipe.add_response(recovery.to_message(), is_last=True)
            return
        except oscore.ReplayError:
            self._refuse(pipe, Unauthorized("replay detected"))
            return
        except oscore.DecodeError:
            self._refuse(pipe, BadOption("malformed COSE object"))
            return
        except oscore.ProtectionInvalid:
            self._refuse(pipe, BadRequest("decryption failed"))
            return
        except Exception:  # aiocoap on a plaintext that is no CoAP message: never log it
            self._refuse(pipe, BadRequest("the protected message does not decode"))
            return
        self.contexts.used(context)
        inner.remote = ProtectedRemote(context, request.remote)
        problem = _malformed(inner)
        if problem is not None:
            # An authenticated peer's own mistake: refused, unrendered, in a protected answer,
            # since the request decrypted (RFC 8613 §8.2 ends there).
            answer, _ = context.context_for_response().protect(
                error_message(BadRequest(problem), compact=True), seqno
            )
            pipe.add_response(answer, is_last=True)
            return
        context = context.context_for_response()
        inner_pipe = aiocoap.pipe.IterablePipe(inner)
        with_errors = aiocoap.pipe.error_to_message(inner_pipe, log)
        aiocoap.pipe.run_driving_pipe(
            with_errors,
            self._inner_site.render_to_pipe(inner_pipe),
            name="OSCORE response rendering",
        )
        async for event in inner_pipe:
            if event.exception is not None:
                log.warning("protected request failed in rendering: %s", type(event.exception))
                message = aiocoap.Message(code=aiocoap.INTERNAL_SERVER_ERROR)
                is_last = True
            else:
                message = event.message
                is_last = event.is_last
            if not is_last:
                message.opt.observe = 0
            try:
                protected, _ = context.protect(message, seqno)
            except Exception:  # noqa: BLE001 (a context withdrawn while in use, e.g. observed)
                log.info("OSCORE context of %s withdrawn: its exchange ends", context.peer.id)
                withdrawn = Unauthorized("security context withdrawn")
                pipe.add_response(error_message(withdrawn, compact=True), is_last=True)
                break
            if message.opt.observe is not None:
                protected.opt.observe = context.sender_sequence_number & 0xFFFFFFFF
            # A notification goes out as the inner one was meant to: NON, or the periodic CON
            # (RFC 7641 §4.5, coap/observers.py); protect() leaves the outer type unset.
            protected.mtype = message.mtype
            pipe.add_response(protected, is_last=is_last)
            if is_last:
                break

    def _refuse(self, pipe: Any, refusal: CoapAuthError) -> None:
        """Answer a request that failed OSCORE: a CON only, compact (its sender is unverified:
        nothing for a spoofed NON to reflect, RFC 7252 §11.3), and log the kind,
        rate-limited."""
        request = pipe.request
        self._refusals.dropped(f"OSCORE request refused: {refusal.description}", _sockaddr(request))
        if request.mtype == aiocoap.CON:
            response = error_message(refusal, compact=True)
            if isinstance(refusal, Unauthorized):
                response.opt.max_age = 0
            pipe.add_response(response, is_last=True)


def _malformed(inner: Any) -> str | None:
    """Why an unprotected request cannot be rendered (aiocoap would fail on it with a
    traceback that quotes the decrypted bytes), or None."""
    if not inner.code.is_request():
        return "the protected message is not a request"
    try:
        inner.opt.uri_path  # noqa: B018 (text options decode on access)
        inner.opt.uri_query  # noqa: B018
        inner.get_request_uri()
    except Exception:
        return "a protected option does not decode"
    return None


def _sockaddr(request: Any) -> Any:
    return getattr(request.remote, "sockaddr", None) or ("-",)
