"""A long token revocation list, and what one revocation costs the server with 1,000 observers
of `/revoke/trl` asking distinct queries.

The list is filled the way clients fill it: each of TRL_ENTRIES access tokens is issued over
`/token` and then revoked by its client over `/revoke` (lab mode: plain CoAP), so every entry
is its own update of the list (RFC 9770 §6.2) and a diff query sees a history, not one big
update. The observers (bench/fanout.py, each on its own loopback address) are unprotected
(lab mode), so each reads the whole list's history; observer i asks `?diff=i+1`. A diff value
above `trl_max_n` means `trl_max_n` (RFC 9770 §6.2.1), so those 1,000 queries are fewer
distinct answers: `distinct_shapes` says how many.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import cbor2

from bench import coap_wire as wire
from bench.fanout import FanOut, ObserverGroup, loopback_addresses, measure_fan_out
from bench.loadgen import TOKEN_OPTIONS, Endpoint, EndpointPool, token_request
from bench.processes import BENCH_SETTINGS, DataDir, ServerProcess, cpu_seconds
from coap_auth.config import load_settings
from coap_auth.tokens.token_hash import token_hash
from coap_auth.wire import AceParam, ContentFormat

TRL_ENTRIES = 1001
TRL_OBSERVERS = 1000
AUDIENCE = "thermostat"
REVOKE_OPTIONS = wire.request_options("/revoke", content_format=ContentFormat.ACE_CBOR)
CONCURRENCY = 32


async def issue(endpoint: Endpoint, data: DataDir) -> bytes:
    """A fresh access token for the bench client; raises RuntimeError if refused."""
    answer = await endpoint.exchange(
        wire.POST, TOKEN_OPTIONS, token_request(data.client_id, data.secret, AUDIENCE)
    )
    if answer.code != wire.CREATED:
        raise RuntimeError(f"/token answered {wire.code_text(answer.code)}")
    token: bytes = cbor2.loads(answer.payload)[AceParam.ACCESS_TOKEN]
    return token


async def revoke(endpoint: Endpoint, data: DataDir, token: bytes) -> None:
    """The client revokes its own token (RFC 7009 over CoAP); raises RuntimeError if refused."""
    body = cbor2.dumps(
        {AceParam.TOKEN: token, AceParam.CLIENT_ID: data.client_id,
         AceParam.CLIENT_SECRET: data.secret}
    )  # fmt: skip
    answer = await endpoint.exchange(wire.POST, REVOKE_OPTIONS, body)
    if answer.code != wire.CHANGED:
        raise RuntimeError(f"/revoke answered {wire.code_text(answer.code)}")


async def fill_trl(port: int, data: DataDir, count: int = TRL_ENTRIES) -> None:
    """Issue and revoke `count` tokens (CONCURRENCY at a time) through the server at `port`."""
    pool = EndpointPool("127.0.0.1", port)
    remaining = iter(range(count))

    async def worker(endpoint: Endpoint) -> None:
        for _ in remaining:
            await revoke(endpoint, data, await issue(endpoint, data))

    try:
        await asyncio.gather(*(worker(e) for e in await pool.take(CONCURRENCY)))
    finally:
        pool.close()


def diff_query(index: int) -> tuple[str, ...]:
    return (f"diff={index + 1}",)


def distinct_shapes(count: int) -> int:
    """How many different answers `count` observers asking diff=1..count get."""
    max_n = load_settings(env=BENCH_SETTINGS).trl_max_n
    return len({min(index + 1, max_n) for index in range(count)})


@dataclass(frozen=True)
class TrlFanOut:
    result: FanOut
    entries: int  # in the list before the revocation
    shapes: int  # distinct answers among the observers' queries
    register_seconds: float


async def measure_trl_fan_out(
    server: ServerProcess, data: DataDir, count: int = TRL_OBSERVERS, fetch_spread: float = 0.0
) -> TrlFanOut:
    """`count` observers with distinct diff queries on `server` (its list already filled);
    one revocation, as `coap-auth tokens revoke --hash` makes it, notified at once."""
    pool = EndpointPool("127.0.0.1", server.port)
    (endpoint,) = await pool.take(1)
    victim = await issue(endpoint, data)
    pool.close()
    group = ObserverGroup(
        "127.0.0.1",
        server.port,
        "/revoke/trl",
        query=diff_query,
        addresses=loopback_addresses(second_octet=4),
    )
    group.fetch_spread = fetch_spread
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await group.grow_to(count)
        registered = loop.time() - started
        await asyncio.sleep(1.0)  # let the registrations' own work settle

        async def revoke_one() -> tuple[float, float]:
            answer = await server.command(f"revoke {token_hash(victim).hex()}")
            return float(answer[1]), float(answer[2])

        result = await measure_fan_out(group, revoke_one, lambda: cpu_seconds(server.pid))
    finally:
        group.close()
    return TrlFanOut(result, TRL_ENTRIES, distinct_shapes(count), registered)
