import aiocoap

from coap_auth.wire import AceParam


async def test_token_over_edhoc_and_oscore(protected):
    device = await protected.device("sensor-1")
    await device.handshake()
    response, body = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
    assert response.code == aiocoap.CREATED, (response, body)
    assert AceParam.ACCESS_TOKEN in body
