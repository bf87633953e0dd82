"""Issue 14: OSCORE contexts provisioned by the operator (`coap-auth clients oscore`) for
devices that cannot run EDHOC, with RFC 8613 Appendix B.1 across restarts: the AS never
reuses a nonce, and after a crash it recovers its replay window with Echo. Checked with our
own client and with libcoap's (built with OSCORE: skipped, with the reason, without it)."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.oscore import NotAProtectedMessage

from coap_auth.coap.server import Server
from coap_auth.secure.contexts import OscoreContext
from coap_auth.secure.credentials import PeerCredential
from coap_auth.secure.provisioned import provision, remove
from coap_auth.store import Client
from coap_auth.udp import create_client_context
from coap_auth.wire import AceParam, ContentFormat
from tests.processes import add_secret_client, cli_ok, serve_process
from tests.raw_coap import exchange
from tests.secure.conftest import Protected


def device_side(device: dict[str, object]) -> OscoreContext:
    """The device's context from what `clients oscore --json` printed."""
    return OscoreContext(
        bytes.fromhex(str(device["master_secret"])),
        bytes.fromhex(str(device["master_salt"])),
        sender_id=bytes.fromhex(str(device["sender_id"])),
        recipient_id=bytes.fromhex(str(device["recipient_id"])),
        peer=PeerCredential("coap-auth", None),
    )


def token_request(base: str) -> aiocoap.Message:
    return aiocoap.Message(
        code=aiocoap.POST,
        uri=f"{base}/token",
        payload=cbor2.dumps({AceParam.AUDIENCE: "thermostat"}),
        content_format=ContentFormat.ACE_CBOR,
    )


async def token(context: aiocoap.Context, base: str) -> aiocoap.Message:
    return await context.request(token_request(base)).response


async def provisioned_device(protected: Protected, client_id: str) -> OscoreContext:
    """A registered client with a provisioned context, loaded by the running server; the
    device's side of it."""
    service = protected.service
    registered_at = service.clock.now()
    await service.store.add_client(
        Client(
            client_id,
            ("thermostat",),
            ("temp:read",),
            registered_at,
            secret_digest=service.secret_digest("unused-secret-0123456789"),
        ),
        "operator",
    )
    device = device_side(provision(service.settings.data_dir, client_id, registered_at))
    protected.server.reload_provisioned()
    return device


async def restart(protected: Protected, *, crash: bool) -> None:
    """Stop the server (cleanly, or as a crash would: nothing saved) and start it again on
    the same port and data directory."""
    port = protected.server.port
    if crash:
        for context in protected.server.contexts.provisioned.values():
            context.lockfile.release()  # what the kernel does for a dead process
            context.lockfile = None  # and nothing is written back
        protected.server.contexts._provisioned.clear()
    await protected.server.stop()
    protected.server = Server(protected.service, "127.0.0.1", port)
    await protected.server.start()


@pytest.mark.parametrize("crash", [False, True], ids=["clean stop", "crash"])
async def test_a_provisioned_device_survives_restarts(protected: Protected, crash: bool) -> None:
    device = await provisioned_device(protected, "legacy-1")
    client = await create_client_context()
    try:
        client.client_credentials[f"{protected.base}/*"] = device
        for _ in range(3):
            assert (await token(client, protected.base)).code == aiocoap.CREATED
        # A request an eavesdropper keeps, answered once.
        captured, _ = device.protect(token_request(protected.base))
        assert (await exchange(protected.server.port, captured.copy())).code == aiocoap.CHANGED
        (served,) = protected.server.contexts.provisioned.values()
        used_before = served.sender_sequence_number
        await restart(protected, crash=crash)
        (served,) = protected.server.contexts.provisioned.values()
        # B.1.1: whatever happened, the AS starts past every sequence number it used.
        assert served.sender_sequence_number >= used_before
        # B.1.2: after a crash the window is unknown: the first request gets 4.01 + Echo,
        # which aiocoap's client answers on its own; after a clean stop it was saved.
        assert served.recipient_replay_window.is_initialized() is not crash
        sent_before = device.sender_sequence_number
        assert (await token(client, protected.base)).code == aiocoap.CREATED
        assert device.sender_sequence_number == sent_before + (2 if crash else 1)
        # The captured request is a replay, before the restart as after it.
        replayed = await exchange(protected.server.port, captured.copy())
        assert replayed.code == aiocoap.UNAUTHORIZED
    finally:
        await client.shutdown()


async def test_a_disabled_client_loses_its_provisioned_context(protected: Protected) -> None:
    service = protected.service
    device = await provisioned_device(protected, "legacy-2")
    client = await create_client_context()
    try:
        client.client_credentials[f"{protected.base}/*"] = device
        assert (await token(client, protected.base)).code == aiocoap.CREATED
        await service.store.disable_client("legacy-2", service.clock.now(), "operator")
        answer = await token(client, protected.base)
        assert answer.code == aiocoap.UNAUTHORIZED
        assert cbor2.loads(answer.payload)[AceParam.ERROR] == 2
    finally:
        await client.shutdown()


async def test_a_client_added_again_does_not_inherit_a_provisioned_context(
    protected: Protected,
) -> None:
    """Attack round 2 of issue 18: a provisioned context named its client by id alone. One
    still held after `clients remove` (by another instance, whose data directory has its own
    copy) acted for a client added again under that id. It answers for the row it was made
    for."""
    service = protected.service
    device = await provisioned_device(protected, "legacy-3")
    client = await create_client_context()
    try:
        client.client_credentials[f"{protected.base}/*"] = device
        assert (await token(client, protected.base)).code == aiocoap.CREATED
        # Removed from the store only: the context stays here, as on another instance.
        assert await service.store.remove_client("legacy-3", "operator", service.clock.now()) == 1
        service.clock.advance(1)  # type: ignore[attr-defined]
        await service.store.add_client(
            Client(
                "legacy-3",
                ("thermostat",),
                ("temp:read",),
                service.clock.now(),
                secret_digest=service.secret_digest("another-secret-0123456789"),
            ),
            "operator",
        )
        answer = await token(client, protected.base)
        assert answer.code == aiocoap.UNAUTHORIZED
        assert cbor2.loads(answer.payload)[AceParam.ERROR] == 2
    finally:
        await client.shutdown()


# -- libcoap's client, as a device that has OSCORE but no EDHOC ---------------------------------

LIBCOAP = shutil.which("coap-client-oscore")


async def libcoap_token(conf: Path, url: str, out: Path) -> bytes:
    request = conf.parent / "request.cbor"
    request.write_bytes(cbor2.dumps({AceParam.AUDIENCE: "thermostat"}))
    out.unlink(missing_ok=True)
    assert LIBCOAP is not None
    process = await asyncio.create_subprocess_exec(
        LIBCOAP,
        "-m",
        "post",
        "-t",
        "19",
        "-f",
        str(request),
        "-o",
        str(out),
        "-E",
        f"{conf},{conf.with_suffix('.seq')}",
        f"{url}/token",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert out.exists(), stderr.decode(errors="replace")
    return out.read_bytes()


@pytest.mark.skipif(
    LIBCOAP is None,
    reason="no OSCORE-enabled libcoap client (coap-client-oscore: see scripts/"
    "build-libcoap-oscore.sh; Debian's libcoap3-bin has no OSCORE)",
)
async def test_libcoap_gets_a_token_over_a_provisioned_context(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cli_ok("init", data_dir=data_dir)
    cli_ok("audiences", "add", "thermostat", "--profile", "bearer", data_dir=data_dir)
    add_secret_client(data_dir, "libcoap-1")  # (its secret is never used: OSCORE is)
    conf = tmp_path / "libcoap-1.conf"
    conf.write_text(cli_ok("clients", "oscore", "libcoap-1", data_dir=data_dir))
    log = tmp_path / "serve.log"
    out = tmp_path / "answer.cbor"
    for ending in ("sigterm", "sigkill", None):
        async with serve_process(data_dir, log, COAP_AUTH_REQUIRE_OSCORE="true") as server:
            for _ in range(2):
                answer = cbor2.loads(await libcoap_token(conf, server.url, out))
                assert AceParam.ACCESS_TOKEN in answer and answer[AceParam.EXPIRES_IN] > 0
            if ending == "sigterm":
                server.process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(server.process.wait(), 10)
            # "sigkill": serve_process kills it, as a crash would: Echo recovery next time.
    assert "caller=libcoap-1 -> 2.01" in log.read_text()


async def test_reprovisioning_and_removing_while_serving(protected: Protected) -> None:
    """The CLI never touches a directory the server holds: the server drops a withdrawn
    context at its next tick and keeps ticking (it stopped before: key schedule, TRL sweep
    and notifications with it)."""
    first = await provisioned_device(protected, "legacy-3")
    client = await create_client_context()
    try:
        client.client_credentials[f"{protected.base}/*"] = first
        assert (await token(client, protected.base)).code == aiocoap.CREATED
        second = device_side(provision(protected.service.settings.data_dir, "legacy-3"))
        await protected.server.tick()
        with pytest.raises(NotAProtectedMessage) as refused:  # the old context is gone
            await token(client, protected.base)
        assert refused.value.plain_message.code == aiocoap.UNAUTHORIZED
        client.client_credentials[f"{protected.base}/*"] = second
        assert (await token(client, protected.base)).code == aiocoap.CREATED
        assert remove(protected.service.settings.data_dir, "legacy-3")
        await protected.server.tick()
        await protected.server.tick()
        assert protected.server.contexts.provisioned == {}
        with pytest.raises(NotAProtectedMessage):
            await token(client, protected.base)
        # Nothing withdrawn is left behind once no process holds it.
        remove(protected.service.settings.data_dir, "nobody")
        root = protected.service.settings.data_dir / "oscore"
        assert [d for d in root.iterdir() if d.is_dir()] == []
    finally:
        await client.shutdown()


async def test_withdrawing_an_observing_context_ends_its_observation_cleanly(
    protected: Protected, caplog: pytest.LogCaptureFixture
) -> None:
    """Second attack round: a notification under a context withdrawn meanwhile logged a
    traceback and sent 5.00; now the observation ends with one 4.01."""
    device = await provisioned_device(protected, "legacy-4")
    client = await create_client_context()
    try:
        client.client_credentials[f"{protected.base}/*"] = device
        request = aiocoap.Message(code=aiocoap.GET, uri=f"{protected.base}/revoke/trl", observe=0)
        observation = client.request(request)
        assert (await observation.response).code == aiocoap.CONTENT
        assert remove(protected.service.settings.data_dir, "legacy-4")
        await protected.server.tick()  # the server drops the withdrawn context
        protected.server.trl_resource.updated_state()  # a notification comes due
        # aiocoap: the unprotected 4.01 is not OSCORE, and ends the observation with an error.
        notifications = observation.observation.__aiter__()
        with pytest.raises(NotAProtectedMessage) as ended:
            await asyncio.wait_for(notifications.__anext__(), 10)
        assert ended.value.plain_message.code == aiocoap.UNAUTHORIZED
        # aiocoap 0.4.17's iterator keeps the error it raised and raises it again from its
        # finaliser: give it a fresh future (the observation is over either way).
        notifications._future = asyncio.get_running_loop().create_future()
        assert "Traceback" not in caplog.text and "ERROR" not in caplog.text
        assert "withdrawn" in caplog.text
    finally:
        await client.shutdown()
