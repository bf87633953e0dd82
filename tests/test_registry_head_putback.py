"""Attack (issue 17, round 3, F1): someone with the database alone undoes `clients disable` on
a running server by writing back the client's row as it was (a genuine, older copy, MAC and
all) together with the audit head's registry digest, or the whole older head. The change feed
took the stored digest unverified, so the server never reloaded, and /token went on issuing to
the disabled client. The feed now gives the digest only of a verified, current head.

Real server on 127.0.0.1 over UDP; the change poll is slowed to 60 s and run by hand, so the
put-back lands between two polls every time."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import aiocoap
import pytest

from coap_auth.config import Settings
from coap_auth.wire import AceErrorCode, AceParam
from tests.conftest import Coap

BODY = {AceParam.CLIENT_ID: "sensor-1", AceParam.AUDIENCE: "thermostat"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """tests/conftest.py's, with the change poll at its slowest."""
    return replace(settings, change_poll_interval=60)


def _database(coap: Coap) -> sqlite3.Connection:
    return sqlite3.connect(coap.service.settings.data_dir / "coap-auth.sqlite3")


@pytest.mark.parametrize("put_back", ["digest", "whole head"])
async def test_a_disable_undone_by_putting_back_rows_and_head_is_not_served(
    sensor: Coap, put_back: str
) -> None:
    body = {**BODY, AceParam.CLIENT_SECRET: sensor.secrets["sensor-1"]}
    response, _ = await sensor.post_ace("/token", body)
    assert response.code == aiocoap.CREATED  # the server has the registry loaded
    with _database(sensor) as db:
        row = db.execute(
            "SELECT disabled, mac FROM clients WHERE client_id = 'sensor-1'"
        ).fetchone()
        head = db.execute("SELECT seq, last_mac, registry, mac FROM audit_head").fetchone()

    assert await sensor.service.store.disable_client("sensor-1", sensor.service.clock.now(), "op")

    with _database(sensor) as db:  # the attacker: the database, not the master key
        db.execute("UPDATE clients SET disabled = ?, mac = ? WHERE client_id = 'sensor-1'", row)
        if put_back == "digest":
            db.execute("UPDATE audit_head SET registry = ?", (head[2],))
        else:
            db.execute("UPDATE audit_head SET seq = ?, last_mac = ?, registry = ?, mac = ?", head)
    await sensor.server.check_changes()  # the next tick of the change poll

    response, answer = await sensor.post_ace("/token", body)
    assert response.code == aiocoap.UNAUTHORIZED, answer
    assert answer[AceParam.ERROR] == AceErrorCode.INVALID_CLIENT
