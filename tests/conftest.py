"""Fixtures: a real coap-auth server on 127.0.0.1 (free port) and an aiocoap client.

Nothing the project provides is mocked; time comes from a SettableClock.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.service import AuthService
from coap_auth.store import Audience, Client, MasterKey, SqliteStore
from coap_auth.wire import AceParam, ContentFormat
from tests import pg

VECTORS = Path(__file__).parent / "vectors"

# Every secret, access token and refresh token the in-process tests handle, and every log
# record of the whole session: checked against each other when the session ends.
SEEN_SECRETS: set[bytes] = set()
MIN_SECRET_LEN = 16  # shorter values (test ids, "x") would match by accident


class SessionLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.texts.append(text)


def _forms(value: bytes) -> list[bytes]:
    return [value, value.hex().encode(), base64.urlsafe_b64encode(value).rstrip(b"=")]


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log() -> Iterator[None]:
    """Issue 8: a scan of every log line of the session for every secret used in it."""
    handler = SessionLog()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield
    root.removeHandler(handler)
    root.setLevel(previous)
    logged = "\n".join(handler.texts).encode("utf-8", "replace")
    # Not vacuous: where in-process tests handled secrets, their server logged something.
    assert handler.texts or not SEEN_SECRETS, "the scan saw no log line at all"
    leaks = [
        value[:6].hex()
        for value in SEEN_SECRETS
        if len(value) >= MIN_SECRET_LEN and any(form in logged for form in _forms(value))
    ]
    assert not leaks, f"secrets or tokens in the logs (first bytes): {leaks}"


def remember_secrets(body: Any) -> None:
    """Note the secrets and tokens in a request or response map for the session scan."""
    if not isinstance(body, dict):
        return
    for key in (AceParam.CLIENT_SECRET, AceParam.ACCESS_TOKEN, AceParam.REFRESH_TOKEN):
        value = body.get(key)
        if isinstance(value, str):
            value = value.encode()
        if isinstance(value, bytes):
            SEEN_SECRETS.add(value)


def load_vectors(name: str) -> list[dict[str, Any]]:
    document = json.loads((VECTORS / name).read_text())
    return document["vectors"]


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Rate limits off: tests fire hundreds of requests in one clock second on purpose;
    # tests/coap/test_limits.py switches them on. Plain CoAP on (lab mode): these tests are
    # about the endpoints' own behaviour; tests/secure/ runs with the default, OSCORE required.
    return Settings(
        data_dir=tmp_path,
        bind="127.0.0.1",
        port=0,
        issuer="coap://as.test",
        rate_limit_per_address=0,
        rate_limit_per_client=0,
        require_oscore=False,
    )


@pytest.fixture
async def service(settings: Settings, clock: SettableClock) -> AsyncIterator[AuthService]:
    master_key = MasterKey.load(settings.data_dir, create=True)
    store = SqliteStore.in_data_dir(settings.data_dir, master_key)
    await store.open()
    service = AuthService(store, master_key, settings, clock)
    await service.load_keys()
    yield service
    await store.close()


@dataclass
class Coap:
    """An aiocoap client pointed at one running server."""

    context: aiocoap.Context
    base: str
    server: Server
    service: AuthService
    secrets: dict[str, str] = field(default_factory=dict)

    async def request(
        self,
        method: aiocoap.Code,
        path: str,
        payload: bytes = b"",
        content_format: int | None = None,
        **options: Any,
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=method, uri=self.base + path, payload=payload, **options)
        if content_format is not None:
            message.opt.content_format = content_format
        return await self.context.request(message).response

    async def post_ace(self, path: str, body: Any) -> tuple[aiocoap.Message, Any]:
        remember_secrets(body)
        response = await self.request(aiocoap.POST, path, cbor2.dumps(body), ContentFormat.ACE_CBOR)
        decoded = cbor2.loads(response.payload) if response.payload else None
        remember_secrets(decoded)
        return response, decoded

    async def add_audience(
        self, audience_id: str, token_format: str = "cwt", lifetime: int = 3600
    ) -> None:
        await self.service.store.add_audience(
            Audience(audience_id, token_format, lifetime, self.service.clock.now()),  # type: ignore[arg-type]
            "operator",
        )

    async def add_secret_client(
        self, client_id: str, audiences: tuple[str, ...], scope: str
    ) -> str:
        secret = f"secret-of-{client_id}-0123456789abcdef"
        await self.service.store.add_client(
            Client(
                client_id,
                audiences,
                tuple(scope.split()),
                self.service.clock.now(),
                secret_digest=self.service.secret_digest(secret),
            ),
            "operator",
        )
        self.secrets[client_id] = secret
        SEEN_SECRETS.add(secret.encode())
        return secret

    async def add_key_client(
        self, client_id: str, audiences: tuple[str, ...], scope: str, cose_key: dict[int, Any]
    ) -> None:
        await self.service.store.add_client(
            Client(
                client_id,
                audiences,
                tuple(scope.split()),
                self.service.clock.now(),
                public_key=cose_key,
            ),
            "operator",
        )


@pytest.fixture
async def coap(service: AuthService) -> AsyncIterator[Coap]:
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    context = await aiocoap.Context.create_client_context()
    try:
        yield Coap(context, f"coap://127.0.0.1:{server.port}", server, service)
    finally:
        await context.shutdown()
        await server.stop()


@pytest.fixture
async def sensor(coap: Coap) -> Coap:
    """A server with audience `thermostat` (CWT), `dashboard` (JWT) and client `sensor-1`."""
    await coap.add_audience("thermostat", "cwt", 600)
    await coap.add_audience("dashboard", "jwt", 900)
    await coap.add_secret_client("sensor-1", ("thermostat", "dashboard"), "temp:read temp:write")
    return coap


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema for the test (tests that use it are marked needs_postgres)."""
    name = await pg.create_schema()
    yield name
    await pg.drop_schema(name)


@contextlib.asynccontextmanager
async def second_server(
    first: Coap, settings: Settings, clock: SettableClock, **overrides: Any
) -> AsyncIterator[Coap]:
    """A second AS on `first`'s store and data directory, whose settings differ by
    `overrides`, reached through `first`'s client context."""
    changed = dataclasses.replace(settings, **overrides)
    master_key = MasterKey.load(settings.data_dir, create=False)
    service = AuthService(first.service.store, master_key, changed, clock)
    await service.load_keys()
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    try:
        yield Coap(first.context, server.url, server, service, first.secrets)
    finally:
        await server.stop()
