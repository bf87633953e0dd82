"""The server under test: what `coap-auth serve` runs, plus a bench-only `/noop` resource.

Run as `python -m bench.server --data-dir D --port P`. Same settings, logging and `Server` as
`coap-auth serve`; `/noop` answers a POST like /token does (2.01, a token-sized ACE body)
without doing anything, so its rate is the CoAP stack's own ceiling in the same process.
`/floor` does what no grant can skip and nothing else: an ES256 signature and one durable row
through the store's group commit, then the same answer (the floor under a grant's cost).
Driven over stdin, one command a line; answers on stdout:
  rss     -> "rss <bytes>" after a garbage collection
  rotate  -> force a key rotation and notify observers: "rotated <t0> <t1> <t2>"
             (time.monotonic() before the rotation, after the store commit, after notifying)
  revoke H -> revoke the access token whose hash (hex) is H, as `coap-auth tokens revoke
             --hash` does, and notify observers at once (not at the next change poll):
             "revoked <t0> <t1> <t2>"
  heap-mark -> "marked": remember a tracemalloc snapshot (the server must run with
             PYTHONTRACEMALLOC set; an experiment, not part of `make bench`)
  heap-diff [lineno|filename] -> one line of JSON: the total growth of traced allocations
             since the mark (bytes), then the 15 source lines (or files) that grew most
  quit
Anything else -> "error: ...".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

import aiocoap
import cbor2
from aiocoap import resource
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.cli.runtime import configure_logging, open_service
from coap_auth.coap.options import OptionCheckingSite
from coap_auth.coap.server import Server
from coap_auth.config import load_settings
from coap_auth.store.sqlite_base import SqliteDatabase

# About the size of a real /token answer: a ~150-byte CWT, expires_in, token_type, refresh token.
NOOP_BODY = cbor2.dumps({1: bytes(150), 2: 3600, 34: 1, 37: bytes(32)})


class NoopResource(resource.Resource):
    """Answers POST with 2.01 and a fixed token-sized body; parses nothing, stores nothing."""

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CREATED, payload=NOOP_BODY, content_format=19)


class FloorResource(resource.Resource):
    """Answers POST as /noop does after an ES256 signature over a token-sized payload and one
    durable row through the SQLite store's group commit (a commit with fsync, shared by the
    writes queued with it, as a grant's): the work no grant can leave out. It parses,
    authenticates, encodes and logs nothing."""

    def __init__(self, database: SqliteDatabase) -> None:
        super().__init__()
        self._database = database
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._algorithm = ec.ECDSA(hashes.SHA256())

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        row = (self._key.sign(NOOP_BODY, self._algorithm),)
        await self._database.write(lambda conn: conn.execute(FLOOR_INSERT, row))
        return aiocoap.Message(code=aiocoap.CREATED, payload=NOOP_BODY, content_format=19)


# /floor's rows go to a database file of their own, attached to the store's writer connection:
# the store's file holds only what coap-auth makes (it refuses to open otherwise). Its commits
# are as durable as the store's (WAL, synchronous=FULL).
FLOOR_SETUP = (
    "ATTACH DATABASE ? AS bench",
    "PRAGMA bench.journal_mode=WAL",
    "PRAGMA bench.synchronous=FULL",
    "CREATE TABLE IF NOT EXISTS bench.floor (signature BLOB NOT NULL)",
)
FLOOR_INSERT = "INSERT INTO bench.floor (signature) VALUES (?)"


async def attach_floor(database: SqliteDatabase, path: Path) -> None:
    def attach() -> None:
        conn = database.connection
        conn.execute(FLOOR_SETUP[0], (str(path),))
        for statement in FLOOR_SETUP[1:]:
            conn.execute(statement)

    await database.run(attach)


def resources_site(server: Server) -> OptionCheckingSite:
    """The site holding the resources, inside the wrappers (AmplificationGuard, ProtectedSite)
    in front of it; raises LookupError if there is none."""
    site = server._site
    for _ in range(8):
        if isinstance(site, OptionCheckingSite):
            return site
        inner = vars(site).get("site") or vars(site).get("_inner_site")
        if inner is None:
            break
        site = inner
    raise LookupError("no OptionCheckingSite behind the server's site")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def serve(data_dir: Path, port: int) -> None:
    # The environment is the one bench/processes.py gives: defaults plus BENCH_SETTINGS.
    settings = load_settings(flags={"data_dir": data_dir, "bind": "127.0.0.1", "port": port})
    # As `coap-auth serve` does (coap_auth/cli/__init__.py: cmd_serve).
    configure_logging(settings)
    service = await open_service(settings, create=True)
    server = Server(service, settings.bind, settings.port)
    # Bench only: the product's site never has /noop. It goes on the site inside the OSCORE
    # wrapper, where /token is, so that a plain /noop takes the same path as a plain /token.
    resources_site(server).add_resource(["noop"], NoopResource())
    database = service.store.inner.database  # the bench server runs on SQLite
    await attach_floor(database, data_dir / "bench-floor.sqlite3")
    resources_site(server).add_resource(["floor"], FloorResource(database))
    await server.start()
    print(f"listening {server.port}", flush=True)

    mark: tracemalloc.Snapshot | None = None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "rss":
                gc.collect()
                print(f"rss {rss_bytes()}", flush=True)
            elif line == "rotate":
                t0 = time.monotonic()
                await service.rotate_keys(force=True, actor="operator")
                t1 = time.monotonic()
                await server.check_changes()
                t2 = time.monotonic()
                print(f"rotated {t0} {t1} {t2}", flush=True)
            elif line.startswith("revoke "):
                t0 = time.monotonic()
                await service.revoke_token_hash(bytes.fromhex(line.split()[1]), actor="operator")
                t1 = time.monotonic()
                await server.check_changes()
                t2 = time.monotonic()
                print(f"revoked {t0} {t1} {t2}", flush=True)
            elif line.startswith("heap") and not tracemalloc.is_tracing():
                print("error: run the server with PYTHONTRACEMALLOC set", flush=True)
            elif line == "heap-mark":
                gc.collect()
                mark = tracemalloc.take_snapshot()
                print("marked", flush=True)
            elif line.startswith("heap-diff") and mark is not None:
                gc.collect()
                key = (line.split()[1:] or ["lineno"])[0]
                stats = tracemalloc.take_snapshot().compare_to(mark, key)
                top = [[str(s.traceback[0]), s.size_diff, s.count_diff] for s in stats[:15]]
                print(json.dumps([sum(s.size_diff for s in stats), top]), flush=True)
            elif line == "quit":
                break
            else:
                print(f"error: unknown command (or heap-diff before heap-mark): {line}", flush=True)
    finally:
        await server.stop()
        await service.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.data_dir, args.port))


if __name__ == "__main__":
    main()
