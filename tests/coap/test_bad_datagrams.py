"""Issue 13: a datagram the AS drops costs at most one log line per kind per minute, with the
count of the ones not logged, and never a traceback or any of the datagram's content.
Over real UDP; the drop log reads the server's SettableClock.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiocoap
import pytest

from tests.conftest import Coap

BURST = 50
# A CON GET whose Uri-Path (option 11, 2 bytes) is not UTF-8: 7 bytes in all.
BAD_UTF8 = bytes([0x40, 0x01, 0x12, 0x34, 0xB2, 0xFF, 0xFE])
# Version 2: not CoAP at all.
NOT_COAP = bytes([0x80, 0x01, 0x12, 0x34])
# A request sent as an ACK: code and type do not fit.
REQUEST_AS_ACK = bytes([0x60, 0x01, 0x12, 0x34, 0xB4]) + b"keys"
KINDS = {
    BAD_UTF8: "a string option that is not UTF-8",
    NOT_COAP: "not a CoAP message",
    REQUEST_AS_ACK: "code and type do not fit",
}


async def send(port: int, datagram: bytes, count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(datagram, ("127.0.0.1", port))
    await asyncio.sleep(0.2)  # real time, for delivery


def server_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("datagram", list(KINDS), ids=["bad-utf8", "not-coap", "request-as-ack"])
async def test_one_line_per_kind_and_minute(
    coap: Coap, caplog: pytest.LogCaptureFixture, datagram: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    port, clock = coap.server.port, coap.service.clock
    await send(port, datagram, BURST)  # type: ignore[arg-type]
    assert server_lines(caplog) == [f"dropped a datagram from 127.0.0.1: {KINDS[datagram]}"]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]

    clock.advance(59)
    await send(port, datagram, 1)  # type: ignore[arg-type]
    assert len(server_lines(caplog)) == 1
    clock.advance(1)
    await send(port, datagram, 1)  # type: ignore[arg-type]
    assert server_lines(caplog)[1:] == [
        f"dropped a datagram from 127.0.0.1: {KINDS[datagram]};"
        f" {BURST} more since the last such line"
    ]
    # The server still answers.
    assert (await coap.request(aiocoap.GET, "/keys")).code == aiocoap.CONTENT


async def test_each_kind_has_its_own_line(coap: Coap, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    for datagram in KINDS:
        await send(coap.server.port, datagram, 5)  # type: ignore[arg-type]
    assert server_lines(caplog) == [
        f"dropped a datagram from 127.0.0.1: {kind}" for kind in KINDS.values()
    ]
