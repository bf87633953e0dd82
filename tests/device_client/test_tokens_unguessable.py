"""Outsider test (issue 16): aiocoap's message tokens count up in one or two bytes, so a forger
who knows a device's address and port could guess its observation's token and end it with a
request on it (65,536 datagrams did). device_client's contexts use eight random bytes."""

from __future__ import annotations

import asyncio
import socket

import aiocoap

from device_client import create_client_context


async def test_a_device_s_message_tokens_are_eight_random_bytes() -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        context = await create_client_context()
        try:
            tokens = []
            for _ in range(3):
                context.request(
                    aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{port}/keys")
                )
                data, client = await asyncio.wait_for(loop.sock_recvfrom(server, 2048), 2)
                request = aiocoap.Message.decode(data)
                tokens.append(request.token)
                # Answered (2.05), so the next request is not held back (NSTART 1).
                answer = aiocoap.Message(code=aiocoap.CONTENT, payload=b"")
                answer.mtype, answer.mid, answer.token = aiocoap.ACK, request.mid, request.token
                server.sendto(answer.encode(), client)
            assert all(len(token) == 8 for token in tokens)
            assert len(set(tokens)) == 3
            assert len({t[:6] for t in tokens}) == 3  # not a counter
        finally:
            await context.shutdown()
