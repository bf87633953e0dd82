"""The protected channel under load: EDHOC (RFC 9528) handshakes and /token over OSCORE
(RFC 8613) against the bench server, next to the plain workloads of bench/loadgen.py.

Devices are registered P-256 clients (`device-0` ...), added to the data directory in
process before the server starts, as `coap-auth clients add --public-key` adds them (one
CLI start each would take ~0.5 s). Two initiators: the bench's own (lakers-python driving
the raw-UDP endpoints of bench/loadgen.py, so that the client costs little) and the one a
device uses (`coap_auth.secure.edhoc.establish`, then aiocoap's OSCORE transport).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import cbor2
import lakers
from aiocoap import oscore
from cryptography.hazmat.primitives.asymmetric import ec

from bench import coap_wire as wire
from bench.loadgen import Endpoint, EndpointPool, Workload
from bench.processes import BENCH_SETTINGS, SCOPE, DataDir
from coap_auth.cli.runtime import open_service
from coap_auth.config import load_settings
from coap_auth.secure.contexts import OscoreContext
from coap_auth.secure.credentials import (
    EdhocCredential,
    EdhocIdentity,
    device_credential,
)
from coap_auth.secure.edhoc import (
    MESSAGE_1_PREFIX,
    encode_connection_id,
    establish,
    initiator_context,
)
from coap_auth.store import Client
from coap_auth.tokens import cose_key_from_public
from coap_auth.udp import create_client_context
from coap_auth.wire import AceParam, ContentFormat

AUDIENCE = "thermostat"
EDHOC_OPTIONS = wire.request_options(
    "/.well-known/edhoc", content_format=ContentFormat.CID_EDHOC_CBOR_SEQ
)
# The server holds at most `edhoc_pending_per_address` (8) unfinished handshakes from one
# address, and all the bench's sockets share 127.0.0.1: the workers' handshakes wait their
# turn rather than push each other out.
CONCURRENT_HANDSHAKES = 4


class HandshakeFailed(RuntimeError):
    """The server refused a bench handshake or its first protected request."""


@dataclass(frozen=True)
class Devices:
    identities: list[EdhocIdentity]
    server_credential: EdhocCredential  # what `coap-auth edhoc-credential` prints

    def cycle(self) -> Callable[[], EdhocIdentity]:
        """Identities in turn: n consecutive draws are n different peers (n <= count), so
        no peer holds more contexts than the server keeps per peer (4)."""
        return itertools.cycle(self.identities).__next__


async def register_devices(data: DataDir, count: int) -> Devices:
    """`count` clients with fresh P-256 keys for the thermostat, each with the scope the
    plain client has; the AS's credential from the same data directory."""
    settings = load_settings(env=BENCH_SETTINGS, flags={"data_dir": data.path})
    service = await open_service(settings)
    identities = []
    try:
        for index in range(count):
            key = ec.generate_private_key(ec.SECP256R1())
            client = Client(
                client_id=f"device-{index}",
                audiences=(AUDIENCE,),
                scope=tuple(SCOPE.split()),
                created_at=service.clock.now(),
                public_key=cose_key_from_public(key.public_key()),
            )
            await service.store.add_client(client, "operator")
            identities.append(device_credential(client.client_id, key))
        return Devices(identities, service.edhoc_identity.credential)
    finally:
        await service.store.close()


# -- the bench's initiator: lakers over the load generator's raw endpoints --------------------


def _expect(response: wire.Response, code: int, what: str) -> None:
    if response.code != code:
        raise HandshakeFailed(f"{what} answered {wire.code_text(response.code)}")


async def handshake(
    endpoint: Endpoint, identity: EdhocIdentity, server: EdhocCredential
) -> OscoreContext:
    """EDHOC method 3, suite 2, as `establish` runs it (credential by reference, C_I two
    random bytes, no message_4), over one raw endpoint."""
    initiator = lakers.EdhocInitiator()
    c_i = secrets.token_bytes(2)
    message_1 = bytes(initiator.prepare_message_1(c_i=c_i, ead_1=None))
    answer = await endpoint.exchange(wire.POST, EDHOC_OPTIONS, MESSAGE_1_PREFIX + message_1)
    _expect(answer, wire.CHANGED, "message_1")
    c_r, id_cred_r, _ead_2 = initiator.parse_message_2(answer.payload)
    checked = lakers.credential_check_or_fetch(id_cred_r, server.ccs)
    initiator.verify_message_2(identity.private_scalar, identity.credential.ccs, checked)
    message_3, _prk_out = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    c_r = bytes(c_r)
    payload = encode_connection_id(c_r) + bytes(message_3)
    _expect(await endpoint.exchange(wire.POST, EDHOC_OPTIONS, payload), wire.CHANGED, "message_3")
    return initiator_context(initiator, c_i, c_r, server)


def token_request() -> aiocoap.Message:
    """The inner /token request of an EDHOC-authenticated client: the audience suffices."""
    return aiocoap.Message(
        code=aiocoap.POST,
        uri_path=("token",),
        payload=cbor2.dumps({AceParam.AUDIENCE: AUDIENCE}),
        content_format=ContentFormat.ACE_CBOR,
    )


def protect(context: OscoreContext, inner: aiocoap.Message) -> tuple[int, bytes, bytes, Any]:
    """The outer code, options and payload of the protected request, and its request id."""
    outer, request_id = context.protect(inner)
    return int(outer.code), outer.opt.encode(), bytes(outer.payload), request_id


def unprotect(context: OscoreContext, response: wire.Response, request_id: Any) -> int | None:
    """The inner response code, or None when the answer is not a valid protected one."""
    if wire.OSCORE not in response.options:
        return None
    try:
        inner, _ = context.unprotect(aiocoap.Message.decode(response.data), request_id)
    except (oscore.ProtectionInvalid, oscore.DecodeError, oscore.ReplayError):
        return None
    return int(inner.code)


async def first_token(endpoint: Endpoint, context: OscoreContext) -> None:
    code, options, payload, request_id = protect(context, token_request())
    answer = await endpoint.exchange(code, options, payload)
    if unprotect(context, answer, request_id) != wire.CREATED:
        raise HandshakeFailed(f"protected /token answered {wire.code_text(answer.code)}")


def oscore_issue_workload(devices: Devices) -> Workload:
    """/token over OSCORE: each worker runs EDHOC once (in `prepare`, not timed) as its own
    device, then sends `{5: audience}` protected under that context, one at a time, so its
    sequence numbers stay in order."""
    next_identity = devices.cycle()
    turns = asyncio.Semaphore(CONCURRENT_HANDSHAKES)
    inner = token_request()

    async def prepare(endpoint: Endpoint, state: dict[str, Any]) -> None:
        async with turns:
            for _ in range(3):
                try:
                    state["context"] = await handshake(
                        endpoint, next_identity(), devices.server_credential
                    )
                    return
                except (TimeoutError, HandshakeFailed):
                    continue
        raise HandshakeFailed("no OSCORE context after three EDHOC attempts")

    def build(state: dict[str, Any]) -> tuple[int, bytes, bytes]:
        code, options, payload, state["request_id"] = protect(state["context"], inner)
        return code, options, payload

    def accept(state: dict[str, Any], response: wire.Response) -> bool:
        return unprotect(state["context"], response, state["request_id"]) == wire.CREATED

    return Workload("OSCORE issue", build=build, accept=accept, prepare=prepare)


# -- handshake latency ------------------------------------------------------------------------


@dataclass
class HandshakeTimes:
    """Wall times (s) of one initiator's runs: the whole (EDHOC + first protected /token),
    and the EDHOC part alone."""

    kind: str  # "bench" or "device"
    initiator: str
    total: list[float] = field(default_factory=list)
    edhoc: list[float] = field(default_factory=list)

    def percentile(self, fraction: float, which: str = "total") -> float:
        ordered = sorted(getattr(self, which))
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class HandshakeResult:
    runs: list[HandshakeTimes]
    server_cpu: float  # server CPU seconds over every measured run of every initiator
    client_cpu: float  # this process's CPU seconds over the same runs
    count: int  # measured runs in all

    def of(self, kind: str) -> HandshakeTimes:
        return next(times for times in self.runs if times.kind == kind)


async def measure_handshakes(
    pool: EndpointPool,
    devices: Devices,
    runs: int,
    server_cpu: Callable[[], float],
    warmup: int = 10,
) -> HandshakeResult:
    """`runs` times each initiator, alternating (so drift hits both alike), one at a time:
    a fresh ephemeral key and connection id each run, the registered devices' static keys in
    turn, then the first /token under the new context."""
    base = f"coap://{pool.host}:{pool.port}"
    (endpoint,) = await pool.take(1)
    client = await create_client_context()
    next_identity = devices.cycle()
    server = devices.server_credential

    async def raw() -> float:
        started = time.perf_counter()
        context = await handshake(endpoint, next_identity(), server)
        edhoc_done = time.perf_counter()
        await first_token(endpoint, context)
        return edhoc_done - started

    async def device() -> float:
        started = time.perf_counter()
        context = await establish(client, base, next_identity(), server)
        edhoc_done = time.perf_counter()
        client.client_credentials[f"{base}/*"] = context
        request = token_request()
        request.set_request_uri(f"{base}/token")
        answer = await client.request(request).response
        if answer.code != aiocoap.CREATED:
            raise HandshakeFailed(f"protected /token answered {answer.code}")
        return edhoc_done - started

    kinds: Sequence[tuple[HandshakeTimes, Callable[[], Any]]] = (
        (HandshakeTimes("bench", "bench (lakers, raw UDP)"), raw),
        (HandshakeTimes("device", "device (establish + aiocoap OSCORE)"), device),
    )
    try:
        for _ in range(warmup):
            for _times, run in kinds:
                await run()
        cpu = (server_cpu(), time.process_time())
        for _ in range(runs):
            for times, run in kinds:
                started = time.perf_counter()
                edhoc = await run()
                times.total.append(time.perf_counter() - started)
                times.edhoc.append(edhoc)
        server_seconds, client_seconds = server_cpu() - cpu[0], time.process_time() - cpu[1]
    finally:
        await client.shutdown()
    return HandshakeResult(
        [times for times, _run in kinds], server_seconds, client_seconds, runs * len(kinds)
    )
