"""One CoAP request as raw datagrams over real UDP, for tests that must control every byte
(message type, options the client libraries would refuse, the source address), and a
datagram forged with another endpoint's source address and port (a raw socket)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

import aiocoap

from coap_auth.coap.server import _bound_port

ANSWER_TIMEOUT = 2.0  # s, for the async exchange
FORGED_ANSWER_TIMEOUT = 5.0  # s, for the answer to a forged datagram over loopback
BLOCKING_TIMEOUT = 5  # s, for the blocking one (the fuzz tests' server runs in a thread)
_message_ids = itertools.count(1)


def number_request(request: aiocoap.Message, mtype: aiocoap.Type) -> int:
    """Give `request` a fresh message id, a message token of its own and `mtype`."""
    mid = next(_message_ids) % 0xFFFF
    request.mtype, request.mid, request.token = mtype, mid, mid.to_bytes(2, "big")
    return mid


async def exchange(
    port: int,
    request: aiocoap.Message,
    mtype: aiocoap.Type = aiocoap.CON,
    *,
    source: str = "127.0.0.1",
    timeout: float = ANSWER_TIMEOUT,
) -> aiocoap.Message:
    """Send `request` from `source` to 127.0.0.1:`port`; the first datagram carrying its
    message token. Raises TimeoutError when none comes within `timeout`."""
    number_request(request, mtype)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        await loop.sock_sendall(sock, request.encode())
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
            answer = aiocoap.Message.decode(data)
            if answer.token == request.token:
                return answer


def exchange_blocking(port: int, message: aiocoap.Message) -> aiocoap.Message:
    """Send one CON request from a blocking socket; its answer, piggybacked or separate (a
    separate CON response is acknowledged). Raises TimeoutError after BLOCKING_TIMEOUT."""
    mid = number_request(message, aiocoap.CON)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(BLOCKING_TIMEOUT)
        sock.sendto(message.encode(), ("127.0.0.1", port))
        while True:
            answer = aiocoap.Message.decode(sock.recv(65536))
            if answer.code == aiocoap.EMPTY:
                # An empty ACK (RFC 7252 §5.2.2): the answer follows as a separate response,
                # when the server took longer than aiocoap's empty-ACK delay (a loaded machine).
                continue
            if answer.token == message.token and (answer.mid == mid or answer.mtype != aiocoap.ACK):
                if answer.mtype == aiocoap.CON:
                    ack = aiocoap.Message(mtype=aiocoap.ACK, code=aiocoap.EMPTY)
                    ack.mid = answer.mid
                    sock.sendto(ack.encode(), ("127.0.0.1", port))
                return answer


def local_port(context: aiocoap.Context) -> int:
    """The UDP port an aiocoap client context sends from (its one UDP socket)."""
    port = _bound_port(context)
    assert port is not None, "no UDP socket found"
    return port


def raw_socket() -> socket.socket | None:
    """A raw UDP socket (root or CAP_NET_RAW), or None."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except PermissionError:
        return None


async def forged_request(
    raw: socket.socket, rs_port: int, victim_port: int, request: aiocoap.Message
) -> aiocoap.Message:
    """Send `request` (unprotected, CON) to 127.0.0.1:`rs_port` in a UDP datagram whose source
    is 127.0.0.1:`victim_port`, as an attacker on the path can; the RS's answer, seen on the
    raw socket going to the victim's port. Raises AssertionError when none is seen."""
    # A message id of its own: the same one again would be a duplicate (RFC 7252 §4.5).
    mid = next(_message_ids) % 0xFFFF
    request.mtype, request.mid, request.token = aiocoap.CON, mid, b"\x5e\xed\xf0\x0d"
    datagram = request.encode()
    loop = asyncio.get_running_loop()
    raw.setblocking(False)
    header = struct.pack("!HHHH", victim_port, rs_port, 8 + len(datagram), 0)
    raw.sendto(header + datagram, ("127.0.0.1", rs_port))
    deadline = loop.time() + FORGED_ANSWER_TIMEOUT
    while loop.time() < deadline:
        try:
            packet = await asyncio.wait_for(loop.sock_recv(raw, 4096), deadline - loop.time())
        except TimeoutError:
            break
        udp = packet[(packet[0] & 0x0F) * 4 :]  # after the IPv4 header
        if struct.unpack("!HH", udp[:4]) == (rs_port, victim_port):
            answer = aiocoap.Message.decode(udp[8:])
            if answer.token == request.token:
                return answer
    raise AssertionError("no answer to the forged datagram seen")
