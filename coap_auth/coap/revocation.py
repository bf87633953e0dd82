"""The revocation half of the CoAP interface: /revoke, /revoke/trl (RFC 9770), /introspect."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import aiocoap
import cbor2
from aiocoap import resource
from aiocoap.protocol import ServerObservation

from coap_auth.coap.endpoint import AceEndpoint, Endpoint, caller
from coap_auth.coap.messages import (
    encode_introspection,
    parse_token_submission,
)
from coap_auth.coap.protection import peer, peer_id
from coap_auth.errors import Unauthorized
from coap_auth.service import AuthService, TrlQuery, parse_trl_query
from coap_auth.wire import ContentFormat

# Observations one peer may hold at once (RFC 7641 leaves the bound to the server).
MAX_OBSERVATIONS_PER_PEER = 4
# Distinct (requester, query) answers cached at once (diff and cursor values vary).
MAX_CACHED_ANSWERS = 256

log = logging.getLogger("coap_auth.server")


class RevokeResource(AceEndpoint, resource.Resource):
    """RFC 7009 semantics over CoAP: 2.04 whether or not the token was known."""

    path = "/revoke"

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        body = self.ace_body(request)
        submission = replace(parse_token_submission(body), peer=peer(request))
        caller.set(peer_id(request) or submission.client_id or "assertion")
        await self.service.revoke(submission)
        return aiocoap.Message(code=aiocoap.Code.CHANGED)


class IntrospectResource(AceEndpoint, resource.Resource):
    """RFC 9200 §5.9: 2.01 with the claims of an active token, or {10: false}."""

    path = "/introspect"

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        body = self.ace_body(request)
        submission = replace(parse_token_submission(body), peer=peer(request))
        caller.set(peer_id(request) or submission.client_id or "assertion")
        claims = await self.service.introspect(submission)
        return aiocoap.Message(
            code=aiocoap.Code.CREATED,
            payload=encode_introspection(claims),
            content_format=ContentFormat.ACE_CBOR,
        )


class TrlResource(Endpoint, resource.ObservableResource):
    """RFC 9770 token revocation list: full and diff queries, observable.

    Each requester (the authenticated peer) sees only the hashes pertaining to it (§5) and its
    own update collection (§6.2). An observer is notified only when its pertaining part of the
    list changed (§11): each observation remembers its requester, and a change of the list
    triggers those whose collections gained an update (one store read for all of them); an
    unprotected observer (lab mode) reads the whole list and hears of every change. Answers
    are cached per requester and query until the list changes, so a notification costs one
    store read per distinct (requester, query).
    """

    path = "/revoke/trl"
    protected = True

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service
        self._cache: dict[tuple[str | None, TrlQuery], bytes] = {}
        self._version = 0
        self._revocations_seen: int | None = None
        # Each observation and its requester (None: unprotected, the whole list).
        self._observers: dict[ServerObservation, str | None] = {}
        # The list's newest update whose observers were notified (None: not known yet).
        self._notified_seq: int | None = None
        self._pending = False
        self._notify_lock = asyncio.Lock()
        self._notifying: asyncio.Task[None] | None = None

    def get_link_description(self) -> dict[str, str]:
        return {**super().get_link_description(), "ct": str(int(ContentFormat.ACE_TRL_CBOR))}

    async def add_observation(
        self, request: aiocoap.Message, observation: ServerObservation
    ) -> None:
        requester = peer_id(request)
        if requester is not None:
            # At most MAX_OBSERVATIONS_PER_PEER per peer: its oldest ends (one last
            # notification without Observe). aiocoap's OSCORE client never cancels an
            # observation it gave up, and a device must not pile up work for every change.
            mine = [o for o, r in self._observers.items() if r == requester]
            for old in mine[: max(0, len(mine) - MAX_OBSERVATIONS_PER_PEER + 1)]:
                self._observers.pop(old, None)
                old.trigger(is_last=True)
        self._observers[observation] = requester

        def cancelled() -> None:
            self._observers.pop(observation, None)
            self.update_observation_count(len(self._observers))

        observation.accept(cancelled)
        self.update_observation_count(len(self._observers))

    def updated_state(self, response: aiocoap.Message | None = None) -> None:
        """aiocoap's "notify every observer"."""
        for observation in list(self._observers):
            observation.trigger(response)

    def trl_changed(self) -> None:
        """The list changed (here, on another instance, or by the CLI): drop cached answers and
        notify the observers it concerns, in a task (the caller is not async)."""
        self._version += 1
        self._cache.clear()
        self._pending = True
        if self._notifying is None or self._notifying.done():
            self._notifying = asyncio.get_running_loop().create_task(
                self.notify_changed(), name="coap-auth-trl-notify"
            )

    async def notify_changed(self) -> None:
        """Notify the observers whose pertaining part of the list changed since the last
        notification (RFC 9770 §11); changes that come meanwhile are read in the next round.
        If the store cannot tell whom, everyone is notified (a needless notification is
        harmless; a missing one is not)."""
        self._pending = True
        async with self._notify_lock:  # one round at a time: rounds read after each other
            while self._pending:
                self._pending = False
                await self._notify_round()

    async def _notify_round(self) -> None:
        previous = self._notified_seq
        try:
            affected, newest = await self.service.revocations.changes_since(previous)
        except Exception:  # nobody awaits this task: log here, and fail open
            log.warning("could not tell whom a TRL change concerns; notifying every observer")
            self.updated_state()
            return
        if previous is not None and newest < previous:
            affected = None  # the list's history went back (a restored backup): whom is unknown
        self._notified_seq = newest
        for observation, requester in list(self._observers.items()):
            # affected None: everyone; a None requester: an unprotected observer of the whole
            # list, notified of every change.
            if affected is None or (
                newest != previous if requester is None else requester in affected
            ):
                observation.trigger()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        query = parse_trl_query(request.opt.uri_query)
        # None only for an unprotected request (require_oscore = false): the whole list.
        channel_peer = peer(request)
        requester = None if channel_peer is None else channel_peer.id
        if channel_peer is not None and not await self.service.peer_registered(channel_peer):
            # Disabled, removed or re-keyed since its handshake: refused at once, like /token.
            raise Unauthorized("the peer of this security context is no longer registered")
        key = (requester, query)
        # A revocation this instance just made is answered at once, not after the next tick.
        revocations = (await self.service.store.change_counters()).revocations
        if revocations != self._revocations_seen:
            self._revocations_seen = revocations
            self._version += 1
            self._cache.clear()
        payload = self._cache.get(key)
        if payload is None:
            version = self._version
            payload = cbor2.dumps(await self.service.trl(query, requester))
            # Cache only what was read before no change happened meanwhile.
            if version == self._version:
                if len(self._cache) >= MAX_CACHED_ANSWERS:
                    del self._cache[next(iter(self._cache))]  # the oldest answer
                self._cache[key] = payload
        return aiocoap.Message(
            code=aiocoap.Code.CONTENT, payload=payload, content_format=ContentFormat.ACE_TRL_CBOR
        )
