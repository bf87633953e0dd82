"""Unit tests of TrlResource per requester (RFC 9770 §5, §6.2, §9, §11): render_get and the
registration with the site's Observers called directly, with requests that carry a stand-in
authenticated peer, as the OSCORE layer sets it. Each peer reads its own hashes and its own
update collection (indexes, cursors, MAX_N reach), and is notified only of changes pertaining
to it. (The over-UDP test, two devices each seeing only their own entries, needs EDHOC +
OSCORE.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.coap.observers import Observation, Observers
from coap_auth.coap.revocation import MAX_CACHED_ANSWERS, TrlResource
from coap_auth.errors import StoreUnavailable, TrlQueryError, Unauthorized
from coap_auth.secure.credentials import PeerCredential, make_credential
from coap_auth.service import AuthService, TokenRequest
from coap_auth.store import Audience, Client
from coap_auth.tokens import cose_key_from_public, token_hash
from coap_auth.wire import TrlErrorId, TrlParam
from tests.conftest import SEEN_SECRETS

FULL, DIFF, CURSOR, MORE = TrlParam.FULL_SET, TrlParam.DIFF_SET, TrlParam.CURSOR, TrlParam.MORE


@dataclass
class _Remote:
    """What the OSCORE layer attaches to a request's remote: the authenticated peer."""

    peer: PeerCredential


# The audiences' registered keys; the clients stand for provisioned contexts (no credential).
AUDIENCE_KEYS = {a: ec.generate_private_key(ec.SECP256R1()) for a in ("thermostat", "lock")}


def _get(query: str = "", requester: str | None = None) -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.GET, uri_query=[q for q in query.split("&") if q])
    if requester is not None:
        key = AUDIENCE_KEYS.get(requester)
        credential = None if key is None else make_credential(requester, key.public_key())
        request.remote = _Remote(PeerCredential(requester, credential))
    return request


async def test_an_unregistered_peer_reads_nothing(service: AuthService) -> None:
    await _register(service)
    with pytest.raises(Unauthorized):
        await TrlResource(service).render_get(_get("", "nobody"))


async def _render(trl: TrlResource, query: str = "", requester: str | None = None) -> Any:
    response = await trl.render_get(_get(query, requester))
    assert response.code == aiocoap.CONTENT
    return cbor2.loads(response.payload)


async def _issue(service: AuthService, client_id: str, audience: str) -> bytes:
    issued = await service.issue_token(
        TokenRequest(client_id=client_id, client_secret=_secret(client_id), audience=audience)
    )
    return token_hash(issued.access_token)


def _secret(client_id: str) -> str:
    return f"secret-of-{client_id}-0123456789abcdef"


async def _register(service: AuthService) -> None:
    now = service.clock.now()
    for audience_id, key in AUDIENCE_KEYS.items():
        public = cose_key_from_public(key.public_key())
        await service.store.add_audience(
            Audience(audience_id, "cwt", 600, now, introspect_public_key=public), "operator"
        )
    clients = (("sensor-1", ("thermostat",)), ("sensor-2", ("lock",)), ("sensor-3", ("lock",)))
    for client_id, audiences in clients:
        SEEN_SECRETS.add(_secret(client_id).encode())
        await service.store.add_client(
            Client(
                client_id,
                audiences,
                ("temp:read",),
                now,
                secret_digest=service.secret_digest(_secret(client_id)),
            ),
            "operator",
        )


async def test_trl_resource_answers_each_peer_from_its_own_collection(
    service: AuthService,
) -> None:
    await _register(service)
    mine = await _issue(service, "sensor-1", "thermostat")
    theirs = await _issue(service, "sensor-2", "lock")
    for h in (mine, theirs):
        assert await service.revoke_token_hash(h, actor="operator")
    trl = TrlResource(service)

    # Full queries: each peer its own hashes, as client or as audience, and its own cursor
    # (RFC 9770 §9.1: the index of its last update; null while none pertained to it).
    assert await _render(trl, "", "sensor-1") == {FULL: [mine], CURSOR: 0}
    assert await _render(trl, "", "thermostat") == {FULL: [mine], CURSOR: 0}
    assert await _render(trl, "", "sensor-2") == {FULL: [theirs], CURSOR: 0}
    assert await _render(trl, "", "lock") == {FULL: [theirs], CURSOR: 0}
    assert await _render(trl, "", "sensor-3") == {FULL: [], CURSOR: None}
    # Unprotected (lab mode only): the whole list and the whole history, as before.
    whole = await _render(trl)
    assert sorted(whole[FULL]) == sorted([mine, theirs]) and whole[CURSOR] == 1

    # Diff queries: only the updates that changed the peer's hashes; none left empty.
    assert await _render(trl, "diff=0", "lock") == {DIFF: [[[], [theirs]]], CURSOR: 0, MORE: False}
    assert (await _render(trl, "diff=0", "sensor-1"))[DIFF] == [[[], [mine]]]
    assert await _render(trl, "diff=0", "sensor-3") == {DIFF: [], CURSOR: None, MORE: False}
    assert (await _render(trl, "diff=0"))[DIFF] == [[[], [theirs]], [[], [mine]]]

    # Cursors are the peer's own indexes: sensor-1 pages through its four updates.
    more = [await _issue(service, "sensor-1", "thermostat") for _ in range(3)]
    for h in more:
        assert await service.revoke_token_hash(h, actor="operator")
    paged = await _render(trl, "diff=2&cursor=0", "sensor-1")
    assert paged == {DIFF: [[[], [more[1]]], [[], [more[0]]]], CURSOR: 2, MORE: True}
    paged = await _render(trl, "diff=2&cursor=2", "sensor-1")
    assert paged == {DIFF: [[[], [more[2]]]], CURSOR: 3, MORE: False}
    # The lock's last index is still 0, whatever happened to others' tokens since.
    assert await _render(trl, "diff=1&cursor=0", "lock") == {DIFF: [], CURSOR: 0, MORE: False}
    with pytest.raises(TrlQueryError) as raised:
        await _render(trl, "diff=1&cursor=1", "lock")
    assert raised.value.error_id == TrlErrorId.OUT_OF_BOUND_CURSOR_VALUE
    with pytest.raises(TrlQueryError) as raised:
        await _render(trl, "diff=1&cursor=x", "sensor-3")
    assert raised.value.cursor is None  # §6.3: its own last_index, null for an empty one


async def test_diff_reach_is_max_n_of_the_peer_own_updates(service: AuthService) -> None:
    """RFC 9770 §6.2: MAX_N counts each requester's updates. Many revocations of others'
    tokens push nothing of the lock's out of its reach."""
    service.revocations.max_n = 3
    service.revocations.max_diff_batch = 2
    await _register(service)
    theirs = await _issue(service, "sensor-2", "lock")
    assert await service.revoke_token_hash(theirs, actor="operator")
    mine = [await _issue(service, "sensor-1", "thermostat") for _ in range(5)]
    for h in mine:
        assert await service.revoke_token_hash(h, actor="operator")
    # What the server's sweep keeps: each history's last 2 x MAX_N.
    await service.store.sweep_expired(service.clock.now(), keep_updates=2 * 3)
    trl = TrlResource(service)

    assert await _render(trl, "diff=0", "lock") == {DIFF: [[[], [theirs]]], CURSOR: 0, MORE: False}
    # Sensor-1 reaches its last three, the eldest batch (of two) first.
    assert await _render(trl, "diff=0", "sensor-1") == {
        DIFF: [[[], [mine[3]]], [[], [mine[2]]]],
        CURSOR: 3,
        MORE: True,
    }
    # A cursor older than its reach: its updates after it are gone, ask for a full query.
    assert await _render(trl, "diff=0&cursor=0", "sensor-1") == {
        DIFF: [],
        CURSOR: None,
        MORE: True,
    }


class _Pipe:
    """What aiocoap hands a resource for a registration: the request, its responses, and
    the end of its interest."""

    def __init__(self, request: aiocoap.Message) -> None:
        self.request = request
        self.responses: list[aiocoap.Message] = []
        self._ends: list[Any] = []

    def on_interest_end(self, callback: Any) -> None:
        self._ends.append(callback)

    def add_response(self, response: aiocoap.Message, is_last: bool = False) -> None:
        self.responses.append(response)

    def end(self) -> None:
        for callback in self._ends:
            callback()


def _with_observers(trl: TrlResource) -> TrlResource:
    """The site's registry of observations, its sender not started: notifications stay
    queued, for the test to see whom they are for."""
    trl.observers = Observers(
        trl.service.clock,
        per_source=8,
        maximum=100,
        rate=10_000,
        con_interval=86_400,
        max_block_size=1024,
    )
    return trl


async def _observe(trl: TrlResource, requester: str | None) -> Observation:
    pipe = _Pipe(_get("", requester))
    assert trl.observers is not None
    observation = trl.observers.register(trl, pipe, trl.observation_shape(pipe.request))
    assert observation is not None
    return observation


async def _changed(trl: TrlResource, observers: dict[str | None, Observation]) -> set[str | None]:
    """Tell the resource the list changed, as the server does; whom it queued a
    notification for (each at most once)."""
    assert trl.observers is not None
    queue = trl.observers._queue
    for observation in queue:
        observation.queued = False
    queue.clear()
    trl.trl_changed()
    assert trl._notifying is not None
    await trl._notifying
    assert len(set(queue)) == len(queue)
    return {requester for requester, o in observers.items() if o in queue}


async def test_an_observer_is_notified_only_of_changes_pertaining_to_it(
    service: AuthService,
) -> None:
    """RFC 9770 §11: notifications go to the observers whose pertaining part of the list
    changed; an unprotected observer (lab mode) hears of every change."""
    await _register(service)
    trl = _with_observers(TrlResource(service))
    peers = ("sensor-1", "thermostat", "sensor-2", "lock", "sensor-3", None)
    observers = {requester: await _observe(trl, requester) for requester in peers}
    mine = await _issue(service, "sensor-1", "thermostat")
    theirs = await _issue(service, "sensor-2", "lock")

    # Nothing known yet of what observers were told: the first change notifies everyone.
    assert await service.revoke_token_hash(mine, actor="operator")
    assert await _changed(trl, observers) == set(peers)

    assert await service.revoke_token_hash(theirs, actor="operator")
    assert await _changed(trl, observers) == {"sensor-2", "lock", None}
    # A change notification with nothing new (another instance's tick) notifies nobody.
    assert await _changed(trl, observers) == set()

    # Expiry: the sweep's one update concerns both pairs.
    await service.revocations.plan_sweep()
    service.clock.advance(3600)
    assert await service.revocations.sweep_due(service.clock.now()) == 2
    assert await _changed(trl, observers) == {"sensor-1", "thermostat", "sensor-2", "lock", None}

    # A cancelled observation is forgotten.
    observers["lock"].pipe.end()
    assert trl.observers is not None and observers["lock"] not in trl.observers.of(trl)
    del observers["lock"]

    # Several changes before the task runs are one round: each observer is notified once.
    other = await _issue(service, "sensor-1", "thermostat")
    assert await service.revoke_token_hash(other, actor="operator")
    trl.trl_changed()
    assert await _changed(trl, observers) == {"sensor-1", "thermostat", None}


async def test_trl_resource_caches_per_peer_and_forgets_on_change(service: AuthService) -> None:
    await _register(service)
    mine = await _issue(service, "sensor-1", "thermostat")
    assert await service.revoke_token_hash(mine, actor="operator")
    trl = TrlResource(service)

    # The first peer's cached answer is never served to the second.
    assert (await _render(trl, "", "sensor-1"))[FULL] == [mine]
    assert (await _render(trl, "", "sensor-2"))[FULL] == []
    assert (await _render(trl, "", "sensor-1"))[FULL] == [mine]

    # A revocation reaches the peer it pertains to at once (the cached answer is dropped).
    theirs = await _issue(service, "sensor-2", "lock")
    assert await service.revoke_token_hash(theirs, actor="operator")
    assert (await _render(trl, "", "sensor-2"))[FULL] == [theirs]
    assert (await _render(trl, "", "sensor-1"))[FULL] == [mine]

    # Bounded: many (peer, query) answers evict the oldest, never grow past the cap.
    # (Distinct cursors: every diff above MAX_N is one answer, MAX_N's.)
    for n in range(MAX_CACHED_ANSWERS + 10):
        assert (await _render(trl, f"diff=1&cursor={n}", "sensor-3"))[DIFF] == []
    assert len(trl._cache) == MAX_CACHED_ANSWERS
    assert (await _render(trl, "", "sensor-2"))[FULL] == [theirs]


async def test_when_the_store_cannot_tell_whom_everyone_is_notified(
    service: AuthService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missed notification is worse than a needless one: a failed read notifies every
    observer, and the next round still reads from the last change it knew of."""
    await _register(service)
    trl = _with_observers(TrlResource(service))
    observers = {r: await _observe(trl, r) for r in ("sensor-1", "lock", "sensor-3")}
    await _changed(trl, observers)  # the first round learns where the list is
    mine = await _issue(service, "sensor-1", "thermostat")
    assert await service.revoke_token_hash(mine, actor="operator")

    async def unavailable(trl_seq: int | None) -> Any:
        raise StoreUnavailable("the database is unreachable; retry shortly")

    with monkeypatch.context() as patched:
        patched.setattr(service.revocations, "changes_since", unavailable)
        assert await _changed(trl, observers) == {"sensor-1", "lock", "sensor-3"}
    assert await _changed(trl, observers) == {"sensor-1"}
