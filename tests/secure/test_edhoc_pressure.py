"""The AS's EDHOC responder under a message_1 flood from spoofed addresses (issue 16, second
round, over real UDP): once half its pending handshakes are taken, message_1 from an address
the AS has not verified gets the Echo challenge first (RFC 9528 §9.7, RFC 9175 §2.4), so
the flood cannot push out a real device's pending handshake, and devices (which answer the
challenge) still get through. Loopback is unverified here (`verified_networks = ""`), and
the table small (16) to keep the flood short.

Before the fix, the 40 spoofed message_1 took the whole table and the device's message_3 met
"no handshake in progress".
"""

from __future__ import annotations

import dataclasses

import aiocoap
import pytest

from coap_auth.config import Settings
from coap_auth.secure.edhoc import establish
from tests.device_client.test_rs_attacks16 import (
    FloodBeforeMessage3,
    a_stranger_meets_the_echo,
    flood,
)
from tests.secure.conftest import Protected

MAX_PENDING = 16


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, verified_networks="", edhoc_max_pending=MAX_PENDING, edhoc_pending_per_address=4
    )


async def test_a_message_1_flood_meets_the_echo_once_half_the_table_is_taken(
    protected: Protected,
) -> None:
    server = protected.server
    port = server.port
    assert port is not None
    device = await protected.device("meter-1")
    codes: list[aiocoap.Code] = []

    async def attack() -> None:
        codes.extend(await flood(port, 40))

    # The flood arrives while the device's handshake is pending.
    as_credential = server.service.edhoc_identity.credential
    oscore = await establish(
        FloodBeforeMessage3(device.context, attack), device.base, device.identity, as_credential
    )
    assert oscore.peer.id == as_credential.subject
    half = MAX_PENDING // 2
    assert codes.count(aiocoap.CHANGED) == half - 1  # the device's made half
    assert codes.count(aiocoap.UNAUTHORIZED) == 40 - (half - 1)
    assert server.edhoc.pending == half - 1 and not server.edhoc.under_pressure
    device.oscore = oscore
    device.context.client_credentials[f"{device.base}/*"] = oscore
    keys = await device.request(aiocoap.GET, "/keys")
    assert keys.code == aiocoap.CONTENT

    # Under pressure again: a stranger's message_1 is challenged, and answered with the Echo.
    assert await flood(port, 1, network=6) == [aiocoap.CHANGED]
    assert server.edhoc.under_pressure
    await a_stranger_meets_the_echo(port)

    # Another device answers the challenge itself and gets its context.
    challenges = server.guard.challenges
    other = await protected.device("meter-2")
    await other.handshake()
    assert server.guard.challenges == challenges + 1
    assert (await other.request(aiocoap.GET, "/keys")).code == aiocoap.CONTENT


async def test_below_half_the_table_message_1_is_answered_at_once(protected: Protected) -> None:
    server = protected.server
    assert server.port is not None
    codes = await flood(server.port, MAX_PENDING // 2 - 1, network=5)
    assert codes == [aiocoap.CHANGED] * (MAX_PENDING // 2 - 1)
    assert server.guard.challenges == 0 and not server.edhoc.under_pressure
