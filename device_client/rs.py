"""A resource server's side of ACE on aiocoap: proof-of-possession by the OSCORE profiles.

    rs = ResourceServer(verifier, as_uri=AS, identity=DeviceKey("thermostat", key))
    site = aiocoap.resource.Site()
    site.add_resource(["temp"], Temperature(rs))      # render methods under @require_scope
    context = await rs.serve(site, ("::", 5683))       # or: served = rs.add_to(site)

Every guarded request is decided from the access token bound to the OSCORE security context
it arrived under (`request.remote.security_context`), never from its source address:

- OSCORE profile (RFC 9203): the client POSTs {access_token, nonce1, ace_client_recipientid}
  (application/ace+cbor) to the unprotected /authz-info; the RS decrypts the token (COSE_Encrypt0
  under the audience's AES key), answers {nonce2, ace_server_recipientid} and derives the
  context from the token's OSCORE_Input_Material (RFC 9203 §4.3). rs_oscore.py.
- EDHOC + OSCORE profile (draft-ietf-ace-edhoc-oscore-profile-11, provisional code points): the
  token's cnf is the client's COSE_Key; the client runs EDHOC with the RS at
  /.well-known/edhoc with that key, the token in EAD_3 (label 24, critical) or POSTed to
  /authz-info (application/cwt) beforehand. The context is bound to the token whose cnf is the
  key EDHOC authenticated. rs_edhoc.py.
- Bearer tokens (no cnf) only with `allow_bearer=True`, kept per endpoint as before the
  profiles: anyone who can send from that address and port uses them.

An unprotected request to a guarded resource gets 4.01 with AS Request Creation Hints
(RFC 9200 §5.3); a scope too narrow 4.03; a token no longer valid (expired, revoked, its key
withdrawn) takes its context with it and the request gets an unprotected 4.01 (RFC 9203 §4.3).
State is bounded: tokens per subject and in all, contexts per subject and in all, the nonce1
memory. Neither tokens nor keys appear in logs or error bodies.

No amplifier (RFC 7252 §11.3, RFC 9175 §2.4): coap_auth.echo's AmplificationGuard is the
outermost site, so an unprotected answer to a source address not yet verified is at most 3x
its request, or else a 4.01 with an Echo option; returning the Echo verifies the address
for `verified_lifetime` s, in a table of at most `max_verified` addresses (rs_amplification).
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiocoap
from aiocoap import resource

from coap_auth.echo import (
    LOOPBACK_NETWORKS,
    MAX_VERIFIED_PER_PREFIX,
    AmplificationGuard,
    EchoValues,
    VerifiedAddresses,
)
from coap_auth.errors import ServiceUnavailable, TokenError
from coap_auth.secure.credentials import EdhocIdentity
from coap_auth.udp import CriticalOptionGuard, create_server_context, error_message
from device_client.credentials import DeviceKey
from device_client.errors import InsufficientScope
from device_client.rs_amplification import (
    ECHO_KEY_BYTES,
    MAX_VERIFIED,
    VERIFIED_LIFETIME,
    HintFitting,
    UploadBound,
    echo_first_for,
    hints_message,
    network_list,
)
from device_client.rs_common import (
    HINT_AS,
    HINT_AUDIENCE,
    HINT_SCOPE,
    MAX_TOKEN_BYTES,
    context_of,
    endpoint_of,
    problem,
)
from device_client.rs_contexts import ContextBindings
from device_client.rs_edhoc import EdhocBinding, EdhocResource
from device_client.rs_resources import AuthzInfoResource
from device_client.verify import TokenVerifier, VerifiedToken

log = logging.getLogger("device_client.rs")

__all__ = ["AuthzInfoResource", "ResourceServer", "endpoint_of", "require_scope"]

Render = Callable[[Any, aiocoap.Message], Awaitable[aiocoap.Message]]


class ResourceServer:
    """Tokens and the OSCORE contexts bound to them, for one audience (`verifier.audience`).

    `identity` (the RS's own P-256 DeviceKey, client_id = the audience id, or an
    EdhocIdentity) enables the EDHOC profile (/.well-known/edhoc); without it only the
    RFC 9203 profile (and bearer tokens, if allowed) is served. `allow_bearer` accepts tokens
    without cnf, bound to the uploading endpoint only (off by default: a bearer token is used
    by whoever holds it). Bounds: `max_tokens` kept tokens (bearer ones, and PoP tokens
    awaiting EDHOC) with `max_tokens_per_subject` each, `max_contexts` contexts with
    `contexts_per_subject` each, dropped after `context_idle_timeout` s unused, and the last
    `max_nonces` nonce1 values. `on_token(token, key)` is called for each token accepted (key:
    the endpoint of a bearer token, "pop:<hash>" for one held for EDHOC, "oscore:<recipient
    id>" for one bound to a context).

    Amplification (module docstring): addresses in `verified_networks` (CIDR strings, or one
    comma-separated string; "" or () for none) count as verified from the start (default
    loopback, as on the AS); others once they return an Echo value, for `verified_lifetime`
    s, at most `max_verified` of them (the least recently verified go first). Echo values are
    MACed under `echo_key` (default: random per process, so a restart invalidates the values
    outstanding and their clients get a fresh challenge). While the EDHOC responder holds half
    its pending handshakes or more, message_1 from an unverified address is challenged first.

    Block-wise uploads (RFC 7959) to any resource are refused with 4.13 once they reach past
    `max_upload` bytes (default MAX_TOKEN_BYTES, the largest token /authz-info takes; raise it
    for a resource of your own that takes more), and on /.well-known/edhoc altogether
    (rs_amplification.UploadBound).

    Raises ValueError for inconsistent bounds, a `max_upload` under MAX_TOKEN_BYTES, an
    identity not named after the audience, an `echo_key` under 16 bytes or a network that
    does not parse, ChannelUnavailable for an identity that cannot run EDHOC (an Ed25519
    DeviceKey).
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        as_uri: str | None = None,
        identity: DeviceKey | EdhocIdentity | None = None,
        allow_bearer: bool = False,
        max_tokens: int = 64,
        max_tokens_per_subject: int = 4,
        max_contexts: int = 64,
        contexts_per_subject: int = 4,
        context_idle_timeout: int = 3600,
        max_nonces: int = 1024,
        on_token: Callable[[VerifiedToken, str], None] | None = None,
        verified_networks: str | Iterable[str] = LOOPBACK_NETWORKS,
        max_verified: int = MAX_VERIFIED,
        verified_lifetime: int = VERIFIED_LIFETIME,
        echo_key: bytes | None = None,
        max_upload: int = MAX_TOKEN_BYTES,
    ) -> None:
        if not 1 <= max_tokens_per_subject <= max_tokens:
            raise ValueError("need 1 <= max_tokens_per_subject <= max_tokens")
        if max_upload < MAX_TOKEN_BYTES:
            raise ValueError(f"max_upload must be at least {MAX_TOKEN_BYTES} (a token)")
        self.max_upload = max_upload
        if max_verified < 1 or verified_lifetime < 1:
            raise ValueError("need max_verified >= 1 and verified_lifetime >= 1")
        self.verifier = verifier
        # Named in 4.01 answers so a client knows where to get a token (RFC 9200 §5.3).
        self.as_uri = as_uri
        self.allow_bearer = allow_bearer
        self.max_tokens = max_tokens
        self.max_tokens_per_subject = max_tokens_per_subject
        self.on_token = on_token
        # Bearer tokens by endpoint, and PoP tokens awaiting EDHOC by "pop:<hash>"; oldest
        # first.
        self._tokens: OrderedDict[str, VerifiedToken] = OrderedDict()
        self.bindings = ContextBindings(
            verifier.clock.now,
            max_contexts=max_contexts,
            per_subject=contexts_per_subject,
            idle_timeout=context_idle_timeout,
            max_nonces=max_nonces,
        )
        # The contexts (coap_auth.secure.contexts.ContextTable) and the nonce1 memory.
        self.contexts = self.bindings.table
        self.nonces = self.bindings.nonces
        if isinstance(identity, DeviceKey):
            identity = identity.edhoc_identity()
        if identity is not None and identity.credential.subject != verifier.audience:
            # Clients build the RS's credential from the audience id and rs_cnf (design).
            raise ValueError("the RS's EDHOC identity must be named after its audience")
        self.identity = identity
        self.edhoc = EdhocBinding(self) if identity is not None else None
        clock = verifier.clock
        self.echo = EchoValues(echo_key or secrets.token_bytes(ECHO_KEY_BYTES), clock)
        self.verified = VerifiedAddresses(
            clock,
            lifetime=verified_lifetime,
            max_entries=max_verified,
            per_prefix=min(MAX_VERIFIED_PER_PREFIX, max_verified),
            networks=network_list(verified_networks),
        )
        # The site `add_to` made last (its `challenges` count the Echo challenges sent).
        self.guard: AmplificationGuard | None = None
        self._served: list[aiocoap.Context] = []

    # -- serving --------------------------------------------------------------------------------

    def add_to(self, site: resource.Site) -> Any:
        """Add /authz-info (and /.well-known/edhoc with an identity) to `site`; return the site
        to serve: the amplification guard (and the hints' cut, rs_amplification) in front of
        OSCORE unprotection in front of it (and of the bound on block-wise uploads, and the
        4.02 check of critical options). Serve
        it with `create_server_context(served, bind, check_options=False)` (the OSCORE option
        is critical: a check in front would refuse it), or use `serve`. Raises nothing."""
        from coap_auth.secure.site import ProtectedSite

        site.add_resource(["authz-info"], AuthzInfoResource(self))
        if self.edhoc is not None:
            site.add_resource([".well-known", "edhoc"], EdhocResource(self.edhoc))
        clock = self.verifier.clock
        # Inside OSCORE: the inner request of a protected one is bounded as well.
        bounded = UploadBound(CriticalOptionGuard(site), self.max_upload, clock)
        protected = ProtectedSite(bounded, self.contexts, clock)
        fitting = HintFitting(protected, self.verified)
        echo_first = echo_first_for(self._handshakes_under_pressure)
        self.guard = AmplificationGuard(fitting, self.echo, self.verified, echo_first=echo_first)
        return self.guard

    def _handshakes_under_pressure(self) -> bool:
        """Whether the EDHOC responder holds half its pending handshakes or more."""
        return self.edhoc is not None and self.edhoc.responder.under_pressure

    async def serve(self, site: resource.Site, bind: tuple[str, int]) -> aiocoap.Context:
        """`add_to(site)`, served on UDP at `bind` until `close()` (or the end of `async with`),
        on a port no other process shares: one in use (by the AS, say) is refused, not joined.
        Raises OSError when the address cannot be bound (its text one line naming
        address:port and why, e.g. "cannot serve on [::]:5683: another process is serving
        that port")."""
        context = await create_server_context(self.add_to(site), bind, check_options=False)
        self._served.append(context)
        return context

    async def close(self) -> None:
        """Stop serving (every context `serve` made, each awaited to its end) and forget
        every security context and token: nothing outlives the server. Raises nothing; a
        caller's cancellation propagates."""
        served, self._served = self._served, []
        for context in served:
            await context.shutdown()
        for context in self.contexts.contexts():
            self.bindings.drop(context)
        self._tokens.clear()

    async def __aenter__(self) -> ResourceServer:
        """`async with ResourceServer(...) as rs: await rs.serve(site, bind)`. Raises
        nothing."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """`close()`. Raises nothing."""
        await self.close()

    # -- bearer tokens and PoP tokens awaiting EDHOC -------------------------------------------

    async def accept(self, token: bytes, endpoint: str) -> VerifiedToken:
        """Verify a bearer token (no cnf) and keep it for `endpoint`, replacing that
        endpoint's previous one (whether bearer tokens are allowed is /authz-info's decision).
        Raises what `TokenVerifier.verify` raises, or MalformedToken for a PoP token."""
        from coap_auth.errors import MalformedToken

        verified = await self.verifier.verify(token)
        if verified.profile != "bearer":
            raise MalformedToken("a proof-of-possession token is not a bearer token")
        self.keep(endpoint, verified)
        return verified

    def keep(self, key: str, verified: VerifiedToken) -> None:
        """Hold a verified token under `key`, within the bounds (class docstring). Raises
        nothing but what `on_token` raises."""
        self._tokens.pop(key, None)
        self._tokens[key] = verified
        subject = verified.claims.sub
        mine = [k for k, t in self._tokens.items() if t.claims.sub == subject]
        for oldest in mine[: max(0, len(mine) - self.max_tokens_per_subject)]:
            del self._tokens[oldest]
        if len(self._tokens) > self.max_tokens:
            self.purge()
            while len(self._tokens) > self.max_tokens:
                self._evict_from_largest_subject()
        if self.on_token is not None:
            self.on_token(verified, key)

    def _evict_from_largest_subject(self) -> None:
        """Drop the oldest token of the subject holding the most (the oldest such on a tie)."""
        held: dict[str, list[str]] = {}
        for key, token in self._tokens.items():
            held.setdefault(token.claims.sub, []).append(key)
        largest = max(held.values(), key=len)
        del self._tokens[largest[0]]

    def held_pop_tokens(self, subject: str) -> list[VerifiedToken]:
        """The PoP tokens of `subject` awaiting (or used by) EDHOC, the latest issued first
        (by iat, not by upload: an older token of the subject posted again by someone who
        copied it must not be the one EDHOC binds). Raises nothing."""
        held = [
            t for k, t in self._tokens.items() if k.startswith("pop:") and t.claims.sub == subject
        ]
        return sorted(held, key=lambda t: t.claims.iat, reverse=True)

    # -- contexts -------------------------------------------------------------------------------

    # -- decisions ------------------------------------------------------------------------------

    def token_for(self, request_or_endpoint: aiocoap.Message | str) -> VerifiedToken | None:
        """The token bound to the OSCORE context of a request (a bearer token kept for its
        endpoint when unprotected, allow_bearer only); no validity check. Raises nothing."""
        if isinstance(request_or_endpoint, str):
            return self._tokens.get(request_or_endpoint) if self.allow_bearer else None
        context = context_of(request_or_endpoint)
        if context is not None:
            bound = context.access_token
            return bound if isinstance(bound, VerifiedToken) and not context.withdrawn else None
        if not self.allow_bearer:
            return None
        return self._tokens.get(endpoint_of(request_or_endpoint))

    def purge(self) -> list[tuple[str, VerifiedToken]]:
        """Drop expired and revoked tokens and those of withdrawn keys (say after a TRL or key
        set change), with the contexts bound to them; return what was dropped (contexts as
        "oscore:<recipient id hex>"). While the verifier is stale nothing is dropped. Raises
        nothing."""
        dropped: list[tuple[str, VerifiedToken]] = []
        try:
            for key, verified in list(self._tokens.items()):
                if not self._valid(verified):
                    dropped.append((key, self._tokens.pop(key)))
            dropped += self.bindings.drop_invalid(self._valid)
        except ServiceUnavailable:
            pass
        return dropped

    def _valid(self, verified: VerifiedToken) -> bool:
        """Whether a kept token still holds; raises ServiceUnavailable while stale."""
        try:
            self.verifier.still_valid(verified)
        except ServiceUnavailable:
            raise
        except TokenError:
            return False
        return True

    def check(self, request: aiocoap.Message, scopes: tuple[str, ...]) -> aiocoap.Message | None:
        """None if the request may go on: its OSCORE context's token is valid and covers
        `scopes` (or, allow_bearer only, its endpoint's bearer token does); otherwise the answer
        RFC 9200 §5.10.2 asks for: 4.01 (no valid token, with AS Request Creation Hints),
        4.03 (scope too narrow), 5.03 (the verifier is stale). Raises nothing: every
        refusal is that answer."""
        context = context_of(request)
        if context is None:
            return self._check_bearer(request, scopes)
        verified = context.access_token
        if context.withdrawn or not isinstance(verified, VerifiedToken):
            return self.unauthorized("no access token bound to this security context", scopes)
        try:
            self.verifier.still_valid(verified)
        except ServiceUnavailable as error:
            return error_message(error)
        except TokenError as error:
            # RFC 9203 §4.3, draft §4.10: the context dies with its token.
            self.bindings.drop(context)
            log.info("context of %s dropped: %s", context.peer.id, error.description)
            return self.unauthorized(error.description, scopes)
        if not verified.allows(*scopes):
            return problem(
                aiocoap.FORBIDDEN, InsufficientScope("token scope does not cover this request")
            )
        self.bindings.confirm(context)
        return None

    def _check_bearer(
        self, request: aiocoap.Message, scopes: tuple[str, ...]
    ) -> aiocoap.Message | None:
        if not self.allow_bearer:
            return self.unauthorized("this resource takes OSCORE-protected requests only", scopes)
        endpoint = endpoint_of(request)
        verified = self._tokens.get(endpoint)
        if verified is None:
            return self.unauthorized("no access token from this client", scopes)
        try:
            self.verifier.still_valid(verified)
        except ServiceUnavailable as error:
            # Stale keys or TRL: refuse for now, keep the token for when we are current.
            return error_message(error)
        except TokenError as error:
            del self._tokens[endpoint]
            return self.unauthorized(error.description, scopes)
        if not verified.allows(*scopes):
            return problem(
                aiocoap.FORBIDDEN, InsufficientScope("token scope does not cover this request")
            )
        return None

    def unauthorized(self, reason: str, scopes: tuple[str, ...] = ()) -> aiocoap.Message:
        """4.01: with AS Request Creation Hints (RFC 9200 §5.3) when `as_uri` is set, else a
        problem detail naming `reason` (to an unverified source address the hints may be cut
        down on the way out: rs_amplification.HintFitting). Raises nothing."""
        if self.as_uri is None:
            return problem(aiocoap.UNAUTHORIZED, TokenError(reason))
        hints: dict[int, Any] = {HINT_AS: self.as_uri, HINT_AUDIENCE: self.verifier.audience}
        if scopes:
            hints[HINT_SCOPE] = " ".join(scopes)
        return hints_message(hints)


def require_scope(*scopes: str) -> Callable[[Render], Render]:
    """Guard a `render_*` method: the request must arrive under an OSCORE context whose token
    is valid and covers `scopes` (or, with allow_bearer, from an endpoint holding such a bearer
    token). The resource must have a `resource_server` attribute.

        class Temperature(resource.Resource):
            def __init__(self, resource_server):
                super().__init__()
                self.resource_server = resource_server

            @require_scope("temp:read")
            async def render_get(self, request): ...

    Raises nothing itself; the guarded method answers a refusal (ResourceServer.check) instead
    of running, raises AttributeError when the resource has no `resource_server`, and
    otherwise raises what the method raises.
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
