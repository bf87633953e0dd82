"""What every subcommand shares: opening the service on the data directory, printing rows."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import aiocoap

from coap_auth.cli import data_lock
from coap_auth.clock import SystemClock
from coap_auth.config import LogFormat, Settings
from coap_auth.echo import request_answering_echo
from coap_auth.errors import OperatorError
from coap_auth.service import AuthService
from coap_auth.store import MasterKey, SqliteStore, Store
from coap_auth.store.master_key import make_private
from coap_auth.store.sqlite import DB_FILE
from coap_auth.udp import create_client_context

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]


def _store(settings: Settings, master_key: MasterKey) -> Store:
    if not settings.store:
        return SqliteStore.in_data_dir(settings.data_dir, master_key)
    try:
        from coap_auth.store.postgres import PostgresStore
    except ImportError:
        raise OperatorError(
            "the PostgreSQL store needs asyncpg: pip install 'coap-auth[postgres]'"
        ) from None
    return PostgresStore(settings.store, master_key, schema=settings.store_schema)


# The attributes every LogRecord has: anything else on a record came as `extra` fields.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """`log_format = "json"`: one JSON object per record and line: time (UTC, ISO 8601),
    level, logger, message, any `extra` fields as keys (the access log's: method, path,
    source, client, code, outcome, duration_ms, token_hash, family), and the exception's
    traceback when there is one. json.dumps escapes every control character, so nothing in
    a field can break the line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in document:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str)


def configure_logging(settings: Settings) -> None:
    """The server's logging on stderr: one line per record at the configured level, as text
    or (log_format json) as JSON objects; aiocoap's own per-request chatter only from WARNING
    (our access log has one line per request)."""
    handler = logging.StreamHandler()
    if settings.log_format == LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)  # a Python warning too is one JSON line
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    logging.getLogger("coap-server").setLevel(logging.WARNING)


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Whatever is created meanwhile (data directory, master key, database and its side
    files) is readable by us alone, whatever the caller's umask."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


async def open_service(settings: Settings, *, create: bool = False) -> AuthService:
    """The service on the configured store. The data directory holds the SQLite file (when
    that is the store) and the master key (unless COAP_AUTH_MASTER_KEY gives it); on every
    start it is made 0700 and what it holds 0600, also when an older version left it open."""
    data_dir = settings.data_dir
    if not create:
        _must_be_initialised(settings)
    with _private_umask():
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_private(data_dir, 0o700)
        master_key = MasterKey.load(data_dir, create=create)
        store = _store(settings, master_key)
        await store.open()
    service = AuthService(store, master_key, settings, SystemClock())
    try:
        await service.load_keys()
    except BaseException:
        await store.close()
        raise
    return service


@contextlib.asynccontextmanager
async def opened_service(settings: Settings, *, create: bool = False) -> AsyncIterator[AuthService]:
    """`open_service` under the data directory's shared lock (coap_auth.cli.data_lock), held
    until the service is closed: nothing reads or writes the store beside a restore, and a
    restore never replaces it under a running command. The lock comes first: a `serve`
    started during a restore once wrote a master key of its own into the new directory."""
    data_dir = settings.data_dir
    if create:
        with _private_umask():
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    else:
        _must_be_initialised(settings)  # before the lock file: nothing made in an empty one
    with data_lock.serving(data_dir):
        service = await open_service(settings, create=create)
        try:
            yield service
        finally:
            await service.store.close()


def _must_be_initialised(settings: Settings) -> None:
    data_dir = settings.data_dir
    initialised = (data_dir / DB_FILE).exists() if not settings.store else data_dir.is_dir()
    if not initialised:
        raise OperatorError(f"{data_dir} is not initialised: run `coap-auth init` first")


def with_service(fn: Callable[[argparse.Namespace, AuthService], Awaitable[int]]) -> Command:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        async with opened_service(settings) as service:
            return await fn(args, service)

    return run


async def coap_get(uri: str, timeout: float) -> aiocoap.Message:
    """GET `uri` over coap-auth's own client transport, answering an Echo challenge (RFC 9175
    §2.3: the service challenges an address it has not verified before a large answer);
    aiocoap fetches a block-wise answer whole. Raises TimeoutError past `timeout` s (the
    challenge and the repeat together), OSError or aiocoap's errors."""
    context = await create_client_context()
    try:
        _, response = await request_answering_echo(
            context, lambda: aiocoap.Message(code=aiocoap.GET, uri=uri), timeout=timeout
        )
    finally:
        await context.shutdown()
    return response


def seconds(text: str) -> float:
    """A `--timeout` argument: more than 0, at most a minute (a hostile server's endless
    block-wise answer is held until then)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 60 seconds")
    return value


def when(timestamp: int | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
