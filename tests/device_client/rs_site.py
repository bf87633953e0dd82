"""A resource server for the tests: /authz-info and one guarded resource on a UDP endpoint of
its own, and a device that talks to it (shared by the RS, revocation and canonical-form tests)."""

from __future__ import annotations

from dataclasses import dataclass

import aiocoap
from aiocoap import resource

from coap_auth.coap.server import _bound_port
from device_client import ResourceServer, create_server_context, require_scope

CF_CWT = 61  # PROTOCOL.md, written out on purpose


class Temperature(resource.Resource):
    """GET needs temp:read, PUT temp:write."""

    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server  # where require_scope looks
        self.value = b"21.5"

    @require_scope("temp:read")
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.value)

    @require_scope("temp:write")
    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        self.value = request.payload
        return aiocoap.Message(code=aiocoap.CHANGED)


@dataclass
class Thermostat:
    """A running resource server (`base`) and a device's CoAP context aimed at it."""

    base: str
    resource_server: ResourceServer
    device: aiocoap.Context

    async def send(
        self, method: aiocoap.Code, path: str, payload: bytes = b"", **options: object
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=method, uri=self.base + path, payload=payload, **options)
        return await self.device.request(message).response

    async def upload(self, token: bytes, content_format: int = CF_CWT) -> aiocoap.Message:
        return await self.send(aiocoap.POST, "/authz-info", token, content_format=content_format)


async def serve(
    resource_server: ResourceServer, resources: dict[str, resource.Resource]
) -> tuple[str, int, aiocoap.Context]:
    """Serve /authz-info and `resources` (path -> resource) on 127.0.0.1, a free port."""
    site = resource.Site()
    resource_server.add_to(site)
    for path, item in resources.items():
        site.add_resource([path], item)
    # As examples/thermostat_rs.py does: the fixed UDP transport, 4.02 for unknown critical
    # options.
    context = await create_server_context(site, ("127.0.0.1", 0))
    port = _bound_port(context)
    return f"coap://127.0.0.1:{port}", port, context
