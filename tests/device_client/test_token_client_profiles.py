"""TokenClient reads the ACE profile fields of a /token answer (ace_profile 38, cnf 8, rs_cnf
41), keeps them on the AccessToken (the OSCORE input material a secret: not in repr, not in
logs, only in the 0600 state file), and `refresh_now` gets a new token before its time.

The AS here is a test double of its /token wire contract (design issue 15, docs/protocol.md): a
real aiocoap server over UDP answering fixed ace+cbor maps, since the AS side of the profiles
is being built at the same time. Everything of the device is real.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import resource

from coap_auth.clock import SettableClock
from coap_auth.coap.server import _bound_port
from coap_auth.tokens import cose_key_from_public
from coap_auth.wire import AceParam, AceProfile, CnfMethod, ContentFormat, GrantType, TokenType
from device_client import (
    DeviceKey,
    SecretCredentials,
    ServiceUnreachable,
    StateFile,
    TokenClient,
    create_server_context,
)
from tests.conftest import SEEN_SECRETS, remember_secrets
from tests.device_client.conftest import FAST_REFRESH

Answer = Callable[[dict[Any, Any]], dict[Any, Any]]


class TokenEndpoint(resource.Resource):
    """/token of the AS double: records each request's parameters, answers 2.01 with
    `answer(params)` as application/ace+cbor."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer
        self.requests: list[dict[Any, Any]] = []

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        params = cbor2.loads(request.payload)
        self.requests.append(params)
        body = self.answer(params)
        remember_secrets(body)  # tokens join the session's log scan
        return aiocoap.Message(
            code=aiocoap.CREATED, payload=cbor2.dumps(body), content_format=ContentFormat.ACE_CBOR
        )


@asynccontextmanager
async def fake_as(answer: Answer) -> AsyncIterator[tuple[str, TokenEndpoint]]:
    """The AS double on 127.0.0.1, a free port: its base URI and its /token."""
    site = resource.Site()
    endpoint = TokenEndpoint(answer)
    site.add_resource(["token"], endpoint)
    context = await create_server_context(site, ("127.0.0.1", 0))
    try:
        yield f"coap://127.0.0.1:{_bound_port(context)}", endpoint
    finally:
        await context.shutdown()


def oscore_material() -> dict[int, bytes]:
    """OSCORE_Input_Material as the AS mints it for coap_oscore: id, ms, salt."""
    material = {0: secrets.token_bytes(8), 2: secrets.token_bytes(16), 5: secrets.token_bytes(8)}
    SEEN_SECRETS.add(material[2])  # the master secret joins the session's log scan
    return material


def oscore_answer(material: dict[int, bytes] | None = None, **extra: Any) -> Answer:
    def answer(params: dict[Any, Any]) -> dict[Any, Any]:
        return {
            AceParam.ACCESS_TOKEN: secrets.token_bytes(90),
            AceParam.EXPIRES_IN: 600,
            AceParam.TOKEN_TYPE: TokenType.POP,
            AceParam.ACE_PROFILE: AceProfile.COAP_OSCORE,
            AceParam.CNF: {CnfMethod.OSC: material or oscore_material()},
            AceParam.REFRESH_TOKEN: secrets.token_bytes(32),
            **extra,
        }

    return answer


@pytest.fixture
async def device() -> AsyncIterator[aiocoap.Context]:
    context = await aiocoap.Context.create_client_context()
    yield context
    await context.shutdown()


def _client(
    context: aiocoap.Context, base: str, clock: SettableClock, **options: Any
) -> TokenClient:
    return TokenClient(
        context,
        base,
        options.pop("credentials", SecretCredentials("sensor-1", "s" * 32)),
        audience="thermostat",
        clock=clock,
        policy=FAST_REFRESH,
        **options,
    )


async def test_coap_oscore_answer_keeps_profile_and_material_out_of_sight(
    device: aiocoap.Context, clock: SettableClock, tmp_path: Path
) -> None:
    material = oscore_material()
    state = StateFile(tmp_path / "device.state")
    async with fake_as(oscore_answer(material)) as (base, endpoint):
        client = _client(device, base, clock, state_file=state)
        token = await client.token()
        assert token.profile == AceProfile.COAP_OSCORE
        assert token.cnf_osc == material and token.cnf_key is None and token.rs_cnf is None
        assert token.token_type == TokenType.POP
        for shown in (repr(token), repr(client), repr(state.load())):
            assert material[2].hex() not in shown and str(material[2]) not in shown

        # Persisted in the 0600 state file, and resumed after a reboot without a request.
        assert stat.S_IMODE(os.stat(state.path).st_mode) == 0o600
        loaded = state.load()
        assert loaded is not None and loaded.access_token == token
        rebooted = TokenClient.from_state_file(device, state, clock=clock, policy=FAST_REFRESH)
        assert await rebooted.token() == token
        assert len(endpoint.requests) == 1


async def test_edhoc_oscore_answer_keeps_the_bound_key_and_the_rs_key(
    device: aiocoap.Context, clock: SettableClock, tmp_path: Path
) -> None:
    key = DeviceKey.generate("meter-7")
    rs_key = cose_key_from_public(DeviceKey.generate("thermostat").private_key.public_key())
    cnf_key = cose_key_from_public(key.private_key.public_key())

    def answer(params: dict[Any, Any]) -> dict[Any, Any]:
        return {
            AceParam.ACCESS_TOKEN: secrets.token_bytes(120),
            AceParam.EXPIRES_IN: 600,
            AceParam.TOKEN_TYPE: TokenType.POP,
            AceParam.ACE_PROFILE: AceProfile.COAP_EDHOC_OSCORE,
            AceParam.CNF: {CnfMethod.COSE_KEY: params[AceParam.REQ_CNF][CnfMethod.COSE_KEY]},
            AceParam.RS_CNF: {CnfMethod.COSE_KEY: rs_key},
        }

    state = StateFile(tmp_path / "device.state")
    async with fake_as(answer) as (base, endpoint):
        client = _client(
            device,
            base,
            clock,
            credentials=key,
            pop_key=key.private_key.public_key(),
            state_file=state,
        )
        token = await client.token()
        assert endpoint.requests[0][AceParam.REQ_CNF] == {CnfMethod.COSE_KEY: cnf_key}
    assert token.profile == AceProfile.COAP_EDHOC_OSCORE
    assert token.cnf_key == cnf_key and token.rs_cnf == rs_key and token.cnf_osc is None
    loaded = state.load()
    assert loaded is not None and loaded.access_token == token


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({AceParam.ACE_PROFILE: "coap_oscore"}, "ace_profile"),
        ({AceParam.ACE_PROFILE: True}, "ace_profile"),
        ({AceParam.CNF: {CnfMethod.OSC: {0: b"id"}}}, "id and ms"),
        ({AceParam.CNF: {CnfMethod.OSC: {0: b"id", 2: b"short"}}}, "16 bytes"),
        ({AceParam.CNF: {CnfMethod.OSC: {0: b"id", 2: bytes(16), 99: 1}}}, "unknown"),
        ({AceParam.CNF: {CnfMethod.OSC: {0: b"id", 2: bytes(16), 5: "salt"}}}, "wrong type"),
        ({AceParam.CNF: {CnfMethod.OSC: [1, 2]}}, "must be a map"),
        ({AceParam.CNF: {CnfMethod.KID: b"k"}}, "unsupported method"),
        ({AceParam.CNF: {1: {}, 4: {}}}, "one-entry"),
        ({AceParam.CNF: None}, "no OSCORE input material"),
        ({AceParam.RS_CNF: {CnfMethod.COSE_KEY: b"key"}}, "rs_cnf"),
        ({AceParam.RS_CNF: [1]}, "rs_cnf"),
        ({AceParam.RS_CNF: 5}, "rs_cnf"),
    ],
)
async def test_ill_formed_profile_fields_are_not_taken(
    device: aiocoap.Context, clock: SettableClock, change: dict[Any, Any], why: str
) -> None:
    answer = oscore_answer()

    def broken(params: dict[Any, Any]) -> dict[Any, Any]:
        body = {**answer(params), **change}
        return {k: v for k, v in body.items() if v is not None}

    async with fake_as(broken) as (base, _):
        client = _client(device, base, clock)
        with pytest.raises(ServiceUnreachable, match=why) as failed:
            await client.token()
    assert client.cached is None and failed.value.retry_at > clock.now()


async def test_state_files_written_before_the_profiles_still_load(
    device: aiocoap.Context, clock: SettableClock, tmp_path: Path
) -> None:
    state = StateFile(tmp_path / "device.state")
    async with fake_as(oscore_answer()) as (base, _):
        await _client(device, base, clock, state_file=state).token()
    document = json.loads(state.path.read_text())
    for key in ("profile", "cnf_osc", "cnf_key", "rs_cnf"):
        del document["access_token"][key]
    state.path.write_text(json.dumps(document))
    loaded = state.load()
    assert loaded is not None and loaded.access_token is not None
    token = loaded.access_token
    assert (token.profile, token.cnf_osc, token.cnf_key, token.rs_cnf) == (None,) * 4

    # Material that does not check out is a broken file, not a token without material.
    document["access_token"]["cnf_osc"] = "oQBCaWQ="  # {0: h'6964'}: no ms
    state.path.write_text(json.dumps(document))
    with pytest.raises(Exception, match="not a valid device state"):
        state.load()


async def test_refresh_now_gets_a_new_token_before_its_time(
    device: aiocoap.Context, clock: SettableClock
) -> None:
    async with fake_as(oscore_answer()) as (base, endpoint):
        events: list[str] = []
        client = _client(device, base, clock, on_token=lambda kind, _: events.append(kind))
        first = await client.token()
        assert clock.now() < first.refresh_at and await client.token() is first
        second = await client.refresh_now()
        assert second.value != first.value and second.cnf_osc != first.cnf_osc
        assert await client.token() is second
        grants = [r[AceParam.GRANT_TYPE] for r in endpoint.requests]
        assert grants == [GrantType.CLIENT_CREDENTIALS, GrantType.REFRESH_TOKEN]
        assert events == ["grant", "refresh"]


async def test_refresh_now_without_an_answer_raises_and_keeps_the_token(
    device: aiocoap.Context, clock: SettableClock
) -> None:
    async with fake_as(oscore_answer()) as (base, _):
        client = _client(device, base, clock)
        first = await client.token()
    # The AS double is gone: nothing answers there any more.
    with pytest.raises(ServiceUnreachable):
        await client.refresh_now()
    assert client.cached is first and await client.token() is first
