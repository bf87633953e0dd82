"""Structured logs (issue 18): `serve` with log_format json writes one JSON object per stderr
line, and the access line of a grant names the client, the token's hash prefix and its
refresh family: enough to revoke the token with `coap-auth tokens revoke --hash`.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiocoap
import cbor2

from coap_auth.tokens import token_hash
from coap_auth.wire import AceParam, ContentFormat
from tests.processes import cli_ok, provision, serve_process

REQUEST_TIMEOUT = 5
STOP_TIMEOUT = 10


async def post_ace(context: aiocoap.Context, url: str, body: dict[int, object]) -> dict:
    message = aiocoap.Message(
        code=aiocoap.POST,
        uri=url,
        payload=cbor2.dumps(body),
        content_format=ContentFormat.ACE_CBOR,
    )
    response = await asyncio.wait_for(context.request(message).response, REQUEST_TIMEOUT)
    assert response.code.is_successful(), response
    return cbor2.loads(response.payload) if response.payload else {}


async def test_json_logs_name_what_a_grant_issued(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    secret = provision(data_dir)
    log = tmp_path / "serve.log"
    credentials = {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: secret}
    context = await aiocoap.Context.create_client_context()
    try:
        async with serve_process(data_dir, log, COAP_AUTH_LOG_FORMAT="json") as server:
            grant = await post_ace(context, server.url + "/token", credentials)
            access_token = grant[AceParam.ACCESS_TOKEN]
            full_hash = token_hash(access_token).hex()
            lines = log.read_text().splitlines()
            records = [json.loads(line) for line in lines]
            access = [r for r in records if r["logger"] == "coap_auth.access"]
            assert len(access) == 1, access
            line = access[0]
            assert {"time", "level", "logger", "message"} <= line.keys()
            assert line["method"] == "POST" and line["path"] == "/token"
            assert line["code"] == "2.01" and line["client"] == "sensor-1"
            assert line["token_hash"] == full_hash[:16]
            assert len(line["family"]) == 32 and int(line["family"], 16) >= 0
            assert isinstance(line["duration_ms"], float)
            # Never the token or the refresh token, in any form.
            text = log.read_text()
            for value in (access_token, grant[AceParam.REFRESH_TOKEN]):
                assert value.hex() not in text
            assert secret not in text

            # The family the log names is the one the store knows for the client.
            families = cli_ok("tokens", "families", "--json", data_dir=data_dir)
            assert line["family"] in families
            # The prefix the log names is what `tokens revoke --hash` takes.
            revoked = cli_ok("tokens", "revoke", "--hash", line["token_hash"], data_dir=data_dir)
            assert full_hash in revoked
            # The client id on the other authenticated paths too, /revoke here (lab mode: the
            # client's secret in the request).
            await post_ace(
                context,
                server.url + "/revoke",
                {**credentials, AceParam.TOKEN: grant[AceParam.REFRESH_TOKEN]},
            )
            others = [
                json.loads(entry)
                for entry in log.read_text().splitlines()
                if '"coap_auth.access"' in entry
            ][1:]
            assert [(r["path"], r["client"]) for r in others] == [("/revoke", "sensor-1")]

            server.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.process.wait(), STOP_TIMEOUT)
        for line in log.read_text().splitlines():
            json.loads(line)  # every line of stderr, to the end, is one JSON object
    finally:
        await context.shutdown()
