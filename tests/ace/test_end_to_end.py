"""Issue 15 end to end, for each ACE OSCORE profile: the real AS (coap_auth's Server, as
`coap-auth serve` runs it, OSCORE required on /token, its data directory set up by the CLI as
an operator does), the example thermostat (examples/thermostat_rs.py: its Thermostat, with its
watchers of /keys and /revoke/trl, its verifier and ResourceServer, in this process so its
clock can be set) and a device (TokenClient + ResourceClient), over real UDP on 127.0.0.1.

For edhoc_oscore (audience `door`, the default profile, the thermostat's key registered) and
coap_oscore (audience `lock`, its AES keys exported to the thermostat): the device gets a
token, sets up the context, reads and writes within its scope and gets 4.03 outside it. The
same token in the hands of a second device (another key, another endpoint) gets nothing, nor
does an unprotected datagram forged with the device's own address and port: access follows
the OSCORE context, whose keys only the token's holder has. Revocation (TRL), expiry (the
clock moved, never slept through) and withdrawal of the token's key (and, for coap_oscore,
the thermostat re-provisioned with the AES family) each end the context: a request under it
gets an unprotected 4.01, and the device recovers with a new token.

Had the thermostat fallen back to address-based tokens, the forged datagram (from the very
endpoint that POSTed the token to /authz-info) and the thief's uploads would be accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import resource
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from coap_auth.clock import SettableClock
from coap_auth.coap.server import _bound_port
from coap_auth.config import Settings
from coap_auth.secure.ace_oscore import derive_context, new_nonce
from coap_auth.secure.credentials import PeerCredential, make_credential
from coap_auth.secure.edhoc import EdhocRefused, establish
from coap_auth.service import AuthService
from coap_auth.wire import EAD_ACCESS_TOKEN, AceProfile
from device_client import (
    AccessToken,
    DeviceKey,
    KeySet,
    ResourceClient,
    ResourceRefused,
    ResourceServer,
    TokenClient,
    create_client_context,
    load_as_credential,
    require_scope,
)
from device_client.resource_client import MAX_EAD_TOKEN_BYTES
from tests.ace.e2e import (
    EXAMPLES,
    forged_request,
    local_port,
    protected,
    raw_socket,
    thermostat_module,
)
from tests.conftest import SEEN_SECRETS, Coap
from tests.device_client.conftest import FAST_REFRESH, FAST_WATCH, confirmed, eventually
from tests.processes import STARTUP_TIMEOUT, clean_env, cli_ok, free_udp_port, serve_process

ISSUER = "as"
DEVICE = "m7"
SCOPE = "temp:read temp:write"
LIFETIME = 600
CF_CWT, CF_ACE = 61, 19
PROFILES = {"edhoc_oscore": "door", "coap_oscore": "lock"}


@dataclasses.dataclass(frozen=True)
class Template:
    data_dir: Path
    rs_keys: dict[str, DeviceKey]  # audience -> the thermostat's key (registered with it)
    device: DeviceKey
    lock_export: str  # `coap-auth keys export lock`


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """By the CLI: audiences door (edhoc_oscore, the default) and lock (coap_oscore), each with
    its thermostat's key; device m7 registered by its key for both; lock's AES keys exported."""
    root = tmp_path_factory.mktemp("e2e")
    data_dir = root / "data"
    cli_ok("init", data_dir=data_dir)
    rs_keys = {}
    for audience, profile in (("door", ()), ("lock", ("--profile", "coap_oscore"))):
        rs_keys[audience] = DeviceKey.generate(audience)
        pem = root / f"{audience}.pem"
        pem.write_bytes(rs_keys[audience].public_pem())
        cli_ok(
            "audiences",
            "add",
            audience,
            *profile,
            "--lifetime",
            str(LIFETIME),
            "--introspect-public-key",
            pem,
            data_dir=data_dir,
        )
    device = DeviceKey.generate(DEVICE)
    device_pem = root / "device.pem"
    device_pem.write_bytes(device.public_pem())
    cli_ok(
        "clients",
        "add",
        DEVICE,
        "--audience",
        "door",
        "--audience",
        "lock",
        "--scope",
        SCOPE,
        "--public-key",
        device_pem,
        data_dir=data_dir,
    )
    lock_export = cli_ok("keys", "export", "lock", data_dir=data_dir).strip()
    SEEN_SECRETS.update(KeySet.from_export(lock_export).encryption.values())
    return Template(data_dir, rs_keys, device, lock_export)


@pytest.fixture
def settings(settings: Settings, template: Template) -> Settings:
    """A private copy of the template; OSCORE required on /token (the default)."""
    shutil.copytree(template.data_dir, settings.data_dir, dirs_exist_ok=True)
    return dataclasses.replace(
        settings, require_oscore=True, issuer=ISSUER, change_poll_interval=0.05
    )


class Setpoint(resource.Resource):
    """Beyond the device's scope: needs temp:admin."""

    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server

    @require_scope("temp:admin")
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=b"21")


@dataclasses.dataclass
class World:
    profile: str
    audience: str
    clock: SettableClock
    service: AuthService
    as_base: str
    settings: Settings
    thermostat: Any  # examples/thermostat_rs.py Thermostat
    rs_base: str
    rs_port: int
    device: aiocoap.Context  # the device's CoAP stack (one UDP socket)
    tokens: TokenClient
    thief: aiocoap.Context  # a second device: its own socket
    reports: list[str]

    @property
    def rs(self) -> ResourceServer:
        return self.thermostat.resource_server  # type: ignore[no-any-return]

    @property
    def reading(self) -> bytes:
        return self.thermostat.temperature.reading  # type: ignore[no-any-return]

    def client(self) -> ResourceClient:
        return ResourceClient(self.device, self.rs_base, self.tokens, timeout=2.0)

    def rs_contexts(self) -> list[Any]:
        return list(self.rs.contexts.contexts())


def _held_context(client: ResourceClient) -> Any:
    """The device's side of the OSCORE context ResourceClient holds (to send under it after
    the RS dropped it, as a device that did not notice would)."""
    context = client._channel._oscore
    assert context is not None
    return context


@pytest.fixture(params=sorted(PROFILES))
async def world(
    request: pytest.FixtureRequest,
    coap: Coap,
    clock: SettableClock,
    settings: Settings,
    template: Template,
) -> AsyncIterator[World]:
    profile: str = request.param
    audience = PROFILES[profile]
    as_credential = coap.service.edhoc_identity.credential
    module = thermostat_module()
    rs_side = await create_client_context()
    reports: list[str] = []
    thermostat = module.Thermostat(
        rs_side,
        coap.base,
        audience=audience,
        issuer=ISSUER,
        identity=template.rs_keys[audience],
        as_credential=as_credential,
        token_keys=KeySet.from_export(template.lock_export) if profile == "coap_oscore" else None,
        leeway=0,
        clock=clock,
        policy=FAST_WATCH,
        report=reports.append,
    )
    thermostat.site.add_resource(["setpoint"], Setpoint(thermostat.resource_server))
    server = await thermostat.start(("127.0.0.1", 0))
    port = _bound_port(server)
    assert port is not None
    device, thief = await create_client_context(), await create_client_context()

    def seen(_: str, token: AccessToken) -> None:
        SEEN_SECRETS.add(token.value)
        if token.cnf_osc is not None:
            SEEN_SECRETS.add(token.cnf_osc[2])

    tokens = TokenClient(
        device,
        coap.base,
        template.device,
        audience=audience,
        issuer=ISSUER,
        clock=clock,
        policy=FAST_REFRESH,
        as_credential=as_credential,
        on_token=seen,
    )
    world = World(
        profile,
        audience,
        clock,
        coap.service,
        coap.base,
        settings,
        thermostat,
        f"coap://127.0.0.1:{port}",
        port,
        device,
        tokens,
        thief,
        reports,
    )
    try:
        await confirmed(clock, thermostat.keys, thermostat.trl)
        yield world
    finally:
        await device.shutdown()
        await thief.shutdown()
        await thermostat.stop()
        await rs_side.shutdown()


async def _use(world: World, client: ResourceClient, reading: bytes) -> AccessToken:
    """PUT and GET within scope; the token the context was set up with."""
    answer = await client.request(aiocoap.PUT, "temperature", reading)
    assert answer.code == aiocoap.CHANGED, answer
    answer = await client.request(aiocoap.GET, "temperature")
    assert answer.code == aiocoap.CONTENT and answer.payload == reading
    assert world.reading == reading
    token = client.token
    assert token is not None
    return token


async def test_scope_and_a_stolen_token(world: World) -> None:
    async with world.client() as client:
        token = await _use(world, client, b"21.0")
        expected = {
            "edhoc_oscore": AceProfile.COAP_EDHOC_OSCORE,
            "coap_oscore": AceProfile.COAP_OSCORE,
        }
        assert token.profile == expected[world.profile]
        outside = await client.request(aiocoap.GET, "setpoint")
        assert outside.code == aiocoap.FORBIDDEN
        [context] = world.rs_contexts()
        assert context.access_token.token_hash == token.token_hash
        assert context.access_token.claims.sub == DEVICE

        # A second device with the token (it crossed the network to the thermostat).
        if world.profile == "edhoc_oscore":
            await _thief_edhoc(world, token)
        else:
            await _thief_oscore(world, token)
        plain = aiocoap.Message(code=aiocoap.PUT, uri=f"{world.rs_base}/temperature", payload=b"9")
        answer = await world.thief.request(plain).response
        assert answer.code == aiocoap.UNAUTHORIZED
        assert cbor2.loads(answer.payload) == {
            1: world.as_base,
            5: world.audience,
            9: "temp:write",
        }

        # A datagram forged with the device's own address and port: the endpoint that sent the
        # token (to /authz-info, or in EDHOC). An RS binding tokens to addresses would take it.
        raw = raw_socket()
        if raw is None:
            pytest.skip("no raw socket (root or CAP_NET_RAW) to forge the device's address")
        with raw:
            forged = aiocoap.Message(code=aiocoap.PUT, payload=b"99")
            forged.opt.uri_path = ("temperature",)
            answer = await forged_request(raw, world.rs_port, local_port(world.device), forged)
        assert answer.code == aiocoap.UNAUTHORIZED
        assert world.reading == b"21.0"

        # The device is unaffected: same context, same token.
        assert (await _use(world, client, b"22.5")).value == token.value
        assert client.handshakes == 1
        assert [c.access_token.token_hash for c in world.rs_contexts()][-1] == token.token_hash


@pytest.mark.parametrize("world", ["edhoc_oscore"], indirect=True)
async def test_the_edhoc_token_travels_in_message_3(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The AS's CWT carries the device's key with its point compressed (RFC 9053 §7.1.1), so
    it fits EAD_3 of message_3 (draft-ietf-ace-edhoc-oscore-profile-11 §4.1): the device sends
    it there, never to /authz-info, and the thermostat binds the context to it without ever
    holding an uploaded token."""
    caplog.set_level(logging.INFO)
    async with world.client() as client:
        token = await _use(world, client, b"20.5")
        assert client.handshakes == 1
    public_key = world.tokens.credentials.private_key.public_key()  # type: ignore[union-attr]
    x962 = public_key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    assert token.cnf_key == {1: 2, -1: 1, -2: x962[1:], -3: x962[0] == 0x03}
    assert len(token.value) <= MAX_EAD_TOKEN_BYTES
    assert world.rs.held_pop_tokens(DEVICE) == []
    [context] = world.rs_contexts()
    assert context.access_token.token_hash == token.token_hash
    rs_lines = [r.getMessage() for r in caplog.records if r.name == "device_client.rs"]
    assert not [line for line in rs_lines if "authz-info" in line], rs_lines
    assert any(line.startswith("EDHOC: OSCORE context for m7") for line in rs_lines), rs_lines


async def _thief_edhoc(world: World, token: AccessToken) -> None:
    """EDHOC with the thermostat as another key (own name, and the device's), the token in
    message_3 or uploaded first: EDHOC error 1 each time, no context made."""
    rs_key = dict(token.rs_cnf or {})
    assert rs_key, "the AS sent rs_cnf"
    from coap_auth.tokens import public_key_from_cose

    rs_credential = make_credential(world.audience, public_key_from_cose(rs_key))  # type: ignore[arg-type]
    own = DeviceKey.generate("thief")
    posing = DeviceKey(DEVICE, DeviceKey.generate("x").private_key)
    # The AS's tokens (ES256, cnf a compressed P-256 point, the scope) fit EAD_3: the thief
    # tries it in message_3, then uploads it first as a device with a longer token would.
    if len(token.value) <= MAX_EAD_TOKEN_BYTES:
        for key in (own, posing):
            with pytest.raises(EdhocRefused, match="EDHOC error 1"):
                await establish(
                    world.thief,
                    world.rs_base,
                    key.edhoc_identity(),
                    rs_credential,
                    ead_3=[(EAD_ACCESS_TOKEN, True, token.value)],
                )
    upload = aiocoap.Message(
        code=aiocoap.POST,
        uri=f"{world.rs_base}/authz-info",
        payload=token.value,
        content_format=CF_CWT,
    )
    assert (await world.thief.request(upload).response).code == aiocoap.CREATED
    for key in (own, posing):
        with pytest.raises(EdhocRefused, match="EDHOC error 1"):
            await establish(world.thief, world.rs_base, key.edhoc_identity(), rs_credential)
    assert len(world.rs_contexts()) == 1


async def _thief_oscore(world: World, token: AccessToken) -> None:
    """RFC 9203 /authz-info with the token and nonces of its own: the RS cannot tell and
    answers 2.01, but the master secret travels only inside the token (encrypted for the RS)
    and in the AS's protected answer: whatever the thief derives, its requests do not
    decrypt."""
    nonce1, id1 = new_nonce(), b"\x07"
    body = cbor2.dumps({1: token.value, 40: nonce1, 43: id1})
    post = aiocoap.Message(
        code=aiocoap.POST, uri=f"{world.rs_base}/authz-info", payload=body, content_format=CF_ACE
    )
    answer = await world.thief.request(post).response
    assert answer.code == aiocoap.CREATED
    params = cbor2.loads(answer.payload)
    guessed = {0: secrets.token_bytes(8), 2: secrets.token_bytes(16), 5: secrets.token_bytes(8)}
    stolen = derive_context(
        guessed,
        nonce1,
        params[42],
        sender_id=params[44],
        recipient_id=id1,
        peer=PeerCredential(world.audience, None),
    )
    answer, was_protected = await protected(
        world.thief, stolen, f"{world.rs_base}/temperature", aiocoap.PUT, b"99"
    )
    assert not was_protected and answer.code in (aiocoap.BAD_REQUEST, aiocoap.UNAUTHORIZED)
    # The same /authz-info request again (nonce1 reused for this material): 4.01.
    again = aiocoap.Message(
        code=aiocoap.POST, uri=f"{world.rs_base}/authz-info", payload=body, content_format=CF_ACE
    )
    assert (await world.thief.request(again).response).code == aiocoap.UNAUTHORIZED


async def _ended(world: World, client: ResourceClient, context: Any, old: AccessToken) -> None:
    """The RS holds no context for `old`; a request under the device's old context gets an
    unprotected 4.01; the device recovers with a new token and a new context."""
    assert all(c.access_token.token_hash != old.token_hash for c in world.rs_contexts())
    answer, was_protected = await protected(
        world.device, context, f"{world.rs_base}/temperature", aiocoap.PUT, b"66"
    )
    assert not was_protected and answer.code == aiocoap.UNAUTHORIZED
    assert world.reading != b"66"
    # The device recovers by itself: the RS answers unprotected, ResourceClient sets up a new
    # context; /authz-info refuses the cached token (4.01), so it asks the AS for a new one.
    handshakes = client.handshakes
    new = await _use(world, client, b"23.0")
    assert new.value != old.value and client.handshakes > handshakes


async def test_revocation_ends_the_context(world: World) -> None:
    async with world.client() as client:
        old = await _use(world, client, b"21.0")
        context = _held_context(client)
        # What `coap-auth tokens revoke --hash HASH` does; the thermostat follows its TRL.
        assert await world.service.revoke_token_hash(old.token_hash, actor="operator")
        await eventually(lambda: world.thermostat.trl.is_revoked(old.token_hash), "TRL entry")
        await eventually(lambda: not world.rs_contexts(), "context dropped")
        assert any(
            r.startswith("revocation seen: dropped its security context") for r in world.reports
        )
        await _ended(world, client, context, old)


async def test_expiry_ends_the_context(world: World) -> None:
    async with world.client() as client:
        old = await _use(world, client, b"21.0")
        context = _held_context(client)
        world.clock.advance(old.expires_at - world.clock.now())
        world.clock.advance(1)
        # The thermostat's view is current at the new time (fail closed until it is).
        await confirmed(world.clock, world.thermostat.keys, world.thermostat.trl)
        assert len(world.rs_contexts()) == 1  # still there, its token no longer valid:
        answer, was_protected = await protected(
            world.device, context, f"{world.rs_base}/temperature", aiocoap.GET
        )
        assert not was_protected and answer.code == aiocoap.UNAUTHORIZED
        await _ended(world, client, context, old)


async def test_key_withdrawal_ends_the_context(world: World) -> None:
    async with world.client() as client:
        old = await _use(world, client, b"21.0")
        context = _held_context(client)
        [held] = world.rs_contexts()
        kid = held.access_token.kid
        # What `coap-auth keys revoke KID` does.
        assert await world.service.revoke_key(kid, actor="operator")
        if world.profile == "coap_oscore":
            # The AES key never was at /keys: the operator exports the family again and the
            # thermostat takes it (SIGHUP in the example).
            exported = cli_ok("keys", "export", "lock", data_dir=world.settings.data_dir)
            key_set = KeySet.from_export(exported)
            SEEN_SECRETS.update(key_set.encryption.values())
            assert kid not in key_set.encryption and key_set.encryption
            world.thermostat.reload_token_keys(key_set)
        else:
            await eventually(lambda: world.thermostat.keys.lookup(kid) is None, "key withdrawn")
        await eventually(lambda: not world.rs_contexts(), "context dropped")
        await _ended(world, client, context, old)
        [held] = world.rs_contexts()
        assert held.access_token.kid != kid


async def test_the_example_thermostat_as_processes(template: Template, tmp_path: Path) -> None:
    """The same, with no part in this process but the devices: `coap-auth serve` (OSCORE
    required, its default) and `examples/thermostat_rs.py --token-keys FILE` for the
    coap_oscore audience, as an operator runs them. Real time: no expiry here."""
    data_dir = tmp_path / "data"
    shutil.copytree(template.data_dir, data_dir)
    as_json = cli_ok("edhoc-credential", "--json", data_dir=data_dir)
    key_file, token_keys = tmp_path / "lock.key", tmp_path / "lock-token-keys.txt"
    for path, content in (
        (key_file, template.rs_keys["lock"].private_pem()),
        (token_keys, template.lock_export.encode()),
    ):
        path.write_bytes(content)
        path.chmod(0o600)
    (tmp_path / "as.json").write_text(as_json)
    log_file = tmp_path / "as.log"
    async with serve_process(data_dir, log_file, COAP_AUTH_REQUIRE_OSCORE="true") as server:
        port = free_udp_port()
        rs_base = f"coap://127.0.0.1:{port}"
        thermostat = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "thermostat_rs.py"),
            "--as",
            server.url,
            "--audience",
            "lock",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--key",
            str(key_file),
            "--as-credential",
            str(tmp_path / "as.json"),
            "--token-keys",
            str(token_keys),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(PYTHONPATH=str(EXAMPLES.parent)),
        )
        device = await create_client_context()
        thief = await create_client_context()
        try:
            output = await _lines_until(thermostat, r"keys: \d+ published keys")
            assert "[thermostat] profiles: edhoc_oscore, coap_oscore" in output
            tokens = TokenClient(
                device,
                server.url,
                template.device,
                audience="lock",
                as_credential=load_as_credential(as_json),
                policy=FAST_REFRESH,
                on_token=lambda _, token: SEEN_SECRETS.add(token.value),
            )
            async with ResourceClient(device, rs_base, tokens, timeout=2.0) as client:
                answer = await _first_answer(client, aiocoap.PUT, "temperature", b"21.0")
                assert answer.code == aiocoap.CHANGED
                answer = await client.request(aiocoap.GET, "temperature")
                assert answer.code == aiocoap.CONTENT and answer.payload == b"21.0"
                token = client.token
                assert token is not None and token.profile == AceProfile.COAP_OSCORE
                # The stolen token, from another endpoint: no context it can use.
                body = cbor2.dumps({1: token.value, 40: new_nonce(), 43: b"\x07"})
                post = aiocoap.Message(
                    code=aiocoap.POST,
                    uri=f"{rs_base}/authz-info",
                    payload=body,
                    content_format=CF_ACE,
                )
                assert (await thief.request(post).response).code == aiocoap.CREATED
                uri = f"{rs_base}/temperature"
                plain = aiocoap.Message(code=aiocoap.PUT, uri=uri, payload=b"9")
                assert (await thief.request(plain).response).code == aiocoap.UNAUTHORIZED
                raw = raw_socket()
                if raw is not None:
                    with raw:
                        forged = aiocoap.Message(code=aiocoap.PUT, payload=b"99")
                        forged.opt.uri_path = ("temperature",)
                        answer = await forged_request(raw, port, local_port(device), forged)
                    assert answer.code == aiocoap.UNAUTHORIZED
                answer = await client.request(aiocoap.GET, "temperature")
                assert answer.payload == b"21.0" and client.handshakes == 1
        finally:
            await device.shutdown()
            await thief.shutdown()
            thermostat.terminate()
            rest = await asyncio.wait_for(thermostat.communicate(), 10)
        log = rest[0].decode(errors="replace")
        assert "Traceback" not in log
        assert "reading 21.0 C from m7 (coap_oscore," in output + log
        assert "reading 9 " not in log and "reading 99 " not in log


async def _lines_until(process: asyncio.subprocess.Process, pattern: str) -> str:
    """The process's output up to a line matching `pattern` (real time: its start-up)."""
    assert process.stdout is not None
    seen = []
    regex = re.compile(pattern)
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT)
        if not line:
            raise AssertionError("thermostat exited:\n" + "".join(seen))
        seen.append(line.decode(errors="replace"))
        if regex.search(seen[-1]):
            return "".join(seen)


async def _first_answer(
    client: ResourceClient, code: aiocoap.Code, path: str, payload: bytes
) -> aiocoap.Message:
    """The first request: a thermostat just started answers 5.03 until its revocation list
    is confirmed by the AS (fail closed); ask again until it is (real time: UDP delivery)."""
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT
    while True:
        try:
            return await client.request(code, path, payload)
        except ResourceRefused as refused:
            if refused.coap_code != int(aiocoap.SERVICE_UNAVAILABLE):
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
