"""Issue 18: `coap-auth show keys` and `show trl` read /keys and the revocation list of a real
running service as text, and the CBOR diagnostic notation they print with --diag."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import aiocoap
import aiocoap.resource
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.cli.show import diagnostic
from coap_auth.coap.server import _bound_port
from coap_auth.echo import request_answering_echo
from coap_auth.tokens import token_hash
from coap_auth.udp import create_client_context, create_server_context
from coap_auth.wire import AceParam, ContentFormat
from tests.processes import CLI_TIMEOUT, COAP_AUTH, clean_env, cli_ok, provision, serve_process


def show(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COAP_AUTH, "show", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(),
        cwd=data_dir.parent,
    )


def show_ok(*args: str, data_dir: Path) -> str:
    result = show(*args, data_dir=data_dir)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def at(url: str) -> tuple[str, str, str, str]:
    port = urlsplit(url).port
    assert port is not None
    return ("--host", "127.0.0.1", "--port", str(port))


async def grant(url: str, secret: str) -> bytes:
    """An access token for sensor-1 over plain CoAP (the server runs in lab mode)."""
    body = {
        AceParam.CLIENT_ID: "sensor-1",
        AceParam.CLIENT_SECRET: secret,
        AceParam.AUDIENCE: "thermostat",
    }
    context = await create_client_context()
    try:

        def build() -> aiocoap.Message:
            return aiocoap.Message(
                code=aiocoap.POST,
                uri=f"{url}/token",
                payload=cbor2.dumps(body),
                content_format=ContentFormat.ACE_CBOR,
            )

        _, response = await request_answering_echo(context, build, timeout=10)
    finally:
        await context.shutdown()
    assert response.code == aiocoap.CREATED, response
    token = cbor2.loads(response.payload)[AceParam.ACCESS_TOKEN]
    assert isinstance(token, bytes)
    return token


def published_kids(data_dir: Path) -> set[str]:
    keys = json.loads(cli_ok("keys", "list", "--json", data_dir=data_dir))
    return {k["kid"] for k in keys if k["state"] in ("next", "active", "retiring")}


async def test_show_keys_prints_every_published_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    provision(data_dir)
    kids = published_kids(data_dir)
    assert len(kids) == 2  # the active key and the next one
    async with serve_process(data_dir, tmp_path / "serve.log") as server:
        text = show_ok("keys", *at(server.url), data_dir=data_dir)
        as_json = json.loads(show_ok("keys", *at(server.url), "--json", data_dir=data_dir))
        diag = show_ok("keys", *at(server.url), "--diag", data_dir=data_dir)

    assert f"{len(kids)} keys" in text.splitlines()[0]
    for kid in kids:
        assert f"kid {kid}  kty EC2  alg ES256  crv P-256  key_ops verify" in text
    assert {key["kid"] for key in as_json} == kids
    for key in as_json:
        assert (key["kty"], key["alg"], key["crv"], key["key_ops"]) == (
            "EC2",
            "ES256",
            "P-256",
            ["verify"],
        )
        # The coordinates printed are a point of P-256 (this raises otherwise)...
        x, y = int(key["x"], 16), int(key["y"], 16)
        ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        # ...and the text output prints the same ones.
        assert f"x {key['x']}" in text and f"y {key['y']}" in text
    # The diagnostic notation is the key set itself: reading it back gives the same kids.
    assert diag.startswith("[{") and diag.rstrip().endswith("}]")
    for kid in kids:
        assert f"2: h'{kid}'" in diag
    assert diag.count("3: -7") == len(kids)


async def test_show_trl_lists_revoked_hashes_as_tokens_revoke_takes_them(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    secret = provision(data_dir)
    async with serve_process(data_dir, tmp_path / "serve.log") as server:
        token = await grant(server.url, secret)
        kept = await grant(server.url, secret)
        empty = show_ok("trl", data_dir=data_dir)
        hash_hex = token_hash(token).hex()
        cli_ok("tokens", "revoke", "--hash", hash_hex, data_dir=data_dir)
        from_store = show_ok("trl", data_dir=data_dir)
        from_store_json = json.loads(show_ok("trl", "--json", data_dir=data_dir))
        over_coap = show_ok("trl", "--coap", *at(server.url), data_dir=data_dir)
        over_coap_diag = show_ok("trl", "--coap", "--diag", *at(server.url), data_dir=data_dir)

    assert empty.splitlines() == ["revocation list: 0 hashes, latest update 0 (no updates kept)"]
    assert len(hash_hex) == 66 and hash_hex.startswith("01")
    assert from_store.splitlines()[0] == (
        "revocation list: 1 hashes, latest update 1 (updates 1-1 kept)"
    )
    row = from_store.splitlines()[2].split()
    assert row[:2] == [hash_hex, "1"]
    assert from_store_json["hashes"][0]["hash"] == hash_hex
    assert from_store_json["hashes"][0]["update"] == 1
    assert token_hash(kept).hex() not in from_store
    assert over_coap.splitlines()[1:] == [hash_hex]
    assert over_coap_diag.strip() == f"{{0: [h'{hash_hex}'], 2: 0}}"
    # What `show trl` printed is what `tokens revoke --hash` takes: it names that token.
    again = subprocess.run(
        [COAP_AUTH, "tokens", "revoke", "--hash", row[0], "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(),
    )
    assert again.returncode == 2
    assert "no live, unrevoked access token" in again.stderr


async def test_show_trl_over_plain_coap_is_refused_when_oscore_is_required(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    provision(data_dir)
    async with serve_process(
        data_dir, tmp_path / "serve.log", COAP_AUTH_REQUIRE_OSCORE="true"
    ) as server:
        refused = show("trl", "--coap", *at(server.url), data_dir=data_dir)
        from_store = show("trl", data_dir=data_dir)
    assert refused.returncode == 2
    assert refused.stderr.startswith("coap-auth: error: coap://127.0.0.1:")
    assert "/revoke/trl answered 4.01 Unauthorized" in refused.stderr
    assert "coap-auth show trl" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and refused.stdout == ""
    assert from_store.returncode == 0  # the store's view needs no channel


def test_show_keys_with_nothing_answering_is_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers
        port = silent.getsockname()[1]
        result = show(
            "keys",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout",
            "0.5",
            data_dir=data_dir,
        )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"coap-auth: error: no answer from coap://127.0.0.1:{port}/keys within 0.5 s\n"
    )
    assert not data_dir.exists()  # reading over CoAP touches no data directory


class HostileKeys(aiocoap.resource.Resource):
    """What a hostile server (or one in the path) answers to GET /keys."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=self.payload, content_format=102)


def _cyclic() -> bytes:
    """A list holding itself, through CBOR's shared references (tags 28 and 29)."""
    return bytes([0xD8, 28, 0x81, 0xD8, 29, 0x00])


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (cbor2.dumps([{1: 2, 2: 10**5000}]), "cannot be shown"),  # str() of it refuses
        (_cyclic(), "cannot be shown"),
        (cbor2.dumps([{1: 2, 4: "not a list"}]), None),
        (cbor2.dumps([{1: 2, 2: "kid\n\x1b[2Jforged line", "\x9b\u202e": 1}]), None),
    ],
    ids=["huge-integer", "cyclic", "bad-key-ops", "terminal-escapes"],
)
async def test_show_keys_from_a_hostile_server_is_one_line_or_escaped(
    tmp_path: Path, payload: bytes, expected: str | None
) -> None:
    """Attack round 1 of issue 18: a server's /keys answer gave tracebacks (a huge integer, a
    cyclic structure, key_ops not a list) or wrote raw text to the terminal (newlines and
    escape sequences in a kid or a label)."""
    site = aiocoap.resource.Site()
    site.add_resource(["keys"], HostileKeys(payload))
    context = await create_server_context(site, ("127.0.0.1", 0))
    try:
        port = _bound_port(context)
        result = await asyncio.to_thread(
            show,
            "keys",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout",
            "5",
            data_dir=tmp_path / "data",
        )
    finally:
        await context.shutdown()
    assert "Traceback" not in result.stderr
    if expected is not None:
        assert result.returncode == 2
        assert result.stderr.startswith("coap-auth: error: ") and expected in result.stderr
        assert result.stderr.count("\n") == 1
        return
    assert result.returncode == 0, result.stderr
    for forbidden in ("\x1b", "\x9b", "\u202e"):
        assert forbidden not in result.stdout
    # A kid's newline is shown escaped, inside its line, never starting a forged one.
    if b"forged" in payload:
        assert 'kid "kid\\n\\u001b[2Jforged line"' in result.stdout.splitlines()[1]


@pytest.mark.parametrize("option", [("--timeout", "0"), ("--timeout", "soon"), ("--timeout", "61")])
def test_show_refuses_bad_timeouts(tmp_path: Path, option: tuple[str, str]) -> None:
    result = show("keys", *option, data_dir=tmp_path / "data")
    assert result.returncode == 2
    assert "--timeout" in result.stderr and "Traceback" not in result.stderr


def test_show_trl_diag_needs_coap(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cli_ok("init", data_dir=data_dir)
    result = show("trl", "--diag", data_dir=data_dir)
    assert (result.returncode, result.stderr) == (
        2,
        "coap-auth: error: --diag shows what came over CoAP: use it with --coap\n",
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (-7, "-7"),
        (2**64, "18446744073709551616"),
        (b"\x01\xab", "h'01ab'"),
        (b"", "h''"),
        ("temp:read", '"temp:read"'),
        ('quote " and \n', '"quote \\" and \\n"'),
        ("ü", '"ü"'),
        (True, "true"),
        (None, "null"),
        (cbor2.undefined, "undefined"),
        (1.5, "1.5"),
        (float("inf"), "Infinity"),
        (float("nan"), "NaN"),
        ([], "[]"),
        ({}, "{}"),
        ({1: [b"\x00", {"a": -1}], -2: False}, "{1: [h'00', {\"a\": -1}], -2: false}"),
        (
            cbor2.CBORTag(61, cbor2.CBORTag(18, [b"", {}, b"x", b""])),
            "61(18([h'', {}, h'78', h'']))",
        ),
        (cbor2.CBORSimpleValue(99), "simple(99)"),
    ],
)
def test_diagnostic_notation(value: object, text: str) -> None:
    # RFC 8949 §8 and Appendix G; checked against the printed form of what cbor2 decodes.
    assert diagnostic(value) == text
    assert diagnostic(cbor2.loads(cbor2.dumps(value))) == text
