"""The device side over the protected channel (EDHOC, then OSCORE) against a real server with
the default `require_oscore = true`: tokens, refresh and revocation with no client
authentication in the requests; recovery after the AS restarts or evicts the context; a
resource server's TRL watcher that sees the revocations of its audience's tokens only."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.clock import SettableClock
from coap_auth.config import Settings
from coap_auth.secure.credentials import EdhocCredential, make_credential
from coap_auth.store import Audience
from coap_auth.tokens import cose_key_from_public, token_hash, verify_cwt
from coap_auth.wire import AceParam
from device_client import (
    AccessToken,
    ChannelRefused,
    ChannelUnavailable,
    DeviceKey,
    DeviceState,
    SecretCredentials,
    SecureChannel,
    StateFile,
    TokenClient,
    TokenRequestRefused,
    TrlWatcher,
    create_client_context,
    load_as_credential,
)
from tests.conftest import SEEN_SECRETS, Coap
from tests.device_client.conftest import FAST_REFRESH, FAST_WATCH, ISSUER, Restarts, eventually


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The default: /token, /revoke and /revoke/trl answer only over OSCORE.
    return dataclasses.replace(settings, require_oscore=True)


@dataclass
class Protected:
    coap: Coap
    restarts: Restarts
    as_credential: EdhocCredential
    # The resource server `thermostat`: its P-256 key is its audience's introspection key,
    # and so its EDHOC credential.
    thermostat: DeviceKey
    contexts: list[aiocoap.Context]

    @property
    def base(self) -> str:
        return self.coap.base

    @property
    def server(self):  # type: ignore[no-untyped-def]
        return self.restarts.server

    async def context(self) -> aiocoap.Context:
        """A device's own CoAP stack (its own UDP port)."""
        context = await create_client_context()
        self.contexts.append(context)
        return context

    async def device(
        self, client_id: str, audiences: tuple[str, ...] = ("thermostat",)
    ) -> DeviceKey:
        key = DeviceKey.generate(client_id)
        await self.coap.add_key_client(
            client_id, audiences, "temp:read", cose_key_from_public(key.private_key.public_key())
        )
        return key

    async def client(self, key: DeviceKey, clock: SettableClock, **options: object) -> TokenClient:
        return TokenClient(
            await self.context(),
            self.base,
            key,
            issuer=ISSUER,
            clock=clock,
            policy=FAST_REFRESH,
            on_token=_remember,
            **{"audience": "thermostat", "as_credential": self.as_credential, **options},  # type: ignore[arg-type]
        )


def _remember(kind: str, token: AccessToken) -> None:
    """Tokens fetched over OSCORE join the session's scan of every log line (tests/conftest)."""
    SEEN_SECRETS.add(token.value)


@pytest.fixture
async def protected(
    coap: Coap, settings: Settings, clock: SettableClock
) -> AsyncIterator[Protected]:
    thermostat = DeviceKey.generate("thermostat")
    for audience_id, token_format, lifetime in (
        ("thermostat", "cwt", 600),
        ("dashboard", "jwt", 900),
    ):
        key = thermostat if audience_id == "thermostat" else DeviceKey.generate(audience_id)
        await coap.service.store.add_audience(
            Audience(
                audience_id,
                token_format,  # type: ignore[arg-type]
                lifetime,
                clock.now(),
                introspect_public_key=cose_key_from_public(key.private_key.public_key()),
            ),
            "operator",
        )
    world = Protected(
        coap,
        Restarts(coap.server, settings, clock),
        coap.service.edhoc_identity.credential,
        thermostat,
        [],
    )
    try:
        yield world
    finally:
        for context in world.contexts:
            await context.shutdown()
        await world.restarts.close()


def _record_requests(context: aiocoap.Context) -> list[aiocoap.Message]:
    """Every request the application hands to `context` (before OSCORE protects it)."""
    sent: list[aiocoap.Message] = []
    original = context.request

    def request(message: aiocoap.Message, **kwargs: object) -> aiocoap.protocol.Request:
        # Block-wise handling calls request() again for each block; OSCORE again for the
        # protected message: keep what the application sent.
        if kwargs.get("handle_blockwise", True) and message.opt.oscore is None:
            sent.append(message)
        return original(message, **kwargs)  # type: ignore[arg-type]

    context.request = request  # type: ignore[method-assign]
    return sent


async def _families(coap: Coap, client_id: str) -> int:
    return len(await coap.service.store.list_families(client_id, coap.service.clock.now()))


async def test_grant_refresh_and_revoke_over_oscore_without_client_authentication(
    protected: Protected, clock: SettableClock, tmp_path: Path
) -> None:
    meter = await protected.device("meter-7")
    state = StateFile(tmp_path / "meter-7.state")
    state.save(
        DeviceState(
            protected.base,
            meter,
            issuer=ISSUER,
            audience="thermostat",
            as_credential=protected.as_credential,
        )
    )
    context = await protected.context()
    sent = _record_requests(context)
    client = TokenClient.from_state_file(
        context, state, clock=clock, policy=FAST_REFRESH, on_token=_remember
    )
    assert client.channel is not None and "over OSCORE" in repr(client)

    first = await client.token()
    assert verify_cwt(first.value, protected.coap.service.key_ring.lookup).sub == "meter-7"
    clock.advance(first.refresh_at - clock.now())
    second = await client.token()
    assert second.value != first.value
    assert await _families(protected.coap, "meter-7") == 1
    await client.revoke()
    assert await protected.coap.service.store.is_revoked(token_hash(second.value))
    assert client.cached is None and StateFile(state.path).load().refresh_token is None  # type: ignore[union-attr]
    assert client.channel.handshakes == 1  # one EDHOC run served all three

    bodies = [cbor2.loads(m.payload) for m in sent if m.opt.uri_path in (("token",), ("revoke",))]
    assert len(bodies) == 3
    for body in bodies:
        # The channel says who the device is: no client_id, secret or assertion.
        assert set(body) <= {
            AceParam.GRANT_TYPE,
            AceParam.AUDIENCE,
            AceParam.REFRESH_TOKEN,
            AceParam.TOKEN,
        }, body

    # The same device over plain CoAP is refused: the AS does require the channel.
    plain = await protected.client(meter, clock, as_credential=None)
    with pytest.raises(TokenRequestRefused) as refused:
        await plain.token()
    assert refused.value.coap_code == int(aiocoap.UNAUTHORIZED)


async def test_token_client_runs_edhoc_again_after_a_restart_and_an_eviction(
    protected: Protected, clock: SettableClock
) -> None:
    client = await protected.client(await protected.device("meter-7"), clock)
    first = await client.token()
    assert client.channel is not None and client.channel.handshakes == 1

    await protected.restarts.restart()  # the AS's OSCORE contexts are gone with it
    clock.advance(first.refresh_at - clock.now())
    second = await client.token()  # 4.01 unprotected, EDHOC, the refresh again
    assert second.value != first.value
    assert client.channel.handshakes == 2
    assert await _families(protected.coap, "meter-7") == 1  # the same family went on

    # An idle context is evicted (oscore_idle_timeout, 3600 s): the same recovery.
    clock.advance(protected.coap.service.settings.oscore_idle_timeout + 1)
    third = await client.token()
    assert third.value != second.value
    assert client.channel.handshakes == 3
    assert await _families(protected.coap, "meter-7") == 1


async def test_trl_watcher_over_oscore_sees_revocations_of_its_audience_only(
    protected: Protected, clock: SettableClock
) -> None:
    watcher = TrlWatcher(
        await protected.context(),
        protected.base,
        clock=clock,
        policy=FAST_WATCH,
        identity=protected.thermostat,
        as_credential=protected.as_credential,
    )
    await watcher.start()
    try:
        assert watcher.channel is not None and watcher.channel.handshakes == 1
        ours = await protected.client(await protected.device("meter-7"), clock)
        theirs = await protected.client(
            await protected.device("dash-1", ("dashboard",)), clock, audience="dashboard"
        )
        our_token, their_token = await ours.token(), await theirs.token()

        await theirs.revoke()  # first: once ours arrives, theirs would have too
        await ours.revoke()
        await protected.server.check_changes()  # what the change-feed poll does
        await eventually(lambda: watcher.is_revoked(our_token.token_hash), "our revocation")
        assert not watcher.is_revoked(their_token.token_hash)
        assert await protected.coap.service.store.is_revoked(their_token.token_hash)
        # By an Observe notification over OSCORE: the clock stood still, so nothing polled.
        assert watcher.registrations == 1 and watcher.full_queries == 1
    finally:
        await watcher.stop()


async def test_trl_watcher_runs_edhoc_again_and_re_registers_after_a_restart(
    protected: Protected, clock: SettableClock
) -> None:
    watcher = TrlWatcher(
        await protected.context(),
        protected.base,
        clock=clock,
        policy=FAST_WATCH,
        identity=protected.thermostat,
        as_credential=protected.as_credential,
    )
    await watcher.start()
    try:
        server = await protected.restarts.restart()  # the observation and context are gone
        registrations = watcher.registrations

        # The poll behind Observe meets the restarted AS: 4.01 unprotected, EDHOC again, and
        # a new registration (the list did not change, so only the new context says so).
        clock.advance(FAST_WATCH.check_interval)
        await eventually(lambda: watcher.registrations > registrations, "re-registration")
        assert watcher.channel is not None and watcher.channel.handshakes == 2

        # The new observation, under the new context, carries notifications.
        client = await protected.client(await protected.device("meter-7"), clock)
        token = await client.token()
        await client.revoke()
        await server.check_changes()
        await eventually(lambda: watcher.is_revoked(token.token_hash), "revocation notified")
        assert watcher.channel.handshakes == 2
    finally:
        await watcher.stop()


async def test_concurrent_requests_share_one_handshake(
    protected: Protected, clock: SettableClock
) -> None:
    channel = SecureChannel(
        await protected.context(), protected.base, protected.thermostat, protected.as_credential
    )

    def trl() -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.GET, uri=f"{protected.base}/revoke/trl")

    answers = await asyncio.gather(*(channel.request(trl) for _ in range(4)))
    assert {response.code for _, response in answers} == {aiocoap.CONTENT}
    assert channel.handshakes == 1


async def test_edhoc_refusals_name_the_host_and_back_off(
    protected: Protected, clock: SettableClock
) -> None:
    host = protected.base.split("://")[1]
    stranger = await protected.client(DeviceKey.generate("stranger"), clock)  # not registered
    with pytest.raises(ChannelRefused, match=host) as refused:
        await stranger.token()
    assert refused.value.host == host and stranger.retry_at is not None

    # A device provisioned with another AS's credential refuses this one.
    impostor = make_credential(
        "coap://as.test", ec.generate_private_key(ec.SECP256R1()).public_key()
    )
    meter = await protected.device("meter-7")
    wrong = await protected.client(meter, clock, as_credential=impostor)
    with pytest.raises(ChannelRefused, match="does not verify"):
        await wrong.token()


async def test_a_cancelled_handshake_propagates_and_frees_the_channel(
    protected: Protected,
) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # binds, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        channel = SecureChannel(
            await protected.context(),
            f"coap://127.0.0.1:{silent.getsockname()[1]}",
            protected.thermostat,
            protected.as_credential,
            timeout=30,
        )
        task = asyncio.create_task(channel.establish())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not channel.established
        # The lock was released: the next attempt runs (and fails on its own timeout).
        channel.timeout = 0.1
        with pytest.raises(TimeoutError):
            await channel.establish()
    finally:
        silent.close()


# -- provisioning and setup errors ----------------------------------------------------------


def _cli_json(credential: EdhocCredential) -> dict[str, object]:
    """What `coap-auth edhoc-credential --json` prints (coap_auth/cli)."""
    return credential.document()


def test_the_as_credential_loads_from_the_cli_json_or_the_ccs_hex() -> None:
    credential = make_credential("coap-auth", ec.generate_private_key(ec.SECP256R1()).public_key())
    document = _cli_json(credential)
    assert load_as_credential(json.dumps(document, indent=2)) == credential
    assert load_as_credential(json.dumps(document).encode()) == credential
    assert load_as_credential(f"  {credential.ccs.hex()}\n") == credential

    other = make_credential("coap-auth", ec.generate_private_key(ec.SECP256R1()).public_key())
    for field, value in (
        ("public_key_pem", _cli_json(other)["public_key_pem"]),
        ("kid", "00"),
        ("cipher_suite", 0),
    ):
        with pytest.raises(ChannelUnavailable, match=field):
            load_as_credential(json.dumps({**document, field: value}))
    for garbage in ("", "{}", "not hex", "a1", b"\xff", '{"ccs": "zz"}'):
        with pytest.raises(ChannelUnavailable):
            load_as_credential(garbage)


async def test_what_cannot_run_the_channel_says_so(protected: Protected) -> None:
    context = await protected.context()
    as_credential = protected.as_credential
    with pytest.raises(ChannelUnavailable, match="P-256"):
        DeviceKey.generate("meter-9", curve="Ed25519").edhoc_identity()
    with pytest.raises(ChannelUnavailable, match="P-256"):
        TokenClient(
            context,
            protected.base,
            DeviceKey.generate("meter-9", curve="Ed25519"),
            as_credential=as_credential,
        )
    with pytest.raises(ChannelUnavailable, match="device key"):
        TokenClient(
            context, protected.base, SecretCredentials("s", "x" * 32), as_credential=as_credential
        )
    with pytest.raises(ValueError, match="both"):
        TrlWatcher(context, protected.base, identity=protected.thermostat)
    bare = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        with pytest.raises(ChannelUnavailable, match="OSCORE transport"):
            SecureChannel(bare, protected.base, protected.thermostat, as_credential)
    finally:
        await bare.shutdown()


def test_state_files_keep_the_as_credential_and_older_ones_still_load(tmp_path: Path) -> None:
    key = DeviceKey.generate("meter-7")
    credential = make_credential("coap-auth", ec.generate_private_key(ec.SECP256R1()).public_key())
    state = StateFile(tmp_path / "new.state")
    state.save(DeviceState("coap://as", key, as_credential=credential))
    assert state.load().as_credential == credential  # type: ignore[union-attr]

    # A file written before the protected channel: no `as_credential` key at all.
    document = json.loads(state.path.read_text())
    del document["as_credential"]
    old = tmp_path / "old.state"
    old.write_text(json.dumps(document))
    old.chmod(0o600)
    loaded = StateFile(old).load()
    assert loaded is not None and loaded.as_credential is None
    assert loaded.credentials.client_id == "meter-7"
