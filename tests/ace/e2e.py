"""Helpers of the end-to-end tests of the ACE OSCORE profiles (test_end_to_end.py): the example
thermostat's module, the UDP port a device sends from, a request under a given OSCORE context,
and an unprotected datagram forged with another endpoint's source address and port."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiocoap
from aiocoap.oscore import NotAProtectedMessage
from aiocoap.transports.oscore import OSCOREAddress

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ANSWER_TIMEOUT = 5.0  # real seconds for a datagram to come back over loopback


def thermostat_module() -> ModuleType:
    """examples/thermostat_rs.py, imported (examples/ is no package)."""
    name = "examples_thermostat_rs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / "thermostat_rs.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def local_port(context: aiocoap.Context) -> int:
    """The UDP port an aiocoap client context sends from (its one UDP socket)."""
    for interface in context.request_interfaces:
        token_interface = getattr(interface, "token_interface", None)
        message_interface = getattr(token_interface, "message_interface", None)
        transport = getattr(message_interface, "transport", None)
        if transport is not None:
            return int(transport.get_extra_info("socket").getsockname()[1])
    raise AssertionError("no UDP socket found")


async def protected(
    device: aiocoap.Context,
    context: Any,
    uri: str,
    code: aiocoap.Code,
    payload: bytes = b"",
) -> tuple[aiocoap.Message, bool]:
    """Send under OSCORE `context`; the answer and whether it came protected (an unprotected
    4.01 says the RS no longer holds the context)."""
    message = aiocoap.Message(code=code, uri=uri, payload=payload)
    message.remote = OSCOREAddress(context, message.remote)
    try:
        answer = await asyncio.wait_for(device.request(message).response, ANSWER_TIMEOUT)
        return answer, True
    except NotAProtectedMessage as plain:
        return plain.plain_message, False


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
    request.mtype, request.mid, request.token = aiocoap.CON, 0x5EED, b"\x5e\xed\xf0\x0d"
    datagram = request.encode()
    loop = asyncio.get_running_loop()
    raw.setblocking(False)
    header = struct.pack("!HHHH", victim_port, rs_port, 8 + len(datagram), 0)
    raw.sendto(header + datagram, ("127.0.0.1", rs_port))
    deadline = loop.time() + ANSWER_TIMEOUT
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
