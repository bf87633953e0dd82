"""Issue 16: the TRL answer for a query shape is computed once per change, whatever the number
of observers or concurrent GETs (RFC 9770 §6.2: diff 0 and any diff above MAX_N are one
shape); 4.06 Not Acceptable on /revoke/trl and /token (RFC 7252 §5.10.4). Over real UDP, lab
mode (unprotected TRL reads)."""

from __future__ import annotations

import asyncio

import aiocoap
import cbor2

from coap_auth.service import AuthService, TokenRequest
from coap_auth.store import Audience, Client
from coap_auth.tokens import token_hash
from coap_auth.wire import ContentFormat, TrlParam
from tests.coap.observing import RawObserver, server_with
from tests.conftest import SEEN_SECRETS, Coap

SECRET = "secret-of-sensor-1-0123456789abcdef"


async def revoke_one(service: AuthService) -> bytes:
    if await service.store.get_client("sensor-1") is None:
        now = service.clock.now()
        await service.store.add_audience(Audience("thermostat", "cwt", 600, now), "operator")
        SEEN_SECRETS.add(SECRET.encode())
        await service.store.add_client(
            Client(
                "sensor-1",
                ("thermostat",),
                ("temp:read",),
                now,
                secret_digest=service.secret_digest(SECRET),
            ),
            "operator",
        )
    issued = await service.issue_token(
        TokenRequest(client_id="sensor-1", client_secret=SECRET, audience="thermostat")
    )
    hashed = token_hash(issued.access_token)
    assert await service.revoke_token_hash(hashed, actor="operator")
    return hashed


async def test_a_hundred_observers_of_one_query_cost_one_computation(
    service: AuthService,
) -> None:
    max_n = service.settings.trl_max_n
    async with server_with(service, observers_per_source=200) as server:
        trl = server.trl_resource
        observer = RawObserver(server.port)  # type: ignore[arg-type]
        try:
            # One shape, spelled three ways (RFC 9770 §6.2: 0 and past MAX_N mean MAX_N).
            queries = ["?diff=0", f"?diff={max_n}", f"?diff={max_n + 1000}"]
            for n in range(100):
                first = await observer.register("/revoke/trl" + queries[n % 3])
                assert first.opt.observe is not None and first.opt.etag is not None
            assert trl.computations == 1  # the first registration's; the others shared it

            for round_ in range(2):
                hashed = await revoke_one(service)
                await server.tick()
                notes = await observer.notifications(100)
                assert trl.computations == 2 + round_
                assert {n.payload for n in notes} == {notes[0].payload}
                assert cbor2.loads(notes[0].payload)[TrlParam.DIFF_SET][0] == [[], [hashed]]
                assert all(n.mtype == aiocoap.NON for n in notes)
        finally:
            observer.close()


async def test_concurrent_gets_share_one_computation(coap: Coap) -> None:
    trl = coap.server.trl_resource
    await revoke_one(coap.service)
    await coap.server.tick()
    before = trl.computations
    answers = await asyncio.gather(
        *(coap.request(aiocoap.GET, "/revoke/trl?diff=3") for _ in range(50))
    )
    assert {a.code for a in answers} == {aiocoap.CONTENT}
    assert trl.computations == before + 1


async def test_unacceptable_accept_is_4_06(coap: Coap) -> None:
    answer = await coap.request(aiocoap.GET, "/revoke/trl", accept=ContentFormat.JSON)
    assert answer.code == aiocoap.NOT_ACCEPTABLE
    answer = await coap.request(aiocoap.GET, "/revoke/trl", accept=ContentFormat.ACE_TRL_CBOR)
    assert answer.code == aiocoap.CONTENT
    body = cbor2.dumps({24: "nobody", 25: "x" * 20, 5: "thermostat"})
    answer = await coap.request(
        aiocoap.POST, "/token", body, ContentFormat.ACE_CBOR, accept=ContentFormat.JSON
    )
    assert answer.code == aiocoap.NOT_ACCEPTABLE
    # Accept 19 is served (here: the ACE error for an unknown client, not 4.06).
    answer = await coap.request(
        aiocoap.POST, "/token", body, ContentFormat.ACE_CBOR, accept=ContentFormat.ACE_CBOR
    )
    assert answer.code == aiocoap.UNAUTHORIZED
