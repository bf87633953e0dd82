"""A server with the default `require_oscore = true`, and devices that reach it over EDHOC +
OSCORE (the AS's credential provisioned as `coap-auth edhoc-credential` prints it)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.secure.contexts import OscoreContext
from coap_auth.secure.credentials import EdhocIdentity, device_credential
from coap_auth.secure.edhoc import establish
from coap_auth.service import AuthService
from coap_auth.store import Audience, Client
from coap_auth.tokens import cose_key_from_public
from coap_auth.udp import create_client_context
from coap_auth.wire import ContentFormat
from tests.conftest import remember_secrets


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, require_oscore=True)


@dataclass
class Device:
    """A registered device with its own client context (its own UDP port)."""

    identity: EdhocIdentity
    context: aiocoap.Context
    base: str
    server: Server
    oscore: OscoreContext | None = None

    async def handshake(self) -> OscoreContext:
        as_credential = self.server.service.edhoc_identity.credential
        self.oscore = await establish(self.context, self.base, self.identity, as_credential)
        self.context.client_credentials[f"{self.base}/*"] = self.oscore
        return self.oscore

    async def request(
        self, method: aiocoap.Code, path: str, payload: bytes = b"", **options: Any
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=method, uri=self.base + path, payload=payload, **options)
        return await self.context.request(message).response

    async def post_ace(self, path: str, body: Any) -> tuple[aiocoap.Message, Any]:
        remember_secrets(body)
        response = await self.request(
            aiocoap.POST, path, cbor2.dumps(body), content_format=ContentFormat.ACE_CBOR
        )
        decoded = cbor2.loads(response.payload) if response.payload else None
        remember_secrets(decoded)
        return response, decoded


@dataclass
class Protected:
    server: Server
    service: AuthService
    base: str
    devices: list[Device]

    async def device(
        self,
        client_id: str,
        *,
        audiences: tuple[str, ...] = ("thermostat",),
        scope: str = "temp:read temp:write",
        register: bool = True,
    ) -> Device:
        key = ec.generate_private_key(ec.SECP256R1())
        if register:
            await self.service.store.add_client(
                Client(
                    client_id,
                    audiences,
                    tuple(scope.split()),
                    self.service.clock.now(),
                    public_key=cose_key_from_public(key.public_key()),
                ),
                "operator",
            )
        return await self._device(client_id, key)

    async def resource_server(self, audience_id: str, token_format: str = "cwt") -> Device:
        """An audience registered with an introspection key: it reads the TRL (and calls
        /introspect) over its own EDHOC context."""
        key = ec.generate_private_key(ec.SECP256R1())
        await self.service.store.add_audience(
            Audience(
                audience_id,
                token_format,  # type: ignore[arg-type]
                600,
                self.service.clock.now(),
                introspect_public_key=cose_key_from_public(key.public_key()),
            ),
            "operator",
        )
        return await self._device(audience_id, key)

    async def _device(self, subject: str, key: ec.EllipticCurvePrivateKey) -> Device:
        """A device with this identity on a client context of its own (closed at the end)."""
        context = await create_client_context()
        device = Device(device_credential(subject, key), context, self.base, self.server)
        self.devices.append(device)
        return device


@pytest.fixture
async def protected(service: AuthService) -> AsyncIterator[Protected]:
    await service.store.add_audience(
        Audience("thermostat", "cwt", 600, service.clock.now()), "operator"
    )
    await service.store.add_audience(
        Audience("dashboard", "jwt", 900, service.clock.now()), "operator"
    )
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    world = Protected(server, service, f"coap://127.0.0.1:{server.port}", [])
    try:
        yield world
    finally:
        for device in world.devices:
            await device.context.shutdown()
        await server.stop()
