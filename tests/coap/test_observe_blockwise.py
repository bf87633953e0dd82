"""Issue 16: block-wise registration answers and notifications (RFC 7959 §2.6, §3.4) and
block-wise GETs of the size a client asks (RFC 7959 §2.4), over real UDP: raw sockets, aiocoap's
client (device_client's KeySetWatcher) and libcoap's coap-client following a 16-key /keys."""

from __future__ import annotations

import asyncio
import shutil

import aiocoap
import cbor2
import pytest
from aiocoap.optiontypes import BlockOption

from coap_auth.coap.server import Server
from coap_auth.service import AuthService
from coap_auth.store import Audience
from device_client import KeySetWatcher, WatchPolicy
from tests.coap.observing import WITHIN, RawObserver, server_with, until
from tests.coap.test_observe_notifications import change_keys

COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")


def block2(number: int, szx: int) -> BlockOption.BlockwiseTuple:
    return BlockOption.BlockwiseTuple(number, False, szx)


async def sixteen_keys(service: AuthService, server: Server) -> bytes:
    """Seven audiences with signing families of their own: 16 published keys (each family an
    active and a next key), a COSE_KeySet well over 1024 bytes."""
    for n in range(7):
        audience = Audience(f"rs-{n}", "cwt", 600, service.clock.now(), key_family=f"rs-{n}")
        await service.store.add_audience(audience, "operator")
    await server.tick()
    payload = server.keys_resource._render(102).payload
    assert len(cbor2.loads(payload)) == 16 and len(payload) > 1024
    return payload


async def fetch_rest(observer: RawObserver, first: aiocoap.Message, path: str = "/keys") -> bytes:
    """What a client does after block 0 (RFC 7959 §2.6): GETs without Observe, on tokens of
    their own, for the next blocks of the same size; every block carries the first's ETag."""
    payload, option = first.payload, first.opt.block2
    while option.more:
        request = observer.request(
            path, observe=None, block2=block2(option.block_number + 1, option.size_exponent)
        )
        block = await observer.answer(request)
        assert block.code == aiocoap.CONTENT and block.opt.etag == first.opt.etag
        assert block.opt.observe is None
        payload += block.payload
        option = block.opt.block2
    return payload


async def test_large_registration_answers_and_notifications_go_block_wise(
    service: AuthService,
) -> None:
    async with server_with(service) as server:
        observer = RawObserver(server.port)  # type: ignore[arg-type]
        try:
            whole = await sixteen_keys(service, server)
            first = await observer.register()
            assert first.opt.observe is not None and first.opt.etag is not None
            assert first.opt.block2 == (0, True, 6) and len(first.payload) == 1024
            assert await fetch_rest(observer, first) == whole

            newest = await change_keys(service, server)
            (note,) = await observer.notifications(1)
            assert note.mtype == aiocoap.NON and note.opt.observe is not None
            assert note.opt.block2 == (0, True, 6) and note.opt.etag != first.opt.etag
            assert await fetch_rest(observer, note) == newest

            # A registration asking for 64-byte blocks gets its notifications in 64 bytes.
            small = await observer.register(block2=block2(0, 2))
            assert small.opt.block2 == (0, True, 2) and len(small.payload) == 64
            newest = await change_keys(service, server)
            notes = await observer.notifications(2)
            assert sorted(len(n.payload) for n in notes) == [64, 1024]
            (note,) = [n for n in notes if n.opt.block2.size_exponent == 2]
            assert await fetch_rest(observer, note) == newest
        finally:
            observer.close()


@pytest.mark.parametrize("path", ["/keys", "/revoke/trl", "/.well-known/core"])
async def test_a_get_honours_the_block_size_asked(service: AuthService, path: str) -> None:
    async with server_with(service) as server:
        observer = RawObserver(server.port)  # type: ignore[arg-type]
        try:
            await sixteen_keys(service, server)
            whole = await observer.answer(observer.request(path, observe=None))
            assert whole.code == aiocoap.CONTENT
            first = await observer.answer(observer.request(path, observe=None, block2=block2(0, 2)))
            if len(whole.payload) <= 64:
                assert first.payload == whole.payload
                return
            assert first.opt.block2 == (0, True, 2) and len(first.payload) == 64
            assert await fetch_rest(observer, first, path) == (
                whole.payload
                if whole.opt.block2 is None
                else await fetch_rest(observer, whole, path)
            )
        finally:
            observer.close()


async def test_a_block_past_the_end_is_refused(service: AuthService) -> None:
    async with server_with(service) as server:
        observer = RawObserver(server.port)  # type: ignore[arg-type]
        try:
            answer = await observer.answer(
                observer.request("/keys", observe=None, block2=block2(500, 2))
            )
            assert answer.code == aiocoap.BAD_OPTION
        finally:
            observer.close()


async def test_aiocoap_follows_block_wise_notifications(service: AuthService) -> None:
    """device_client's KeySetWatcher (aiocoap completes a block-wise notification itself)."""
    async with server_with(service) as server:
        await sixteen_keys(service, server)
        context = await aiocoap.Context.create_client_context()
        watcher = KeySetWatcher(
            context,
            f"coap://127.0.0.1:{server.port}",
            clock=service.clock,
            policy=WatchPolicy(request_timeout=2.0, poll_interval=0.02),
        )
        try:
            await watcher.start()
            for _ in range(2):
                await change_keys(service, server)
                published = {k.kid for k in service.keys.published()}
                assert len(published) >= 16
                deadline = asyncio.get_running_loop().time() + WITHIN
                while watcher.key_set.kids != published:
                    assert asyncio.get_running_loop().time() < deadline, "not told in time"
                    await asyncio.sleep(0.02)
            assert watcher.registrations == 1 and watcher.fetches == 0
        finally:
            await watcher.stop()
            await context.shutdown()


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap's coap-client-notls is not installed")
async def test_libcoap_follows_a_block_wise_key_set(service: AuthService) -> None:
    async with server_with(service) as server:
        before = await sixteen_keys(service, server)
        assert COAP_CLIENT is not None
        process = await asyncio.create_subprocess_exec(
            COAP_CLIENT,
            "-s", "3", "-B", "5", "-w",
            f"coap://127.0.0.1:{server.port}/keys",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await until(lambda: len(server.observers) == 1)  # libcoap is another process
        after = await change_keys(service, server)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, stderr.decode(errors="replace")
        # Each set printed whole: libcoap fetched the blocks of the registration answer and
        # of the notification (before, it gave up on the first 1,200-byte-plus datagram).
        assert before in stdout and after in stdout, len(stdout)
