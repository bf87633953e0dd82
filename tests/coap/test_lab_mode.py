"""Issue 14: `require_oscore = false` (lab mode) turns plain CoAP back on, and `serve` says
so on every start."""

from __future__ import annotations

from pathlib import Path

import aiocoap

from coap_auth.wire import AceParam
from tests.conftest import Coap
from tests.processes import run_cli, serve_process


async def test_lab_mode_turns_plain_coap_back_on(sensor: Coap) -> None:
    # tests/conftest.py's settings are lab mode: require_oscore off.
    assert sensor.service.settings.require_oscore is False
    response, body = await sensor.post_ace(
        "/token",
        {
            AceParam.CLIENT_ID: "sensor-1",
            AceParam.CLIENT_SECRET: sensor.secrets["sensor-1"],
            AceParam.AUDIENCE: "thermostat",
        },
    )
    assert response.code == aiocoap.CREATED, body


async def test_serve_warns_on_every_start_in_lab_mode(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cli("init", data_dir=data_dir).returncode == 0
    log = tmp_path / "serve.log"
    warning = "require_oscore is off"
    async with serve_process(data_dir, log, COAP_AUTH_REQUIRE_OSCORE="false"):
        pass
    async with serve_process(data_dir, log, COAP_AUTH_REQUIRE_OSCORE="false"):
        pass
    assert log.read_text().count(warning) == 2
    async with serve_process(data_dir, log, COAP_AUTH_REQUIRE_OSCORE="true"):
        pass
    assert log.read_text().count(warning) == 2
