"""Issue 14 on several instances sharing PostgreSQL: every instance shows the same EDHOC
credential (derived from the shared master key), and a device whose datagrams land on another
instance (a load balancer changed its mind) recovers by running EDHOC again."""

from __future__ import annotations

import secrets
from pathlib import Path

import aiocoap
import pytest
from aiocoap.oscore import NotAProtectedMessage
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.clock import SettableClock
from coap_auth.secure.credentials import device_credential
from coap_auth.store import Audience, Client, MasterKey
from coap_auth.tokens import cose_key_from_public
from coap_auth.udp import create_client_context
from coap_auth.wire import AceParam
from tests import pg
from tests.device_client.lossy_proxy import LossyProxy
from tests.secure.conftest import Device
from tests.test_postgres_instances import start_instance

pytestmark = pg.needs_postgres


async def test_a_device_moved_to_another_instance_recovers(schema: str, tmp_path: Path) -> None:
    assert pg.PG_DSN is not None
    master_key, clock = MasterKey(secrets.token_bytes(32)), SettableClock()
    a = await start_instance(
        pg.PG_DSN, schema, master_key, clock, tmp_path / "a", require_oscore=True
    )
    b = await start_instance(
        pg.PG_DSN, schema, master_key, clock, tmp_path / "b", require_oscore=True
    )
    key = ec.generate_private_key(ec.SECP256R1())
    await a.service.store.add_audience(Audience("thermostat", "cwt", 600, clock.now()), "operator")
    await a.service.store.add_client(
        Client(
            "sensor-1",
            ("thermostat",),
            ("temp:read",),
            clock.now(),
            public_key=cose_key_from_public(key.public_key()),
        ),
        "operator",
    )
    assert a.service.edhoc_identity.credential == b.service.edhoc_identity.credential
    # One address for the device, as a load balancer would give: a relay to A, then to B.
    relay = await LossyProxy(("127.0.0.1", a.server.port)).start()
    context = await create_client_context()
    device = Device(device_credential("sensor-1", key), context, relay.uri, a.server)
    try:
        await device.handshake()
        response, _ = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
        assert response.code == aiocoap.CREATED
        # The balancer now sends this device's datagrams to B.
        for upstream in relay._upstreams.values():
            upstream.close()
        relay._upstreams.clear()
        relay.server = ("127.0.0.1", b.server.port)
        with pytest.raises(NotAProtectedMessage) as gone:  # an unprotected 4.01
            await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
        assert gone.value.plain_message.code == aiocoap.UNAUTHORIZED
        await device.handshake()
        response, _ = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
        assert response.code == aiocoap.CREATED
        assert len(b.server.contexts) == 1
    finally:
        relay.close()
        await context.shutdown()
        for instance in (a, b):
            await instance.server.stop()
            await instance.service.store.close()
