"""Issue 16: Observe notifications that cannot storm (RFC 7641 §4.5), over real UDP from raw
sockets (message types matter): NON with a periodic CON whose RST ends the observation,
paced, coalesced to the newest state, and observers bounded per source and in all."""

from __future__ import annotations

import asyncio

import aiocoap

from coap_auth.coap.observers import PROBE_INTERVAL
from coap_auth.coap.server import Server
from coap_auth.service import AuthService
from tests.coap.observing import RawObserver, ack, reset, server_with, until


async def change_keys(service: AuthService, server: Server) -> bytes:
    """Rotate (the published set changes); the COSE_KeySet observers should now hold."""
    await service.rotate_keys(force=True, actor="operator")
    await server.tick()
    return server.keys_resource._render(102).payload


async def reset_ends_it(
    observer: RawObserver, note: aiocoap.Message, service: AuthService, server: Server
) -> None:
    """Answer `note` with a reset: the observation ends, and the next change is not told."""
    observer.send(reset(note))
    await until(lambda: len(server.observers) == 0)
    await change_keys(service, server)
    assert await observer.quiet()


async def test_notifications_are_non_with_a_periodic_con_whose_reset_ends_it(
    service: AuthService,
) -> None:
    async with server_with(service, notify_con_interval=600) as server:
        observer = RawObserver(server.port)  # type: ignore[arg-type]
        try:
            first = await observer.register()
            assert first.code == aiocoap.CONTENT and first.opt.observe is not None
            numbers = [first.opt.observe]

            for _ in range(2):
                newest = await change_keys(service, server)
                (note,) = await observer.notifications(1)
                assert note.mtype == aiocoap.NON and note.payload == newest
                numbers.append(note.opt.observe)

            # RFC 7641 §4.5: once the last CON is notify_con_interval old, the next is a CON;
            # acknowledged, the observation goes on, NON again.
            service.clock.advance(600)
            newest = await change_keys(service, server)
            (note,) = await observer.notifications(1)
            assert note.mtype == aiocoap.CON and note.payload == newest
            numbers.append(note.opt.observe)
            observer.send(ack(note))
            await change_keys(service, server)
            (note,) = await observer.notifications(1)
            assert note.mtype == aiocoap.NON
            numbers.append(note.opt.observe)
            # RFC 7641 §4.4: increasing (24 bits; no wrap in a few notifications).
            assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)

            # An observer that went away answers the CON with RST: the observation ends.
            service.clock.advance(600)
            await change_keys(service, server)
            (note,) = await observer.notifications(1)
            assert note.mtype == aiocoap.CON
            assert len(server.observers) == 1
            await reset_ends_it(observer, note, service, server)
        finally:
            observer.close()


async def test_a_waiting_observer_gets_only_the_newest_state(service: AuthService) -> None:
    """Coalescing: at 1 notification a second, the second observer waits a second; two changes
    in that time are one notification to it, of the newest set."""
    async with server_with(service, notify_rate=1) as server:
        first, second = RawObserver(server.port), RawObserver(server.port)  # type: ignore[arg-type]
        try:
            assert (await first.register()).opt.observe is not None
            assert (await second.register()).opt.observe is not None
            middle = await change_keys(service, server)
            newest = await change_keys(service, server)
            assert middle != newest

            notes = await second.notifications(1)
            assert [n.payload for n in notes] == [newest]
            assert await second.quiet(0.5)  # nothing more: the middle state was skipped
            # The first was told at once of the middle set, then of the newest.
            assert [n.payload for n in await first.notifications(2)] == [middle, newest]
        finally:
            first.close()
            second.close()


async def test_notifications_are_paced(service: AuthService) -> None:
    """notify_rate 100: 30 observers are told over at least 0.2 s, not in one burst."""
    async with server_with(service, notify_rate=100, observers_per_source=100) as server:
        observer = RawObserver(server.port)  # type: ignore[arg-type]
        try:
            for _ in range(30):
                assert (await observer.register()).opt.observe is not None
            loop = asyncio.get_running_loop()
            await change_keys(service, server)
            arrivals = []
            for _ in range(30):
                await observer.notifications(1)
                arrivals.append(loop.time())
            assert arrivals[-1] - arrivals[0] >= 0.2
            assert server.observers.sent == 30
        finally:
            observer.close()


async def test_one_source_holds_at_most_observers_per_source(service: AuthService) -> None:
    """RFC 7641 §4.1: past the limit, the GET is answered without Observe (not refused)."""
    async with server_with(service) as server:
        port: int = server.port  # type: ignore[assignment]
        flood, other = RawObserver(port, "127.0.0.1"), RawObserver(port, "127.0.0.2")
        try:
            for _ in range(8):
                assert (await flood.register()).opt.observe is not None
            ninth = await flood.register()
            assert ninth.code == aiocoap.CONTENT and ninth.opt.observe is None
            assert ninth.payload == server.keys_resource._render(102).payload
            # Another source is not affected; the refused one is told of nothing.
            assert (await other.register()).opt.observe is not None
            assert len(server.observers) == 9
            await change_keys(service, server)
            assert len(await flood.notifications(8)) == 8
            assert await flood.quiet()
        finally:
            flood.close()
            other.close()


async def test_observers_are_bounded_in_all(service: AuthService) -> None:
    async with server_with(service, observers_max=3) as server:
        port: int = server.port  # type: ignore[assignment]
        observers = [RawObserver(port, f"127.0.0.{n}") for n in range(1, 5)]
        try:
            registrations = [o.request("/keys") for o in observers]
            answers = [await o.answer(r) for o, r in zip(observers, registrations, strict=True)]
            assert [a.opt.observe is not None for a in answers] == [True, True, True, False]
            assert all(a.code == aiocoap.CONTENT for a in answers)
            # A place freed (a deregistration, RFC 7641 §3.6) is taken by the next one.
            token = registrations[0].token
            answer = await observers[0].register(observe=1, token=token)
            assert answer.opt.observe is None
            await asyncio.sleep(0.05)
            assert (await observers[3].register()).opt.observe is not None
        finally:
            for o in observers:
                o.close()


async def test_a_new_registration_probes_the_sources_older_observations(
    service: AuthService,
) -> None:
    """A device that restarts leaves its observations behind (a new port, new tokens): its
    next registration has them sent a CON at once (at most once a minute each), and those
    nobody acknowledges end (here: reset), so the device gets its place back."""
    async with server_with(service, observers_per_source=2) as server:
        port: int = server.port  # type: ignore[assignment]
        before, after = RawObserver(port), RawObserver(port)
        try:
            for _ in range(2):
                assert (await before.register()).opt.observe is not None
            # Within the minute: no probe, and the limit holds.
            assert (await after.register()).opt.observe is None
            assert await before.quiet()
            service.clock.advance(PROBE_INTERVAL)  # type: ignore[attr-defined]
            assert (await after.register()).opt.observe is None
            for _ in range(2):  # one CON at a time to one endpoint (NSTART 1)
                (probe,) = await before.notifications(1)
                assert probe.mtype == aiocoap.CON
                before.send(reset(probe))
            await until(lambda: len(server.observers) == 0)
            live = await after.register()
            assert live.opt.observe is not None
            # A live observer acknowledges its probe and stays.
            service.clock.advance(PROBE_INTERVAL)  # type: ignore[attr-defined]
            assert (await after.register()).opt.observe is not None
            (probe,) = [m for m in await after.notifications(1) if m.mtype == aiocoap.CON]
            after.send(ack(probe))
            assert await after.quiet()
            assert len(server.observers) == 2
        finally:
            before.close()
            after.close()


async def test_a_con_due_to_an_address_no_longer_verified_ends_the_observation(
    service: AuthService,
) -> None:
    """RFC 9175 §2.4: nothing is retransmitted to an address that is not verified. When an
    observer's periodic CON falls due after its address's verification lapsed, it is sent a
    last NON without Observe instead (it may register again, through the Echo)."""
    lifetime = service.settings.echo_verified_lifetime
    async with server_with(service, verified_networks="", notify_con_interval=10) as server:
        port: int = server.port  # type: ignore[assignment]
        observer = RawObserver(port)
        try:
            challenge = await observer.register()
            assert challenge.code == aiocoap.UNAUTHORIZED and challenge.opt.echo
            assert (await observer.register(echo=challenge.opt.echo)).opt.observe is not None
            service.clock.advance(lifetime)  # type: ignore[attr-defined]
            await change_keys(service, server)
            (last,) = await observer.notifications(1)
            assert last.mtype == aiocoap.NON and last.opt.observe is None
            assert last.code == aiocoap.CONTENT
            assert len(server.observers) == 0
            assert await observer.quiet()
        finally:
            observer.close()


async def test_a_detached_observation_ends_as_its_exchange_would(service: AuthService) -> None:
    """An unprotected observation leaves aiocoap's pipe behind (most of its memory) and takes
    the request's place in the token manager: a deregistration on its token (RFC 7641 §3.6),
    aiocoap giving up on a CON to its endpoint (§4.5) and a new registration on its token
    (§4.1: it replaces the old) all end it, as they ended the pipe."""
    async with server_with(service) as server:
        port: int = server.port  # type: ignore[assignment]
        manager = server.observers.token_manager
        observer = RawObserver(port)
        try:
            first = observer.request("/keys")
            assert (await observer.answer(first)).opt.observe is not None
            assert len(server.observers) == 1
            (key,) = [k for k, (pipe, _) in manager.incoming_requests.items() if pipe is None]
            assert key[0] == first.token
            # A new registration on the same token replaces it.
            again = observer.request("/keys", token=first.token)
            assert (await observer.answer(again)).opt.observe is not None
            assert len(server.observers) == 1
            # What aiocoap does when a CON's retransmissions run out (93 s, not waited for).
            manager.dispatch_error(aiocoap.error.ConRetransmitsExceeded("test"), key[1])
            assert len(server.observers) == 0 and key not in manager.incoming_requests
            # Deregistration on the token of a live one.
            third = observer.request("/keys")
            assert (await observer.answer(third)).opt.observe is not None
            gone = await observer.register(observe=1, token=third.token)
            assert gone.code == aiocoap.CONTENT and gone.opt.observe is None
            assert len(server.observers) == 0
            await change_keys(service, server)
            assert await observer.quiet()
        finally:
            observer.close()


async def test_a_reset_to_a_non_notification_changes_nothing(service: AuthService) -> None:
    """A reset answering a NON notification is unauthenticated and its message id guessable:
    ending the observation on it (or probing it with a CON that forged resets can race) let
    outsiders end an honest device's observation. It is ignored, as aiocoap does; a device
    that forgot its observation is found out when it registers again (the probe) or by the
    periodic CON."""
    async with server_with(service) as server:
        observer = RawObserver(server.port)  # type: ignore[arg-type]
        try:
            assert (await observer.register()).opt.observe is not None
            await change_keys(service, server)
            (note,) = await observer.notifications(1)
            assert note.mtype == aiocoap.NON
            for offset in range(-2, 3):
                forged = reset(note)
                forged.mid = (note.mid + offset) & 0xFFFF
                observer.send(forged)
            assert await observer.quiet()  # no probe either
            assert len(server.observers) == 1
            newest = await change_keys(service, server)
            (note,) = await observer.notifications(1)
            assert note.mtype == aiocoap.NON and note.payload == newest
        finally:
            observer.close()
