"""Revocation over real UDP (issue 5): /revoke, the RFC 9770 TRL with Observe, /introspect.

Numbers are docs/protocol.md's and RFC 9770's, written out: full_set 0, diff_set 1, cursor 2,
more 3; content format 262; problem details 257 with ace-trl-error under key 1.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.store import Audience
from coap_auth.tokens import Claims, encode_cwt
from coap_auth.wire import AceParam, CoapCode, CoseAlg, GrantType
from tests.conftest import Coap

NOTIFY_TIMEOUT = 5
CF_TRL, CF_PROBLEM = 262, 257
FULL_SET, DIFF_SET, CURSOR, MORE = 0, 1, 2, 3
RS_SECRET = "introspection-secret-of-thermostat-0123"


def device_token_hash(access_token: bytes) -> bytes:
    """RFC 9770 §4, computed the way a device would, independently of coap_auth.tokens."""
    text = base64.urlsafe_b64encode(access_token).rstrip(b"=")
    return b"\x01" + hashlib.sha256(text).digest()


def _cred(coap: Coap, client_id: str = "sensor-1") -> dict[int, Any]:
    return {AceParam.CLIENT_ID: client_id, AceParam.CLIENT_SECRET: coap.secrets[client_id]}


async def grant(coap: Coap, client_id: str = "sensor-1", audience: str = "thermostat") -> dict:
    response, body = await coap.post_ace(
        "/token", {**_cred(coap, client_id), AceParam.AUDIENCE: audience}
    )
    assert response.code == aiocoap.CREATED, body
    return body


async def revoke(coap: Coap, token: bytes, client_id: str = "sensor-1") -> aiocoap.Message:
    response, _ = await coap.post_ace("/revoke", {**_cred(coap, client_id), AceParam.TOKEN: token})
    return response


async def trl(coap: Coap, query: str = "") -> tuple[aiocoap.Message, Any]:
    response = await coap.request(aiocoap.GET, "/revoke/trl" + query)
    return response, cbor2.loads(response.payload) if response.payload else None


class TrlObserver:
    def __init__(self, coap: Coap, query: str) -> None:
        self.request = coap.context.request(
            aiocoap.Message(code=aiocoap.GET, uri=f"{coap.base}/revoke/trl{query}", observe=0)
        )

    async def start(self) -> Any:
        first = await self.request.response
        assert first.code == aiocoap.CONTENT and first.opt.content_format == CF_TRL
        assert first.opt.observe is not None
        self._updates = aiter(self.request.observation)
        return cbor2.loads(first.payload)

    async def next(self) -> Any:
        update = await asyncio.wait_for(anext(self._updates), NOTIFY_TIMEOUT)
        assert update.opt.content_format == CF_TRL
        return cbor2.loads(update.payload)


@pytest.fixture
async def rs(sensor: Coap) -> Coap:
    """`thermostat` may introspect with a secret; a second client `sensor-2`."""
    store = sensor.service.store
    await store.add_audience(
        Audience(
            "rs-door",
            "cwt",
            600,
            sensor.service.clock.now(),
            introspect_secret_digest=sensor.service.secret_digest(RS_SECRET),
        ),
        "operator",
    )
    await sensor.add_secret_client("sensor-2", ("thermostat", "rs-door"), "temp:read")
    return sensor


async def test_observer_of_a_diff_query_sees_revocations_and_expiry_in_order(rs: Coap) -> None:
    clock = rs.service.clock
    observer = TrlObserver(rs, "?diff=3")
    assert await observer.start() == {DIFF_SET: [], CURSOR: None, MORE: False}
    full_observer = TrlObserver(rs, "")
    assert (await full_observer.start())[FULL_SET] == []

    first = await grant(rs)
    h1 = device_token_hash(first[AceParam.ACCESS_TOKEN])
    assert (await revoke(rs, first[AceParam.ACCESS_TOKEN])).code == aiocoap.CHANGED
    await rs.server.tick()
    assert (await observer.next())[DIFF_SET] == [[[], [h1]]]
    assert (await full_observer.next())[FULL_SET] == [h1]

    clock.advance(10)
    second = await grant(rs)
    h2 = device_token_hash(second[AceParam.ACCESS_TOKEN])
    assert (await revoke(rs, second[AceParam.ACCESS_TOKEN])).code == aiocoap.CHANGED
    await rs.server.tick()
    # Newest first, each entry [removed, added].
    assert (await observer.next())[DIFF_SET] == [[[], [h2]], [[], [h1]]]
    assert set((await full_observer.next())[FULL_SET]) == {h1, h2}

    # The first token expires (600 s lifetime); the sweep delists it and tells everyone.
    clock.advance(600 - 10)
    await rs.server.tick()
    update = await observer.next()
    assert update[DIFF_SET] == [[[h1], []], [[], [h2]], [[], [h1]]]
    assert update[CURSOR] == 2 and update[MORE] is False
    assert (await full_observer.next())[FULL_SET] == [h2]
    clock.advance(10)
    await rs.server.tick()
    assert (await observer.next())[DIFF_SET] == [[[h2], []], [[h1], []], [[], [h2]]]  # at most 3
    assert (await full_observer.next())[FULL_SET] == []


async def test_full_set_equals_the_union_of_diffs(rs: Coap) -> None:
    bodies = []
    for n in range(5):
        bodies.append(await grant(rs))
        if n < 4:
            await revoke(rs, bodies[-1][AceParam.ACCESS_TOKEN])
        rs.service.clock.advance(1)
    rs.service.clock.advance(600 - 5)  # the first token has expired, the second not yet
    await rs.server.tick()

    response, full = await trl(rs)
    assert response.code == aiocoap.CONTENT and response.opt.content_format == CF_TRL
    _, diff = await trl(rs, "?diff=0")
    listed: set[bytes] = set()
    for removed, added in reversed(diff[DIFF_SET]):  # replay oldest first
        listed = (listed | set(added)) - set(removed)
    assert listed == set(full[FULL_SET]) and len(listed) == 3
    # Byte for byte what a device computes from its own /token response.
    assert listed == {device_token_hash(b[AceParam.ACCESS_TOKEN]) for b in bodies[1:4]}
    assert full[CURSOR] == 4  # indexes 0..4: four revocations, one expiry


async def test_family_kill_puts_all_its_tokens_on_the_trl_in_one_notification(rs: Coap) -> None:
    observer = TrlObserver(rs, "?diff=1")
    await observer.start()
    body = await grant(rs)
    hashes = {device_token_hash(body[AceParam.ACCESS_TOKEN])}
    refresh_token = body[AceParam.REFRESH_TOKEN]
    for _ in range(3):
        response, body = await rs.post_ace(
            "/token",
            {
                **_cred(rs),
                AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN,
                AceParam.REFRESH_TOKEN: refresh_token,
            },
        )
        hashes.add(device_token_hash(body[AceParam.ACCESS_TOKEN]))
        spent, refresh_token = refresh_token, body[AceParam.REFRESH_TOKEN]
    rs.service.clock.advance(31)
    response, _ = await rs.post_ace(
        "/token",
        {**_cred(rs), AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN, AceParam.REFRESH_TOKEN: spent},
    )
    assert response.code == CoapCode.BAD_REQUEST  # reuse: the family dies
    await rs.server.tick()
    ((removed, added),) = (await observer.next())[DIFF_SET]
    assert removed == [] and set(added) == hashes and len(added) == 4


async def test_revoking_a_refresh_token_kills_its_family(rs: Coap) -> None:
    body = await grant(rs)
    assert (await revoke(rs, body[AceParam.REFRESH_TOKEN])).code == aiocoap.CHANGED
    _, full = await trl(rs)
    assert full[FULL_SET] == [device_token_hash(body[AceParam.ACCESS_TOKEN])]
    response, err = await rs.post_ace(
        "/token",
        {
            **_cred(rs),
            AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN,
            AceParam.REFRESH_TOKEN: body[AceParam.REFRESH_TOKEN],
        },
    )
    assert response.code == CoapCode.BAD_REQUEST and err[AceParam.ERROR] == 3


async def test_foreign_and_unknown_tokens_give_no_hint_and_change_nothing(rs: Coap) -> None:
    mine = await grant(rs, "sensor-2")
    store = rs.service.store
    before = (await store.trl(), await store.change_counters(), await store.audit_entries())
    answers = [
        await revoke(rs, mine[AceParam.ACCESS_TOKEN], "sensor-1"),  # someone else's token
        await revoke(rs, mine[AceParam.REFRESH_TOKEN], "sensor-1"),
        await revoke(rs, b"\xd8\x3d" + bytes(40)),  # no such token
        await revoke(rs, bytes(32)),
    ]
    assert {(a.code, a.payload) for a in answers} == {(aiocoap.CHANGED, b"")}
    after = (await store.trl(), await store.change_counters(), await store.audit_entries())
    assert after == before
    # And a caller that is not a client gets invalid_client.
    response, err = await rs.post_ace(
        "/revoke",
        {AceParam.CLIENT_ID: "ghost", AceParam.CLIENT_SECRET: "x", AceParam.TOKEN: b"t"},
    )
    assert response.code == CoapCode.UNAUTHORIZED and err[AceParam.ERROR] == 2
    response, err = await rs.post_ace("/revoke", _cred(rs))
    assert response.code == CoapCode.BAD_REQUEST and err[AceParam.ERROR] == 1


@pytest.mark.parametrize(
    ("query", "error_id", "cursor"),
    [
        ("?diff=-1", 0, "absent"),
        ("?diff=abc", 0, "absent"),
        ("?diff=", 0, "absent"),
        ("?diff=1.5", 0, "absent"),
        ("?cursor=0", 1, "absent"),
        ("?diff=2&diff=3", 1, "absent"),
        ("?diff=2&cursor=x", 0, None),  # cursor entry: null while nothing was ever revoked
        ("?diff=2&cursor=-3", 0, None),
    ],
)
async def test_malformed_trl_queries(rs: Coap, query: str, error_id: int, cursor: Any) -> None:
    response, body = await trl(rs, query)
    assert response.code == CoapCode.BAD_REQUEST
    assert response.opt.content_format == CF_PROBLEM
    assert body[1][0] == error_id and set(body) <= {-1, -2, 1}  # text only if small enough
    if cursor == "absent":
        assert 1 not in body[1]
    else:
        assert body[1][1] == cursor


async def test_any_cursor_on_an_empty_history_is_answered(rs: Coap) -> None:
    # RFC 9770 §9.2.1: no update yet, whatever the cursor.
    response, body = await trl(rs, "?diff=2&cursor=5")
    assert response.code == aiocoap.CONTENT
    assert body == {DIFF_SET: [], CURSOR: None, MORE: False}


async def test_unknown_query_parameters_are_ignored(rs: Coap) -> None:
    _, plain = await trl(rs, "?diff=2")
    response, body = await trl(rs, "?diff=2&color=blue&x")
    assert response.code == aiocoap.CONTENT and body == plain


async def test_cursor_pages_through_updates(rs: Coap) -> None:
    """RFC 9770 §9 with MAX_DIFF_BATCH smaller than MAX_N: page with `more` and `cursor`."""
    rs.service.revocations.max_diff_batch = 2
    hashes = []
    for _ in range(5):
        body = await grant(rs)
        await revoke(rs, body[AceParam.ACCESS_TOKEN])
        hashes.append(device_token_hash(body[AceParam.ACCESS_TOKEN]))
    # Without a cursor: the eldest batch of the last U = 5 updates, newest first.
    _, page = await trl(rs, "?diff=0")
    assert page == {DIFF_SET: [[[], [hashes[1]]], [[], [hashes[0]]]], CURSOR: 1, MORE: True}
    _, page = await trl(rs, "?diff=0&cursor=1")
    assert page == {DIFF_SET: [[[], [hashes[3]]], [[], [hashes[2]]]], CURSOR: 3, MORE: True}
    _, page = await trl(rs, "?diff=0&cursor=3")
    assert page == {DIFF_SET: [[[], [hashes[4]]]], CURSOR: 4, MORE: False}
    _, page = await trl(rs, "?diff=0&cursor=4")  # up to date
    assert page == {DIFF_SET: [], CURSOR: 4, MORE: False}
    response, body = await trl(rs, "?diff=0&cursor=5")
    assert response.code == CoapCode.BAD_REQUEST and body[1] == {0: 2}
    response, body = await trl(rs, "?diff=0&cursor=abc")
    assert body[1] == {0: 0, 1: 4}  # the cursor entry carries the latest index


async def test_paging_with_the_cursor_misses_no_update_made_meanwhile(rs: Coap) -> None:
    rs.service.revocations.max_diff_batch = 2
    hashes = []

    async def revoke_one() -> None:
        body = await grant(rs)
        await revoke(rs, body[AceParam.ACCESS_TOKEN])
        hashes.append(device_token_hash(body[AceParam.ACCESS_TOKEN]))

    for _ in range(4):
        await revoke_one()
    _, page = await trl(rs, "?diff=4")
    seen = [added[0] for _, added in reversed(page[DIFF_SET])]
    for _ in range(3):  # revocations happen while the device is paging
        await revoke_one()
    while page[MORE] or page[DIFF_SET]:
        _, page = await trl(rs, f"?diff=4&cursor={page[CURSOR]}")
        seen += [added[0] for _, added in reversed(page[DIFF_SET])]
    assert seen == hashes  # every update once, in order, none skipped
    assert page[CURSOR] == 6


async def test_cursor_behind_the_kept_history_asks_for_a_full_query(rs: Coap) -> None:
    rs.service.revocations.max_n = 2
    for _ in range(5):
        await revoke(rs, (await grant(rs))[AceParam.ACCESS_TOKEN])
    _, page = await trl(rs, "?diff=0&cursor=0")  # updates 0 and 1 are out of reach
    assert page == {DIFF_SET: [], CURSOR: None, MORE: True}
    _, page = await trl(rs, "?diff=0&cursor=2")
    assert page[CURSOR] == 4 and len(page[DIFF_SET]) == 2


# -- /introspect --------------------------------------------------------------------------------


async def introspect(coap: Coap, token: bytes, **caller: Any) -> tuple[aiocoap.Message, Any]:
    credentials = caller or {AceParam.CLIENT_ID: "rs-door", AceParam.CLIENT_SECRET: RS_SECRET}
    return await coap.post_ace("/introspect", {**credentials, AceParam.TOKEN: token})


async def test_introspection_of_every_token_state(rs: Coap) -> None:
    service, clock = rs.service, rs.service.clock
    active = (await grant(rs, "sensor-2", "rs-door"))[AceParam.ACCESS_TOKEN]
    response, body = await introspect(rs, active)
    assert response.code == aiocoap.CREATED
    assert body[10] is True and body[2] == "sensor-2" and body[3] == "rs-door"
    assert body[1] == "coap://as.test" and body[9] == "temp:read"
    assert body[4] - body[6] == 600 and len(body[7]) == 8

    # Revoked.
    revoked = (await grant(rs, "sensor-2", "rs-door"))[AceParam.ACCESS_TOKEN]
    await revoke(rs, revoked, "sensor-2")
    assert (await introspect(rs, revoked))[1] == {10: False}
    # Forged: right shape, signed by a key that is not ours.
    now = clock.now()
    claims = Claims("coap://as.test", "sensor-2", "rs-door", now + 600, now, b"12345678")
    forged = encode_cwt(
        claims, ec.generate_private_key(ec.SECP256R1()), CoseAlg.ES256, service.key_ring.active.kid
    )
    assert (await introspect(rs, forged))[1] == {10: False}
    # Another audience's token: not this resource server's business.
    other = (await grant(rs, "sensor-2", "thermostat"))[AceParam.ACCESS_TOKEN]
    assert (await introspect(rs, other))[1] == {10: False}
    # Garbage and truncated tokens.
    assert (await introspect(rs, b"not a token"))[1] == {10: False}
    assert (await introspect(rs, active[:-5]))[1] == {10: False}
    # Signed by a key that has since been revoked.
    await service.revoke_key(service.key_ring.active.kid, actor="operator")
    assert (await introspect(rs, active))[1] == {10: False}
    fresh = (await grant(rs, "sensor-2", "rs-door"))[AceParam.ACCESS_TOKEN]
    assert (await introspect(rs, fresh))[1][10] is True
    # Expired.
    clock.advance(600)
    assert (await introspect(rs, fresh))[1] == {10: False}


async def test_introspection_of_a_jwt(rs: Coap) -> None:
    response, body = await rs.post_ace(
        "/token",
        {**_cred(rs, "sensor-2"), AceParam.AUDIENCE: "rs-door", "token_format": "jwt"},
    )
    jwt = body[AceParam.ACCESS_TOKEN]
    assert jwt.startswith(b"ey")
    _, answer = await introspect(rs, jwt)
    assert answer[10] is True and answer[2] == "sensor-2"
    _, answer = await introspect(rs, jwt.decode("ascii"))  # the text form is accepted too
    assert answer[10] is True


async def test_only_registered_resource_servers_may_introspect(rs: Coap) -> None:
    token = (await grant(rs, "sensor-2", "rs-door"))[AceParam.ACCESS_TOKEN]
    for caller in (
        {AceParam.CLIENT_ID: "rs-door", AceParam.CLIENT_SECRET: "wrong"},
        {AceParam.CLIENT_ID: "sensor-2", AceParam.CLIENT_SECRET: rs.secrets["sensor-2"]},
        {AceParam.CLIENT_ID: "thermostat", AceParam.CLIENT_SECRET: RS_SECRET},  # no credentials
        {},
    ):
        response, body = await rs.post_ace("/introspect", {**caller, AceParam.TOKEN: token})
        assert response.code == CoapCode.UNAUTHORIZED, caller
        assert body[AceParam.ERROR] == 2 and 10 not in body
