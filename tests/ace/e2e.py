"""Helpers of the end-to-end tests of the ACE OSCORE profiles (test_end_to_end.py): the example
thermostat's module, the UDP port a device sends from, a request under a given OSCORE context,
and an unprotected datagram forged with another endpoint's source address and port."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiocoap
from aiocoap.oscore import NotAProtectedMessage
from aiocoap.transports.oscore import OSCOREAddress

from tests.raw_coap import forged_request, local_port, raw_socket

__all__ = ["forged_request", "local_port", "protected", "raw_socket", "thermostat_module"]

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
