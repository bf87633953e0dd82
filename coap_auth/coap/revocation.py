"""The revocation half of the CoAP interface: /revoke, /revoke/trl (RFC 9770), /introspect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable
from dataclasses import replace

import aiocoap
import cbor2
from aiocoap import resource

from coap_auth.coap.endpoint import AceEndpoint, Endpoint, caller
from coap_auth.coap.messages import (
    encode_introspection,
    parse_token_submission,
)
from coap_auth.coap.observable import ObservableEndpoint
from coap_auth.coap.observers import Observation, Representation
from coap_auth.coap.protection import peer, peer_id
from coap_auth.errors import NotAcceptable, Unauthorized
from coap_auth.service import AuthService, TrlQuery, parse_trl_query
from coap_auth.wire import ContentFormat

# Distinct (requester, query) answers cached at once (diff and cursor values vary).
MAX_CACHED_ANSWERS = 256
# Store reads at once when a change's answers are computed ahead of the notifications.
PREPARE_CONCURRENCY = 16

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


class TrlResource(Endpoint, ObservableEndpoint, resource.Resource):
    """RFC 9770 token revocation list: full and diff queries, observable.

    Each requester (the authenticated peer) sees only the hashes pertaining to it (§5) and its
    own update collection (§6.2). An observer is notified only when its pertaining part of the
    list changed (§11): a change of the list reads whose collections gained an update (one
    store read for all of them) and queues their observers; an unprotected observer (lab
    mode) reads the whole list and hears of every change. The answer for a (requester,
    normalized query) is computed once per change, whatever the number of GETs and observers
    asking for it at once (one computation shared while it runs, then cached).
    """

    path = "/revoke/trl"
    protected = True

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service
        self._cache: dict[TrlShape, Representation] = {}
        self._computing: dict[TrlShape, asyncio.Task[Representation]] = {}
        self._version = 0
        self._revocations_seen: int | None = None
        # Whether each requester was still registered when last asked, this version.
        self._registered: dict[str, bool] = {}
        # The list's newest update whose observers were notified (None: not known yet).
        self._notified_seq: int | None = None
        self._pending = False
        self._notify_lock = asyncio.Lock()
        self._notifying: asyncio.Task[None] | None = None
        # How many answers were computed (store reads), for tests and metrics.
        self.computations = 0

    def get_link_description(self) -> dict[str, str]:
        return {**super().get_link_description(), "ct": str(int(ContentFormat.ACE_TRL_CBOR))}

    def updated_state(self) -> None:
        """Notify every observer of its current answer, changed or not."""
        if self.observers is not None:
            self.observers.notify(self.observers.of(self), force=True)

    def trl_changed(self) -> None:
        """The list changed (here, on another instance, or by the CLI): drop cached answers and
        notify the observers it concerns, in a task (the caller is not async)."""
        self._changed()
        self._pending = True
        if self._notifying is None or self._notifying.done():
            self._notifying = asyncio.get_running_loop().create_task(
                self.notify_changed(), name="coap-auth-trl-notify"
            )

    def _changed(self) -> None:
        self._version += 1
        self._cache.clear()
        self._computing.clear()  # what runs now reads the old list: not shared any more
        self._registered.clear()

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
        if self.observers is None:
            return
        previous = self._notified_seq
        try:
            affected, newest = await self.service.trl_changes_since(previous)
        except Exception:  # nobody awaits this task: log here, and fail open
            log.warning("could not tell whom a TRL change concerns; notifying every observer")
            self.observers.notify(self._in_shape_order(self.observers.of(self)))
            return
        if previous is not None and newest < previous:
            affected = None  # the list's history went back (a restored backup): whom is unknown
        self._notified_seq = newest
        # affected None: everyone; a None requester: an unprotected observer of the whole
        # list, notified of every change.
        concerned = []
        for observation in self.observers.of(self):
            requester = _requester(observation.shape)
            if affected is None or (
                newest != previous if requester is None else requester in affected
            ):
                concerned.append(observation)
        ordered = self._in_shape_order(concerned)
        await self._prepare(ordered)
        self.observers.notify(ordered)

    async def _prepare(self, observations: list[Observation]) -> None:
        """Resolve what the notifications of `observations` (in the order they will be sent)
        need (each requester's registration, each distinct answer) a few at a time, before
        they are queued: the one
        sender then reads caches only, and /keys notifications queued behind TRL ones are
        not held up by store reads one after another."""
        semaphore = asyncio.Semaphore(PREPARE_CONCURRENCY)

        async def prepare(observation: Observation) -> None:
            async with semaphore:
                # A failure here is met again by the sender, which ends that observation.
                with contextlib.suppress(Exception):
                    await self.notification(observation)

        distinct = {observation.shape: observation for observation in observations}
        # No more than the cache keeps: the sender would compute the rest once more.
        first = list(distinct.values())[:MAX_CACHED_ANSWERS]
        await asyncio.gather(*(prepare(o) for o in first))

    @staticmethod
    def _in_shape_order(observations: list[Observation]) -> list[Observation]:
        """Observers of one answer next to each other: its computation serves them all while
        it is the newest one cached, however many distinct queries come between."""
        return sorted(observations, key=lambda o: repr(o.shape))

    def observation_shape(self, request: aiocoap.Message) -> TrlShape:
        query = parse_trl_query(request.opt.uri_query)
        return (peer_id(request), self._normalized(query))

    def _normalized(self, query: TrlQuery) -> TrlQuery:
        """One key per answer: diff 0 and any diff above MAX_N both mean MAX_N (RFC 9770 §6.2),
        a cursor is its number (an invalid one stays as given: its answer is an error)."""
        if query.diff is None:
            return query
        max_n = self.service.trl_max_n
        diff = max_n if query.diff == 0 or query.diff > max_n else query.diff
        cursor = query.cursor
        if cursor is not None and cursor.isascii() and cursor.isdigit() and len(cursor) < 20:
            cursor = str(int(cursor))
        return TrlQuery(diff, cursor)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        shape = self.observation_shape(request)
        accept = request.opt.accept
        if accept is not None and accept != ContentFormat.ACE_TRL_CBOR:
            # RFC 7252 §5.10.4; RFC 9770 §6: the list is application/ace-trl+cbor (262).
            raise NotAcceptable("/revoke/trl offers application/ace-trl+cbor (262) only")
        # None only for an unprotected request (require_oscore = false): the whole list.
        channel_peer = peer(request)
        caller.set(shape[0] or "-")
        if channel_peer is not None and not await self.service.peer_registered(channel_peer):
            # Disabled, removed or re-keyed since its handshake: refused at once, like /token.
            raise Unauthorized("the peer of this security context is no longer registered")
        block2 = request.opt.block2
        if block2 is None or block2.block_number == 0:
            # A revocation this instance just made is answered at once, not after the next
            # tick. A later block (RFC 7959 §2.4) is cut from the answer its first block
            # came from, as long as it is cached: no store read for each of them (a notified
            # crowd fetching its second blocks at once would pay one each).
            revocations = (await self.service.change_counters()).revocations
            if revocations != self._revocations_seen:
                self._revocations_seen = revocations
                self._changed()
        return (await self._representation(shape)).message()

    async def notification(self, observation: Observation) -> aiocoap.Message:
        """The observer's current answer (the peer still registered: checked once per
        requester and change, not per observer)."""
        shape: TrlShape = observation.shape  # type: ignore[assignment]
        requester = shape[0]
        if requester is not None:
            registered = self._registered.get(requester)
            if registered is None:
                channel_peer = peer(observation.request)
                registered = channel_peer is not None and await self.service.peer_registered(
                    channel_peer
                )
                self._registered[requester] = registered
            if not registered:
                raise Unauthorized("the peer of this security context is no longer registered")
        return (await self._representation(shape)).message()

    async def _representation(self, shape: TrlShape) -> Representation:
        """The cached answer for `shape`, or the one computation of it (shared with whoever
        asks meanwhile; a caller that goes away does not cancel it for the others).
        Raises what the service raises (TrlQueryError for a bad cursor)."""
        cached = self._cache.get(shape)
        if cached is not None:
            return cached
        computing = self._computing.get(shape)
        if computing is None:
            computing = asyncio.get_running_loop().create_task(self._compute(shape))
            computing.add_done_callback(_retrieve)
            self._computing[shape] = computing
        return await asyncio.shield(computing)

    async def _compute(self, shape: TrlShape) -> Representation:
        requester, query = shape
        version = self._version
        self.computations += 1
        try:
            body = await self.service.trl(query, requester)
        finally:
            if self._computing.get(shape) is asyncio.current_task():
                del self._computing[shape]
        representation = Representation.of(cbor2.dumps(body), ContentFormat.ACE_TRL_CBOR)
        # Cache only what was read before no change happened meanwhile.
        if version == self._version:
            if len(self._cache) >= MAX_CACHED_ANSWERS:
                del self._cache[next(iter(self._cache))]  # the oldest answer
            self._cache[shape] = representation
        return representation


# A requester (None: unprotected, the whole list) and its normalized query.
TrlShape = tuple[str | None, TrlQuery]


def _requester(shape: Hashable) -> str | None:
    return shape[0]  # type: ignore[index,no-any-return]


def _retrieve(task: asyncio.Task[Representation]) -> None:
    """Mark a shared computation's error as seen: it was raised to whoever awaited it, and
    nobody may have (every asker gone), which asyncio would log as a traceback."""
    if not task.cancelled():
        task.exception()
