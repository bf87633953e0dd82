"""The /token use case: a client_credentials grant or a refresh, each one store transaction.

Clients and audiences come from the registry cache; the grant names the rows it was decided
from, and a store that finds one changed writes nothing (stale): the cache reloads and the grant
is decided again, once.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from coap_auth.clock import Clock
from coap_auth.config import Settings
from coap_auth.errors import (
    CoapAuthError,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    StoreUnavailable,
    UnsupportedGrantType,
)
from coap_auth.metrics import GrantKind, KillCause, Metrics
from coap_auth.secure.credentials import PeerCredential
from coap_auth.service.minting import (
    IssuedToken,
    TokenMinter,
    TokenRequest,
    access_record,
    check_secret_travels_protected,
    confirmation_key,
    pop_key,
)
from coap_auth.service.registry_cache import RegistryCache, versions
from coap_auth.service.rollover import KeyRollover
from coap_auth.store import Audience, Client, MasterKey, RefreshFamily, Store
from coap_auth.store.records import Minted, RefreshStatus, RegistryVersions
from coap_auth.wire import GrantType

log = logging.getLogger("coap_auth.service")

REFRESH_TOKEN_BYTES = 32
FAMILY_ID_BYTES = 16
# A grant decided from a stale cache is decided again after a reload; stale twice in a row
# (the registry changing under a burst of edits) is answered 5.03, to be retried.
GRANT_ATTEMPTS = 2
_NO_REQ_CNF = "audience {} takes no req_cnf: the AS provides the OSCORE input material"

# authenticate(client_id, secret, assertion, peer, lookup): the client, or InvalidClient.
Authenticate = Callable[
    [str | None, str | None, bytes | None, PeerCredential | None], Awaitable[Client]
]


@dataclass(frozen=True, slots=True)
class RefreshTerms:
    """What a refresh may grant: the scope (narrowed or the family's), and whether it is
    narrower than the family's."""

    scope: str
    narrowed: bool


def refresh_terms(
    request: TokenRequest,
    family: RefreshFamily,
    client: Client,
    audience: Audience,
    cnf: Mapping[int, Any] | None,
) -> RefreshTerms:
    """RFC 9200 §5.8.1: a refresh may narrow the scope, never widen it or change the audience
    or the key; and the client's registration as it is now still allows it. Raises the
    CoapAuthError the request deserves."""
    if request.audience is not None and request.audience != family.audience:
        raise InvalidGrant("refresh may not change the audience")
    check_secret_travels_protected(audience, request)
    if audience.profile == "coap_oscore" and cnf is not None:
        raise InvalidRequest(_NO_REQ_CNF.format(audience.audience_id))
    if cnf is not None and dict(cnf) != family.cnf:
        raise InvalidGrant("refresh may not change the proof-of-possession key")
    family_scope = family.scope.split()
    wanted = request.scope.split() if request.scope else family_scope
    if not set(wanted) <= set(family_scope):
        raise InvalidGrant("refresh may not widen the scope")
    # The operator may have narrowed the client since the grant: follow that.
    if family.audience not in client.audiences or not set(wanted) <= set(client.scope):
        raise InvalidGrant("client no longer allowed this audience or scope")
    return RefreshTerms(" ".join(dict.fromkeys(wanted)), wanted != family_scope)


def grant_scope(client: Client, requested: str | None) -> tuple[str, bool]:
    """Granted scope and whether it is narrower than the request (RFC 6749 §3.3)."""
    allowed = client.scope
    if requested is None:
        return " ".join(allowed), False
    wanted = requested.split()
    granted = [s for s in wanted if s in allowed]
    if not granted:
        raise InvalidScope("requested scope not allowed for this client")
    return " ".join(granted), len(granted) < len(dict.fromkeys(wanted))


class Grants:
    def __init__(
        self,
        store: Store,
        registry: RegistryCache,
        minter: TokenMinter,
        keys: KeyRollover,
        authenticate: Authenticate,
        master_key: MasterKey,
        settings: Settings,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.registry = registry
        self.minter = minter
        self.keys = keys
        self._authenticate = authenticate
        self._master_key = master_key
        self.settings = settings
        self.clock = clock
        self.metrics = metrics

    async def issue(self, request: TokenRequest) -> IssuedToken:
        """A client_credentials grant or a refresh. The audience's profile decides the token:
        raises InvalidRequest for a JWT or a req_cnf with coap_oscore, a coap_oscore request
        not over OSCORE, or edhoc_oscore without a key to bind to; UnsupportedPopKey for a
        req_cnf that is not {1: COSE_Key} (P-256 for edhoc_oscore); InvalidClient,
        InvalidScope, InvalidGrant, UnsupportedGrantType as the request deserves."""
        if request.grant_type == GrantType.REFRESH_TOKEN:
            return await self.refresh(request)
        if request.grant_type != GrantType.CLIENT_CREDENTIALS:
            raise UnsupportedGrantType("grant type not supported")
        client = await self._authenticate(
            request.client_id, request.client_secret, request.client_assertion, request.peer
        )
        for _ in range(GRANT_ATTEMPTS):
            issued = await self._client_credentials(client, request)
            if issued is not None:
                return issued
            client = await self._still_authenticated(client)
        raise StoreUnavailable("the registry is changing; retry shortly")

    async def _client_credentials(
        self, client: Client, request: TokenRequest
    ) -> IssuedToken | None:
        """The grant, or None when the store found the rows it rests on changed."""
        audience = await self._audience_for(client, request.audience)
        await self.keys.ensure_families([audience])
        scope, narrowed = grant_scope(client, request.scope)
        check_secret_travels_protected(audience, request)
        cnf = confirmation_key(client, audience, pop_key(request.req_cnf))
        issued = self.minter.mint(client.client_id, audience, scope, cnf, request.token_format)
        # Every grant starts a refresh family (RFC 9700 §4.14).
        refresh_token = secrets.token_bytes(REFRESH_TOKEN_BYTES)
        now = self.clock.now()
        family = RefreshFamily(
            family_id=secrets.token_bytes(FAMILY_ID_BYTES),
            client_id=client.client_id,
            audience=audience.audience_id,
            scope=scope,
            created_at=now,
            last_used_at=now,
            expires_at=now + self.settings.refresh_max_lifetime,
            cnf=dict(cnf) if cnf is not None else None,
        )
        written = await self.store.start_family(
            family,
            self._master_key.digest(refresh_token),
            access_record(issued),
            versions(client, audience),
        )
        if not written:
            self.registry.stale()
            return None
        self.metrics.grant(GrantKind.CLIENT_CREDENTIALS, issued.token_format)
        return replace(
            issued,
            narrowed_scope=scope if narrowed else None,
            refresh_token=refresh_token,
            family_id=family.family_id,
        )

    async def refresh(self, request: TokenRequest) -> IssuedToken:
        """RFC 9200 §5.8.1 / RFC 9700 §4.14: rotate a refresh token, catching reuse."""
        if request.refresh_token is None:
            raise InvalidRequest("refresh_token required")
        client = await self._authenticate(
            request.client_id, request.client_secret, request.client_assertion, request.peer
        )
        cnf = pop_key(request.req_cnf)
        successor = secrets.token_bytes(REFRESH_TOKEN_BYTES)
        for _ in range(GRANT_ATTEMPTS):
            # The mint runs inside the store's transaction and cannot await: the audiences
            # and their key families are loaded first.
            await self.keys.ensure_families(await self.registry.audiences())
            outcome = await self.store.rotate_refresh(
                self._master_key.digest(request.refresh_token),
                self._master_key.digest(successor),
                client_id=client.client_id,
                now=self.clock.now(),
                grace=self.settings.refresh_grace,
                idle_timeout=self.settings.refresh_idle_timeout,
                mint=self._refresh_mint(request, client, cnf),
                registry=versions(client),
            )
            if outcome.status is not RefreshStatus.STALE:
                break
            self.registry.stale()
            client = await self._still_authenticated(client)
        else:
            raise StoreUnavailable("the registry is changing; retry shortly")
        self.metrics.refreshes.labels(outcome.status).inc()
        if outcome.status is RefreshStatus.REUSED:
            self.metrics.reuse_detections.inc()
            self.metrics.family_kills.labels(KillCause.REUSE).inc()
            log.warning("refresh token reuse by %s: family killed", client.client_id)
            raise InvalidGrant("refresh token reused: its family is revoked")
        minted = outcome.minted
        if isinstance(minted, CoapAuthError):
            raise minted
        if not isinstance(minted, IssuedToken):
            raise InvalidGrant("refresh token invalid or expired")
        self.metrics.grant(GrantKind.REFRESH_TOKEN, minted.token_format)
        family_id = outcome.family.family_id if outcome.family is not None else None
        return replace(minted, refresh_token=successor, family_id=family_id)

    def _refresh_mint(
        self, request: TokenRequest, client: Client, cnf: Mapping[int, Any] | None
    ) -> Callable[[RefreshFamily], Minted[IssuedToken | CoapAuthError]]:
        def mint(family: RefreshFamily) -> Minted[IssuedToken | CoapAuthError]:
            audience = self.registry.loaded_audience(family.audience)
            # The store checks the audience is still as loaded, or still absent (b"").
            rests_on = RegistryVersions(
                audiences=((family.audience, audience.version if audience else b""),)
            )
            if audience is None:
                return Minted(InvalidGrant("audience no longer registered"), None, rests_on)
            try:
                terms = refresh_terms(request, family, client, audience, cnf)
                # The family's key stays the token's (an edhoc_oscore family has one from its
                # grant); coap_oscore gets fresh material in the minter.
                family_cnf = confirmation_key(client, audience, family.cnf)
                token = self.minter.mint(
                    family.client_id, audience, terms.scope, family_cnf, request.token_format
                )
            except CoapAuthError as refusal:
                return Minted(refusal, None, rests_on)
            narrowed = terms.scope if terms.narrowed else None
            return Minted(replace(token, narrowed_scope=narrowed), access_record(token), rests_on)

        return mint

    async def _still_authenticated(self, client: Client) -> Client:
        """After a stale grant: the client as stored now, if what authenticated it (its
        secrets, its key, enabled) is unchanged; else authentication is asked for again."""
        fresh = await self.registry.client(client.client_id)
        same = fresh is not None and (
            fresh.secret_digest,
            fresh.previous_secret_digest,
            fresh.previous_secret_until,
            fresh.public_key,
            fresh.disabled,
            fresh.created_at,
        ) == (
            client.secret_digest,
            client.previous_secret_digest,
            client.previous_secret_until,
            client.public_key,
            client.disabled,
            client.created_at,
        )
        if fresh is None or not same:
            raise InvalidClient("client authentication failed")
        return fresh

    async def _audience_for(self, client: Client, requested: str | None) -> Audience:
        if requested is None:
            if len(client.audiences) != 1:
                raise InvalidRequest("audience required")
            requested = client.audiences[0]
        # RFC 8693 §2.2.2 would say invalid_target; ACE has no code for it, and the nearest
        # ACE code for "access this client may not have" is invalid_scope.
        audience = (
            await self.registry.audience(requested) if requested in client.audiences else None
        )
        if audience is None:
            raise InvalidScope("audience not allowed for this client")
        return audience
