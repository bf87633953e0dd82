"""Property-based fuzzing of every endpoint over real UDP (issue 8).

A real server runs in a thread of its own, on SQLite and (when available) PostgreSQL;
hypothesis builds CoAP requests (methods, paths, content formats, options, query strings,
payloads from random bytes to well-typed ACE maps with wrong types, deep and indefinite-length
CBOR, tags in odd places, truncated tokens) and sends them as datagrams. For every one: an
answer comes, it is never 5.xx, no exception reaches the log, and a refused request leaves the
store exactly as it was.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.service import AuthService
from coap_auth.store import Audience, Client, MasterKey, SqliteStore, Store
from coap_auth.store.postgres import PostgresStore
from coap_auth.wire import AceParam
from tests import pg
from tests.raw_coap import exchange_blocking

T = TypeVar("T")
SECRET = "secret-of-sensor-1-0123456789abcdef"
# Hypothesis leans towards the first choices of a sampled_from: the endpoints that read bodies.
PATHS = ("revoke", "introspect", "token", "revoke/trl", "keys", ".well-known/core", "nowhere")


class ServerThread:
    """A coap-auth server on its own event loop in a daemon thread."""

    def __init__(self, data_dir: Path, backend: str) -> None:
        self.backend = backend
        self.schema = ""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.errors: list[str] = []
        self.data_dir = data_dir

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def start(self) -> None:
        settings = Settings(
            data_dir=self.data_dir,
            bind="127.0.0.1",
            port=0,
            issuer="coap://as.test",
            rate_limit_per_address=0,
            rate_limit_per_client=0,
            require_oscore=False,
        )
        master_key = MasterKey.load(self.data_dir, create=True)
        self.store: Store
        if self.backend == "postgres":
            assert pg.PG_DSN is not None
            self.schema = await pg.create_schema()
            self.store = PostgresStore(pg.PG_DSN, master_key, schema=self.schema)
        else:
            self.store = SqliteStore.in_data_dir(self.data_dir, master_key)
        await self.store.open()
        self.service = AuthService(self.store, master_key, settings, SettableClock())
        self.server = Server(self.service, "127.0.0.1", 0)
        await self.server.start()
        now = self.service.clock.now()
        await self.store.add_audience(Audience("thermostat", "cwt", 600, now), "operator")
        await self.store.add_audience(
            Audience(
                "door",
                "jwt",
                600,
                now,
                introspect_secret_digest=self.service.secret_digest(SECRET),
            ),
            "operator",
        )
        await self.store.add_client(
            Client(
                "sensor-1",
                ("thermostat", "door"),
                ("temp:read",),
                now,
                secret_digest=self.service.secret_digest(SECRET),
            ),
            "operator",
        )

    async def snapshot(self) -> tuple[Any, ...]:
        now = self.service.clock.now()
        return (
            await self.store.change_counters(),
            len(await self.store.audit_entries()),
            await self.store.list_families(None, now),
            await self.store.trl(),
            [(k.kid, k.state) for k in await self.store.load_keys()],
        )

    async def stop(self) -> None:
        await self.server.stop()
        await self.store.close()
        if self.schema:
            await pg.drop_schema(self.schema)


class LogTrap(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pg.needs_postgres)]
)
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    server = ServerThread(tmp_path_factory.mktemp("fuzz"), request.param)
    server.call(server.start())
    # A real token and a real refresh token to mutate.
    body = {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: SECRET, 5: "thermostat"}
    reply = exchange_blocking(server.server.port, post("token", cbor2.dumps(body), 19))
    granted = cbor2.loads(reply.payload)
    server.token = granted[AceParam.ACCESS_TOKEN]  # type: ignore[attr-defined]
    server.refresh = granted[AceParam.REFRESH_TOKEN]  # type: ignore[attr-defined]
    trap = LogTrap()
    logging.getLogger("coap_auth").addHandler(trap)
    server.trap = trap  # type: ignore[attr-defined]
    yield server
    logging.getLogger("coap_auth").removeHandler(trap)
    server.call(server.stop())
    server.loop.call_soon_threadsafe(server.loop.stop)


def post(path: str, payload: bytes, content_format: int | None) -> aiocoap.Message:
    message = aiocoap.Message(code=aiocoap.POST, uri_path=tuple(path.split("/")), payload=payload)
    if content_format is not None:
        message.opt.content_format = content_format
    return message


# -- strategies ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.binary(max_size=64),
    st.text(max_size=64),
)
cbor_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.integers(-30, 60), st.text(max_size=8)), inner, max_size=4),
        st.builds(cbor2.CBORTag, st.integers(0, 2**16), inner),
    ),
    max_leaves=12,
)
ALL_KEYS = [*map(int, AceParam), "client_assertion", "token_format"]
# The parameters each endpoint reads, so that most generated maps exercise them.
ENDPOINT_KEYS: dict[str, list[Any]] = {
    "token": [33, 5, 9, 4, 37, "client_assertion", "token_format"],
    "introspect": [11, "client_assertion"],
    "revoke": [11, "client_assertion"],
}


def _encode(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except Exception:  # some generated values do not encode (e.g. unhashable keys)
        return b"\xf6"


hostile_cbor = st.sampled_from(
    [
        b"\x81" * 2000 + b"\x00",  # deep nesting
        b"\xbf" * 500 + b"\x00",  # indefinite-length maps, unterminated
        b"\xa1\x18\x18\x5f\x41a\x41b\xff",  # {24: indefinite byte string}
        b"\xa1\x18\x18\x7f\x61a\x61b\xff",  # {24: indefinite text string}
        b"\x5b\x00\x00\x00\x00\x00\xa0\x00\x00" + b"x" * 100,  # claims 10 MB, sends 100 B
        b"\xa1\x18\x18\xd8\x1c\x81\xd8\x1d\x00",  # self-reference through tags 28/29
        b"\xa1\x0b\xc1\x1a\x00\x00\x00\x00",  # token: an epoch date tag
        b"\xa1\x0b\xd9\x01\x02\x82\x01\x02",  # token: a set tag
        b"\xc0\x74" + b"2026-11-23T00:00:00Z",  # a date string at the top
        b"\xa1\xd8\x3d\x00\x01",  # a tagged map key
    ]
)


@st.composite
def payloads(draw: st.DrawFn, path: str) -> bytes:
    kind = draw(st.sampled_from(["ace", "token", "hostile", "cbor", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "cbor":
        return _encode(draw(cbor_values))
    if kind == "ace":
        keys = st.sampled_from(
            ENDPOINT_KEYS.get(path, ALL_KEYS) if draw(st.booleans()) else ALL_KEYS
        )
        body = draw(st.dictionaries(keys, cbor_values, max_size=5))
        if draw(st.integers(0, 3)) > 0:  # past authentication, so the rest gets looked at
            caller = draw(st.sampled_from(["sensor-1", "door"]))
            body = {**body, AceParam.CLIENT_ID: caller, AceParam.CLIENT_SECRET: SECRET}
        return _encode(body)
    if kind == "hostile":
        return draw(hostile_cbor)
    return b"TOKEN"  # replaced by a truncated or mutated real token in the test


POST_PATHS = ("token", "introspect", "revoke")


@st.composite
def requests(draw: st.DrawFn) -> tuple[aiocoap.Message, str]:
    path = draw(st.sampled_from(PATHS))
    if draw(st.sampled_from([True, True, False])):  # mostly what the endpoint expects
        code = aiocoap.POST if path in POST_PATHS else aiocoap.GET
        content_format: int | None = 19 if path in POST_PATHS else None
    else:
        code = aiocoap.Code(draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7])))
        content_format = draw(st.one_of(st.none(), st.integers(0, 65535), st.just(19)))
    message = aiocoap.Message(
        code=code, uri_path=tuple(path.split("/")), payload=draw(payloads(path))
    )
    if content_format is not None:
        message.opt.content_format = content_format
    if draw(st.integers(0, 3)) == 0:
        message.opt.accept = draw(st.one_of(st.sampled_from([50, 102, 262]), st.integers(0, 999)))
    query_params = st.tuples(
        st.sampled_from(["diff", "cursor", "x", ""]),
        st.one_of(st.integers(-5, 2**70).map(str), st.text(max_size=12)),
    ).map(lambda kv: f"{kv[0]}={kv[1]}")
    message.opt.uri_query = tuple(draw(st.lists(query_params, max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        message.opt.etags = (draw(st.binary(min_size=1, max_size=8)),)
    return message, path


def mutate(token: bytes, how: int) -> bytes:
    if how % 3 == 0:
        return token[: how % len(token)]  # truncated
    flipped = bytearray(token)
    flipped[how % len(token)] ^= 0x40
    return bytes(flipped)


def check(fuzzed: ServerThread, message: aiocoap.Message, path: str) -> None:
    """Send; the answer must come, never be 5.xx, log no fault, and if it refuses, change
    nothing in the store."""
    before = fuzzed.call(fuzzed.snapshot())

    answer = exchange_blocking(fuzzed.server.port, message)

    assert answer.code.is_response(), answer.code
    assert answer.code.class_ != 5, (answer.code, path, message.payload[:60])
    assert fuzzed.trap.records == [], fuzzed.trap.records  # type: ignore[attr-defined]
    if not answer.code.is_successful():
        assert fuzzed.call(fuzzed.snapshot()) == before, (answer.code, path)


FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(request=requests())
def test_any_request_to_any_resource(
    fuzzed: ServerThread, request: tuple[aiocoap.Message, str]
) -> None:
    """Methods, content formats, Accept, ETags, query strings, bytes, CBOR, hostile CBOR."""
    message, path = request
    if message.payload == b"TOKEN":
        message.payload = cbor2.dumps({11: fuzzed.token})  # type: ignore[attr-defined]
    check(fuzzed, message, path)


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    body=st.dictionaries(st.sampled_from(ALL_KEYS), cbor_values, min_size=1, max_size=5),
    authenticated=st.booleans(),
)
def test_every_parameter_with_every_type(
    fuzzed: ServerThread, path: str, body: dict[Any, Any], authenticated: bool
) -> None:
    """Well-formed ACE requests whose parameters have any type, mostly past authentication,
    so that every parameter is read."""
    if authenticated:
        caller = "door" if path == "introspect" else "sensor-1"
        body = {**body, AceParam.CLIENT_ID: caller, AceParam.CLIENT_SECRET: SECRET}
    check(fuzzed, post(path, _encode(body), 19), path)


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    which=st.sampled_from(["access", "refresh"]),
    how=st.integers(0, 10_000),
    authenticated=st.booleans(),
)
def test_truncated_and_altered_tokens(
    fuzzed: ServerThread, path: str, which: str, how: int, authenticated: bool
) -> None:
    token = fuzzed.token if which == "access" else fuzzed.refresh  # type: ignore[attr-defined]
    key = AceParam.REFRESH_TOKEN if path == "token" else AceParam.TOKEN
    body: dict[Any, Any] = {key: mutate(token, how)}
    if path == "token":
        body[AceParam.GRANT_TYPE] = 3
    if authenticated:
        caller = "door" if path == "introspect" else "sensor-1"
        body.update({AceParam.CLIENT_ID: caller, AceParam.CLIENT_SECRET: SECRET})
    check(fuzzed, post(path, cbor2.dumps(body), 19), path)


def test_garbage_datagrams_do_not_stop_the_server(fuzzed: ServerThread) -> None:
    port = fuzzed.server.port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in (b"", b"\x00", b"\xff" * 40, b"\x40\x01\x00", bytes(range(256)) * 4):
            sock.sendto(datagram, ("127.0.0.1", port))
    body = {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: SECRET, 5: "thermostat"}
    answer = exchange_blocking(port, post("token", cbor2.dumps(body), 19))
    assert answer.code == aiocoap.CREATED
    assert fuzzed.trap.records == []  # type: ignore[attr-defined]
