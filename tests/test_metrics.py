"""Metrics and health (issue 18): the real server with its HTTP listener on a free port, real
CoAP traffic, /metrics scraped over HTTP and parsed with prometheus_client's own parser;
/healthz before and after the store fails; `coap-auth check` against a running `serve`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coap_auth import health
from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server, _bound_port
from coap_auth.config import Settings
from coap_auth.errors import OperatorError
from coap_auth.health import HealthSnapshot
from coap_auth.metrics import Metrics
from coap_auth.service import AuthService
from coap_auth.udp import create_server_context
from coap_auth.wire import AceParam, ContentFormat, GrantType
from tests.conftest import Coap
from tests.processes import (
    CLI_TIMEOUT,
    COAP_AUTH,
    clean_env,
    free_udp_port,
    provision,
    serve_process,
)

HTTP_TIMEOUT = 5


def free_tcp_port() -> int:
    """A TCP port free now (a parallel worker may take it first: a rare, loud failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings with the metrics listener on."""
    return dataclasses.replace(settings, metrics_port=free_tcp_port())


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and sorted labels."""
    assert server.monitoring is not None
    status, body = await asyncio.to_thread(http_get, server.monitoring.url + "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def credentials(coap: Coap) -> dict[int, Any]:
    return {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: coap.secrets["sensor-1"]}


async def grant(coap: Coap, audience: str) -> dict[int, Any]:
    response, body = await coap.post_ace(
        "/token", {**credentials(coap), AceParam.AUDIENCE: audience}
    )
    assert response.code == aiocoap.CREATED, body
    return body


async def refresh(coap: Coap, refresh_token: bytes) -> aiocoap.Message:
    body = {
        **credentials(coap),
        AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN,
        AceParam.REFRESH_TOKEN: refresh_token,
    }
    response, _ = await coap.post_ace("/token", body)
    return response


@pytest.fixture
async def observing(sensor: Coap) -> AsyncIterator[aiocoap.protocol.Request]:
    """An observer of /keys, registered."""
    message = aiocoap.Message(code=aiocoap.GET, uri=sensor.base + "/keys", observe=0)
    request = sensor.context.request(message)
    response = await request.response
    assert response.opt.observe is not None
    yield request
    request.observation.cancel()


async def test_a_scrape_after_traffic_counts_what_happened(
    sensor: Coap, observing: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cwt = await grant(sensor, "thermostat")
    await grant(sensor, "dashboard")  # a JWT audience
    assert (await refresh(sensor, cwt[AceParam.REFRESH_TOKEN])).code == aiocoap.CREATED
    sensor.service.clock.advance(60)  # past the grace window: presenting it again is reuse
    assert (await refresh(sensor, cwt[AceParam.REFRESH_TOKEN])).code == aiocoap.BAD_REQUEST
    bad = await sensor.request(aiocoap.POST, "/token", b"\xff not cbor", ContentFormat.ACE_CBOR)
    assert bad.code == aiocoap.BAD_REQUEST
    response, _ = await sensor.post_ace(
        "/revoke", {**credentials(sensor), AceParam.TOKEN: (await grant(sensor, "thermostat"))[1]}
    )
    assert response.code == aiocoap.CHANGED
    edhoc = await sensor.request(aiocoap.POST, "/.well-known/edhoc", b"\xf5 not message_1")
    assert edhoc.code == aiocoap.BAD_REQUEST
    await sensor.service.rotate_keys(force=True, actor="operator")
    await sensor.server.check_changes()  # what the next tick does: TRL and key set re-read

    samples = await scrape(sensor.server)

    token = "/token"
    assert value(samples, "coap_auth_requests_total", resource=token, code="2.01") == 4
    assert value(samples, "coap_auth_requests_total", resource=token, code="4.00") == 2
    assert value(samples, "coap_auth_requests_total", resource="/revoke", code="2.04") == 1
    assert value(samples, "coap_auth_requests_total", resource="/keys", code="2.05") == 1
    assert value(samples, "coap_auth_request_duration_seconds_count", resource=token) == 6
    grants = "coap_auth_grants_total"
    assert value(samples, grants, grant_type="client_credentials", token_format="cwt") == 2
    assert value(samples, grants, grant_type="client_credentials", token_format="jwt") == 1
    assert value(samples, grants, grant_type="refresh_token", token_format="cwt") == 1
    assert value(samples, "coap_auth_refreshes_total", outcome="rotated") == 1
    assert value(samples, "coap_auth_refreshes_total", outcome="reused") == 1
    assert value(samples, "coap_auth_refresh_reuse_detections_total") == 1
    assert value(samples, "coap_auth_family_kills_total", reason="reuse") == 1
    assert value(samples, "coap_auth_key_rotations_total", trigger="manual") == 1
    assert value(samples, "coap_auth_key_set_changes_total") == 1
    assert value(samples, "coap_auth_observers", resource="/keys") == 1
    assert value(samples, "coap_auth_observers", resource="/revoke/trl") == 0
    # The revoked token, and the two of the family the reuse killed.
    assert value(samples, "coap_auth_trl_hashes") == 3
    assert value(samples, "coap_auth_edhoc_handshakes_total", outcome="failed") == 1
    assert ("coap_auth_oscore_contexts", ()) in samples
    store = "coap_auth_store_operation_duration_seconds_count"
    assert value(samples, store, operation="start_family") == 3
    assert value(samples, store, operation="rotate_refresh") == 2
    assert value(samples, "coap_auth_store_errors_total", operation="rotate_refresh") == 0
    # Bounded labels only: no client id, address or token anywhere in the exposition.
    labels = {v for (_, pairs) in samples for (_, v) in pairs}
    assert not {v for v in labels if "sensor" in v or "127.0.0.1" in v or len(v) > 40}


async def test_healthz_answers_200_then_503_while_the_store_fails(sensor: Coap) -> None:
    assert sensor.server.monitoring is not None
    url = sensor.server.monitoring.url
    await grant(sensor, "thermostat")
    status, body = await asyncio.to_thread(http_get, url + "/healthz")
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"
    assert (await asyncio.to_thread(http_get, url + "/other"))[0] == 404

    connection = sensor.service.store.inner.database.connection  # type: ignore[attr-defined]
    connection.execute("PRAGMA query_only=ON")  # SQLITE_READONLY on the next write
    try:
        response, _ = await sensor.post_ace(
            "/token", {**credentials(sensor), AceParam.AUDIENCE: "thermostat"}
        )
        assert response.code == aiocoap.SERVICE_UNAVAILABLE
        status, body = await asyncio.to_thread(http_get, url + "/healthz")
        assert status == 503
        document = json.loads(body)
        assert document["status"] == "unavailable"
        assert document["problems"] == ["store failed 0 s ago"]
    finally:
        connection.execute("PRAGMA query_only=OFF")
    samples = await scrape(sensor.server)
    errors = "coap_auth_store_errors_total"
    assert value(samples, errors, operation="start_family", error="unavailable") == 1
    # Healthy again once the failure is older than the window and the store answers.
    sensor.service.clock.advance(31)
    await grant(sensor, "thermostat")
    assert (await asyncio.to_thread(http_get, url + "/healthz"))[0] == 200


def test_health_names_a_silent_store_and_a_missing_signing_key() -> None:
    """What the event loop's snapshot says when the store stops answering or no key can sign
    (the key schedule never leaves a family without an active key: the snapshot is driven
    directly here)."""
    clock = SettableClock()
    metrics = Metrics()
    health = HealthSnapshot(metrics, clock.now, silence_limit=60)
    assert health.problems() == ["store has not answered yet", "no active signing key"]
    metrics.store_answered_at = clock.now()
    health.active_key = True
    assert health.body() == (True, health.body()[1])
    assert json.loads(health.body()[1])["status"] == "ok"
    clock.advance(61)
    assert health.problems() == ["store has not answered for 61 s"]
    healthy, body = health.body()
    assert not healthy and json.loads(body)["store_answered_ago"] == 61


async def test_the_listener_binds_loopback_by_default_and_is_off_without_a_port(
    service: AuthService, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert Settings().metrics_bind == "127.0.0.1" and Settings().metrics_port == 0
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    try:
        assert server.monitoring is not None
        assert server.monitoring.addresses == ["127.0.0.1"]
        assert "beyond this host" not in caplog.text
    finally:
        await server.stop()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(urllib.request.urlopen, server.monitoring.url, None, 2)

    service.settings = dataclasses.replace(settings, metrics_port=0)
    off = Server(service, "127.0.0.1", 0)
    await off.start()
    try:
        assert off.monitoring is None
    finally:
        await off.stop()


async def test_a_wildcard_bind_warns_and_a_taken_port_fails_in_one_line(
    service: AuthService, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    service.settings = dataclasses.replace(settings, metrics_bind="0.0.0.0")
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    try:
        assert "beyond this host" in caplog.text
        assert server.monitoring is not None
        port = server.monitoring.port
        service.settings = dataclasses.replace(settings, metrics_port=port)
        second = Server(service, "127.0.0.1", 0)
        with pytest.raises(OperatorError) as refused:
            await second.start()
        await second.stop()
        assert refused.value.description == (
            f"cannot listen for metrics on 127.0.0.1:{port}: Address already in use"
        )
    finally:
        await server.stop()


def check(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COAP_AUTH, "check", "--bind", "127.0.0.1", "--timeout", "0.5", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(**settings),
    )


async def test_check_passes_against_serve_and_fails_when_nothing_listens(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    provision(data_dir)
    metrics_port = str(free_tcp_port())
    async with serve_process(
        data_dir, tmp_path / "serve.log", COAP_AUTH_METRICS_PORT=metrics_port
    ) as server:
        port = server.url.rsplit(":", 1)[1]
        result = await asyncio.to_thread(check, "--port", port, COAP_AUTH_METRICS_PORT=metrics_port)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("coap-auth check: ok: ")
        assert f"http://127.0.0.1:{metrics_port}/healthz healthy" in lines[0]
        assert f"coap://127.0.0.1:{port}/.well-known/core answered 2.05" in lines[0]

    nothing = str(free_udp_port())
    result = await asyncio.to_thread(check, "--port", nothing)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [result.stdout.strip()]
    assert f"FAILED: no CoAP answer from coap://127.0.0.1:{nothing}/.well-known/core" in (
        result.stdout
    )
    # With metrics_port set, the health listener that is not there is named first.
    result = await asyncio.to_thread(check, "--port", nothing, COAP_AUTH_METRICS_PORT=metrics_port)
    assert result.returncode == 1
    assert f"nothing answers at http://127.0.0.1:{metrics_port}/healthz" in result.stdout

    bad = await asyncio.to_thread(check, "--port", nothing, COAP_AUTH_METRICS_PORT="99999")
    assert bad.returncode == 2 and bad.stderr.startswith("coap-auth: error: ")
    assert len(bad.stderr.splitlines()) == 1


async def test_check_answers_the_echo_challenge_of_a_service_that_does_not_know_it(
    tmp_path: Path,
) -> None:
    """A service bound to one of the host's public addresses has not verified the address
    `check` asks from, and answers /.well-known/core (too large to send unasked, 3x rule)
    with an Echo challenge: check took that 4.01 for a failure. Here loopback is not
    verified either (verified_networks empty)."""
    data_dir = tmp_path / "data"
    provision(data_dir)
    async with serve_process(
        data_dir, tmp_path / "serve.log", COAP_AUTH_VERIFIED_NETWORKS=""
    ) as server:
        port = server.url.rsplit(":", 1)[1]
        result = await asyncio.to_thread(check, "--port", port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/.well-known/core answered 2.05" in result.stdout


async def test_check_is_not_fooled_by_another_listener(tmp_path: Path) -> None:
    """Attack round 1: any HTTP 200 on the metrics port and any 2.xx CoAP answer made `check`
    say ok with the service down. It wants coap-auth's health document and its </token>."""

    async def any_200(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    http = await asyncio.start_server(any_200, "127.0.0.1", 0)
    site = aiocoap.resource.Site()
    site.add_resource(
        [".well-known", "core"], aiocoap.resource.WKCResource(site.get_resources_as_linkheader)
    )
    site.add_resource(["status"], aiocoap.resource.Resource())
    coap = await create_server_context(site, ("127.0.0.1", 0))
    try:
        http_port = str(http.sockets[0].getsockname()[1])
        coap_port = str(_bound_port(coap))
        fooled = await asyncio.to_thread(check, "--port", coap_port)
        assert fooled.returncode == 1 and "lists no </token>" in fooled.stdout
        fooled = await asyncio.to_thread(
            check, "--port", coap_port, COAP_AUTH_METRICS_PORT=http_port
        )
        assert fooled.returncode == 1 and "not coap-auth's health document" in fooled.stdout
    finally:
        http.close()
        await coap.shutdown()


async def test_a_request_costs_little_in_metrics(service: AuthService) -> None:
    """The hot path: one request's count and latency, well under the ~0.5 ms a CoAP request
    costs the stack (measured, not assumed)."""
    import time

    metrics = service.metrics
    metrics.request("/token", "2.01", 0.001)
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        metrics.request("/token", "2.01", 0.001)
    per_request = (time.perf_counter() - started) / rounds
    assert per_request < 20e-6, per_request


async def test_the_listener_bounds_what_a_client_can_make_it_hold(
    service: AuthService, settings: Settings
) -> None:
    """Attack round 1 of issue 18: header lines of 64 KiB kept in memory (10 connections:
    +300 MB) and a thread per idle connection, without a time limit. Now a request's head is
    at most REQUEST_LIMIT bytes, and at most MAX_CONNECTIONS are open at once."""
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    idle: list[asyncio.StreamWriter] = []
    try:
        assert server.monitoring is not None and server.monitoring.port is not None
        port = server.monitoring.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"x" * (health.REQUEST_LIMIT + 1))
        assert await _closed_unanswered(reader)
        writer.close()
        readers = []
        for _ in range(health.MAX_CONNECTIONS):
            held_reader, held = await asyncio.open_connection("127.0.0.1", port)
            held.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
            readers.append(held_reader)
            idle.append(held)
        for _ in range(100):  # the listener has taken them all
            if server.monitoring._open == health.MAX_CONNECTIONS:
                break
            await asyncio.sleep(0.01)
        assert server.monitoring._open == health.MAX_CONNECTIONS
        # Past the bound, a scrape still gets its answer (round 2: idle connections held
        # renewed kept every scrape out): the oldest idle one gave way.
        status, body = await asyncio.to_thread(http_get, server.monitoring.url + "/metrics")
        assert status == 200 and b"coap_auth_requests_total" in body
        assert await _closed_unanswered(readers[0])
        assert server.monitoring._open <= health.MAX_CONNECTIONS
    finally:
        for held in idle:
            held.close()
        await server.stop()


async def _closed_unanswered(reader: asyncio.StreamReader) -> bool:
    """The listener closed the connection without an answer (a reset when it left our
    request unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True
