"""What every resource of the service shares: one place for the method check, the request
size cap, block-wise uploads (coap/blockwise.py), the per-address rate limit, error rendering,
the amplification bound, and the one log line (and metrics count) per request.

Resources implement `render_<method>` and raise `CoapAuthError`; anything else is a server
fault, logged once with a request id and answered 5.00 with no internals.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import time
from typing import Any, ClassVar

import aiocoap

from coap_auth.clock import SystemClock
from coap_auth.coap.blockwise import BlockwiseUploads
from coap_auth.coap.messages import decode_ace_payload
from coap_auth.coap.protection import peer
from coap_auth.echo import unverified_source, within_bound
from coap_auth.errors import CoapAuthError, InvalidClient, MethodNotAllowed, ProtectionRequired
from coap_auth.metrics import Metrics
from coap_auth.service import AuthService, IssuedToken
from coap_auth.service.rate_limit import RateLimiter, address_key
from coap_auth.text import log_field, loggable
from coap_auth.udp import DropLog, error_message, source_host
from coap_auth.wire import ContentFormat

log = logging.getLogger("coap_auth.access")

# Refusals of requests from unverified source addresses (coap_auth.echo.unverified_source).
_UNVERIFIED_REFUSALS = DropLog(
    log, SystemClock(), what="refused a request (source not proven) from", level=logging.INFO
)

# Who the request says it comes from (a client or resource-server id, never a secret), set by
# a resource once it has parsed the body, for the request's log line (escaped there: it is
# the request's own text).
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="-")
# What /token issued (or refreshed), for the request's log line: the token hash's first 16
# hex digits (what `coap-auth tokens revoke --hash` takes) and the refresh family id (hex).
issued_token: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "issued_token", default=None
)


def note_issued(issued: IssuedToken) -> None:
    """Name the client and what it was issued in the request's log line (never the token)."""
    caller.set(issued.claims.sub)
    family = issued.family_id.hex() if issued.family_id is not None else "-"
    issued_token.set((issued.hash_prefix, family))


class Endpoint:
    """Mixin for the service's aiocoap resources (before the aiocoap base class)."""

    path: ClassVar[str]
    service: AuthService
    # POST endpoints count toward the per-address rate limit.
    rate_limited: ClassVar[bool] = False
    # Answered only over OSCORE while `require_oscore` is on (docs/protocol.md "Protected
    # channels"): the endpoints that carry a secret or a token.
    protected: ClassVar[bool] = False
    address_limits: RateLimiter | None = None
    # Block-wise uploads of the whole site (build_site sets it on every resource); without
    # it, aiocoap's own spool would assemble them.
    uploads: BlockwiseUploads | None = None

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        started = time.monotonic()
        if self.protected and self.service.settings.require_oscore and peer(request) is None:
            pipe.add_response(
                self._answer(request, self.protection_required(), started), is_last=True
            )
            return
        block1 = request.opt.block1
        if block1 is not None and self.uploads is not None:
            await self._render_block(pipe, self.uploads)
            return
        if self.rate_limited and self.address_limits is not None:
            challenge = unverified_source.get()
            address = address_key(source_host(request))
            try:
                if challenge is None:
                    self.address_limits.hit(address, "address")
                else:
                    # A budget of its own (coap_auth.echo.unverified_source): past it, the
                    # Echo challenge, which only the address's real owner can answer, and
                    # then spends the address's budget.
                    self.address_limits.hit(f"unverified {address}", "address")
            except CoapAuthError as error:
                answer = self._answer(request, error, started) if challenge is None else challenge()
                pipe.add_response(answer, is_last=True)
                return
        await super().render_to_pipe(pipe)  # type: ignore[misc]

    def protection_required(self) -> CoapAuthError:
        """The 4.01 for an unprotected request to a protected endpoint (problem details)."""
        return ProtectionRequired(
            f"{self.path} takes OSCORE-protected requests only: run EDHOC at /.well-known/edhoc"
        )

    async def _render_block(self, pipe: Any, uploads: BlockwiseUploads) -> None:
        """One Block1 fragment (RFC 7959 §2.5): counted toward the per-address limit, held
        until the last block, answered 2.31 Continue meanwhile; the last one renders the
        assembled request."""
        request = pipe.request
        started = time.monotonic()
        caller.set("-")
        issued_token.set(None)
        # RFC 7959 §2.5: one upload per sender endpoint and resource (path and query).
        key = (request.remote.blockwise_key, self.path, request.opt.uri_query)
        try:
            assembled = uploads.feed(request, source_host(request), key)
        except CoapAuthError as error:
            pipe.add_response(self._answer(request, error, started), is_last=True)
            return
        if assembled is None:
            response = aiocoap.Message(code=aiocoap.CONTINUE)
        else:
            # As aiocoap does: a large answer goes out block-wise (Block2) from its cache.
            block2 = self._block2  # type: ignore[attr-defined]
            response = await block2.extract_or_insert(assembled, lambda: self.render(assembled))
        # RFC 7959 §2.3: the answer to a block echoes its Block1 option.
        response.opt.block1 = request.opt.block1
        pipe.add_response(response, is_last=True)

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        started = time.monotonic()
        caller.set("-")
        issued_token.set(None)
        method = str(request.code).lower()
        handler = getattr(self, f"render_{method}", None)
        try:
            if handler is None:
                raise MethodNotAllowed(f"{request.code} not allowed on {self.path}")
            response = await handler(request)
        except CoapAuthError as error:
            return self._answer(request, error, started)
        except Exception:
            request_id = secrets.token_hex(4)
            log.exception("request %s to %s failed", request_id, self.path)
            self._log(request, "5.00", f"server fault {request_id}", started)
            return aiocoap.Message(code=aiocoap.Code.INTERNAL_SERVER_ERROR)
        self._log(request, str(response.code).split()[0], "ok", started)
        return response

    def _answer(
        self, request: aiocoap.Message, error: CoapAuthError, started: float
    ) -> aiocoap.Message:
        return answer_error(request, error, self.path, started, self.service.metrics)

    def _log(self, request: aiocoap.Message, code: str, outcome: str, started: float) -> None:
        log_request(request, self.path, code, outcome, started, self.service.metrics)


class AceEndpoint(Endpoint):
    """An endpoint taking application/ace+cbor POSTs (/token, /revoke, /introspect)."""

    rate_limited = True
    protected = True

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service

    def get_link_description(self) -> dict[str, str]:
        description: dict[str, str] = super().get_link_description()  # type: ignore[misc]
        return {**description, "ct": str(int(ContentFormat.ACE_CBOR))}

    def protection_required(self) -> CoapAuthError:
        """RFC 9200 §5.8.3 / §5.9.3: the ACE endpoints answer errors as application/ace+cbor,
        so an unprotected request gets invalid_client (4.01) saying protection is needed."""
        return InvalidClient(
            f"{self.path} takes OSCORE-protected requests only: run EDHOC at /.well-known/edhoc"
        )

    def ace_body(self, request: aiocoap.Message) -> dict[Any, Any]:
        return decode_ace_payload(
            request.payload, request.opt.content_format, self.service.settings.max_payload
        )


def answer_error(
    request: aiocoap.Message,
    error: CoapAuthError,
    path: str,
    started: float,
    metrics: Metrics | None = None,
) -> aiocoap.Message:
    """The response for `error`, within the amplification bound, and its log line."""
    response = error_message(error)
    if not within_bound(response, request):
        response = error_message(error, compact=True)
    log_request(request, path, str(response.code).split()[0], error.description, started, metrics)
    return response


def log_request(
    request: aiocoap.Message,
    path: str,
    code: str,
    outcome: str,
    started: float,
    metrics: Metrics | None = None,
) -> None:
    """The one line per request, and its count in `metrics` (by the resource's own
    `path`: endpoints pass theirs, a fixed set): never a payload, so never a secret or a
    token. A refusal of a request that does not prove its source (its sender may be forged)
    is one line per kind (method and code: a bounded set, unlike paths) and minute, with
    the count of the others.

    The line's fields also go into the record as attributes (method, path, source, client,
    code, outcome, duration_ms, and token_hash and family for what /token issued), which the
    JSON log format writes as keys (coap_auth.cli.runtime)."""
    elapsed = time.monotonic() - started
    if metrics is not None:
        metrics.request(path, code, elapsed)
    if unverified_source.get() is not None and code[:1] in ("4", "5"):
        _UNVERIFIED_REFUSALS.dropped(f"{request.code} -> {code}", (source_host(request),))
        return
    # Observable GETs are re-rendered for every notification: those lines are DEBUG.
    level = logging.DEBUG if request.code == aiocoap.GET else logging.INFO
    if not log.isEnabledFor(level):
        return
    fields: dict[str, object] = {
        "method": str(request.code),
        "path": loggable(path),
        "source": loggable(source_host(request)),
        "client": caller.get(),
        "code": code,
        "outcome": loggable(outcome),
        "duration_ms": round(elapsed * 1000, 1),
    }
    issued = issued_token.get()
    tail = ""
    if issued is not None:
        fields["token_hash"], fields["family"] = issued
        tail = f" token_hash={issued[0]} family={issued[1]}"
    # Whatever the request chose (its caller id, and anything an error description
    # quotes) is escaped: a newline or control character cannot forge another line.
    log.log(
        level,
        "%s %s from=%s caller=%s -> %s %s (%.1f ms)%s",
        request.code,
        fields["path"],
        fields["source"],
        log_field(caller.get()),
        code,
        fields["outcome"],
        elapsed * 1000,
        tail,
        extra=fields,
    )
