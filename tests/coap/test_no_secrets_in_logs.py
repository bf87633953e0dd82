"""No secret, token or refresh token reaches a log line or an error body."""

from __future__ import annotations

import base64
import logging

import aiocoap
import pytest

from coap_auth.cli.runtime import JsonFormatter
from coap_auth.wire import AceParam
from tests.conftest import Coap


async def test_logs_and_errors_carry_no_secret_or_token(
    sensor: Coap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = sensor.secrets["sensor-1"]
    cred = {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: secret}
    bodies: list[bytes] = []

    response, grant = await sensor.post_ace("/token", {**cred, AceParam.AUDIENCE: "thermostat"})
    assert response.code == aiocoap.CREATED
    refresh = {**cred, AceParam.GRANT_TYPE: 3, AceParam.REFRESH_TOKEN: grant[37]}
    response, _ = await sensor.post_ace("/token", refresh)
    sensor.service.clock.advance(60)
    for body in (
        refresh,  # reuse: family killed, logged as a warning
        {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: secret + "x"},
        {**cred, AceParam.SCOPE: "valve:open", AceParam.AUDIENCE: "thermostat"},
    ):
        response, _ = await sensor.post_ace("/token", body)
        assert response.code.is_successful() is False
        bodies.append(response.payload)

    assert "family killed" in caplog.text  # the log did see these requests
    forbidden = {
        "client secret": secret.encode(),
        "refresh token": grant[37],
        "access token": grant[1],
    }
    # The text format, and the JSON one (log_format = "json": every field of a record).
    as_json = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert '"token_hash": "' in as_json and '"client": "sensor-1"' in as_json
    for logged in (caplog.text.encode(), as_json.encode()):
        for name, value in forbidden.items():
            for form in (value, value.hex().encode(), base64.urlsafe_b64encode(value).rstrip(b"=")):
                assert form not in logged, name
                assert all(form not in body for body in bodies), name
