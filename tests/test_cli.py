"""The installed `coap-auth` command, driven as a subprocess the way an operator runs it.

Integers are the docs/protocol.md numbers, written out here on purpose (not taken from
coap_auth.wire) so a wrong constant in the code cannot hide behind the same constant here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.processes import (
    LISTENING_LINE,
    SECRET_LINE,
    add_secret_client,
    clean_env,
    cli_ok,
    provision,
    run_cli,
    serve_argv,
)

STARTUP_TIMEOUT = 15  # s, until `serve` prints its listening line
NOTIFY_TIMEOUT = 10  # s, for an Observe notification or a CoAP response
EXIT_TIMEOUT = 10  # s, for `serve` to exit after SIGTERM

# docs/protocol.md numbers
CF_ACE_CBOR = 19
CF_COSE_KEY_SET = 102
CLIENT_ID, CLIENT_SECRET, ACCESS_TOKEN = 24, 25, 1
TAG_CWT, TAG_COSE_SIGN1 = 61, 18
HDR_ALG, HDR_KID = 1, 4
COSE_KEY_KID = 2
ES256 = -7


# -- helpers ------------------------------------------------------------------------------------


def list_json(what: str, data_dir: Path) -> list[dict[str, Any]]:
    rows = json.loads(cli_ok(what, "list", "--json", data_dir=data_dir))
    assert isinstance(rows, list)
    return rows


def keys_by_state(data_dir: Path) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for row in list_json("keys", data_dir):
        states.setdefault(row["state"], []).append(row["kid"])
    return states


def write_public_pem(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def token_kid(access_token: bytes) -> str:
    """The kid (text form: hex) in the protected header of a tagged CWT, checking its shape."""
    outer = cbor2.loads(access_token)
    assert isinstance(outer, cbor2.CBORTag) and outer.tag == TAG_CWT
    inner = outer.value
    assert isinstance(inner, cbor2.CBORTag) and inner.tag == TAG_COSE_SIGN1
    protected_bstr, unprotected, _payload, signature = inner.value
    assert unprotected == {}
    assert isinstance(signature, bytes) and len(signature) == 64
    protected = cbor2.loads(protected_bstr)
    assert protected[HDR_ALG] == ES256
    return protected[HDR_KID].hex()


def key_set_kids(payload: bytes) -> set[str]:
    key_set = cbor2.loads(payload)
    assert isinstance(key_set, list)
    return {cose_key[COSE_KEY_KID].hex() for cose_key in key_set}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="module")
def registered_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Built once per module by the CLI: init, audience `thermostat` (bearer tokens: a secret
    client has no key to bind them to), secret client `sensor-1`."""
    data_dir = tmp_path_factory.mktemp("template") / "data"
    return data_dir, provision(
        data_dir, "--profile", "bearer", "--token-format", "cwt", "--lifetime", "600"
    )


@pytest.fixture
def registered(registered_template: tuple[Path, str], data_dir: Path) -> tuple[Path, str]:
    """A private copy of the template data dir (no CLI process holds it open)."""
    template, secret = registered_template
    shutil.copytree(template, data_dir)
    return data_dir, secret


# -- init ---------------------------------------------------------------------------------------


def test_init_creates_private_data_dir_and_prints_active_kid(data_dir: Path) -> None:
    assert not data_dir.exists()
    stdout = cli_ok("init", data_dir=data_dir)

    master_key = data_dir / "master.key"
    assert stat.S_IMODE(master_key.stat().st_mode) == 0o600
    assert len(master_key.read_bytes()) == 32
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
    states = keys_by_state(data_dir)
    assert len(states["active"]) == 1 and len(states["next"]) == 1
    assert states["active"][0] in stdout
    assert states["next"][0] not in stdout


def test_init_again_changes_nothing(data_dir: Path) -> None:
    cli_ok("init", data_dir=data_dir)
    keys_before = list_json("keys", data_dir)
    master_key_before = (data_dir / "master.key").read_bytes()

    stdout = cli_ok("init", data_dir=data_dir)

    assert "already initialised" in stdout
    assert list_json("keys", data_dir) == keys_before
    assert (data_dir / "master.key").read_bytes() == master_key_before


# -- audiences and clients ----------------------------------------------------------------------


def test_secret_client_is_printed_once_and_never_listed(registered: tuple[Path, str]) -> None:
    data_dir, secret = registered
    # 128 bits of randomness need at least 22 base64url characters.
    assert len(secret) >= 22
    assert re.fullmatch(r"[A-Za-z0-9_-]+", secret), "secret is not base64url text"
    assert add_secret_client(data_dir, "sensor-2") != secret

    listings = {
        what: cli_ok(what, "list", "--json", data_dir=data_dir)
        for what in ("clients", "audiences", "keys")
    }
    for what, text in listings.items():
        json.loads(text)
        assert secret not in text, f"`{what} list` shows the secret"
    assert secret not in cli_ok("clients", "list", data_dir=data_dir)

    audiences = list_json("audiences", data_dir)
    assert [(a["audience_id"], a["token_format"], a["lifetime"]) for a in audiences] == [
        ("thermostat", "cwt", 600)
    ]
    clients = {c["client_id"]: c for c in list_json("clients", data_dir)}
    assert clients["sensor-1"]["audiences"] == ["thermostat"]
    assert clients["sensor-1"]["scope"] == "temp:read"
    assert clients["sensor-1"]["auth"] == "secret"
    assert clients["sensor-1"]["disabled"] is False


def test_disable_client(registered: tuple[Path, str]) -> None:
    data_dir, _ = registered
    add_secret_client(data_dir, "sensor-2")

    cli_ok("clients", "disable", "sensor-1", data_dir=data_dir)

    disabled = {c["client_id"]: c["disabled"] for c in list_json("clients", data_dir)}
    assert disabled == {"sensor-1": True, "sensor-2": False}


def test_disable_unknown_client_fails(registered: tuple[Path, str]) -> None:
    data_dir, _ = registered
    before = list_json("clients", data_dir)
    result = run_cli("clients", "disable", "no-such-client", data_dir=data_dir)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert list_json("clients", data_dir) == before


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="p256"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, id="ed25519"),
    ],
)
def test_public_key_client(registered: tuple[Path, str], tmp_path: Path, make_key: Any) -> None:
    data_dir, _ = registered
    pem = write_public_pem(tmp_path / "device.pem", make_key())

    stdout = cli_ok(
        "clients",
        "add",
        "sensor-pk",
        "--audience",
        "thermostat",
        "--scope",
        "temp:read",
        "--public-key",
        pem,
        data_dir=data_dir,
    )

    assert not any(SECRET_LINE.match(line) for line in stdout.splitlines())
    clients = {c["client_id"]: c for c in list_json("clients", data_dir)}
    assert clients["sensor-pk"]["auth"] == "public-key"
    assert clients["sensor-pk"]["disabled"] is False


def _add_args(*auth: str, client_id: str = "sensor-x", audience: str = "thermostat") -> list[str]:
    return [client_id, "--audience", audience, "--scope", "temp:read", *auth]


def _missing_file(tmp_path: Path) -> list[str]:
    return _add_args("--public-key", str(tmp_path / "no-such.pem"))


def _directory(tmp_path: Path) -> list[str]:
    return _add_args("--public-key", str(tmp_path))


def _not_pem(tmp_path: Path) -> list[str]:
    path = tmp_path / "not.pem"
    path.write_text("this is not a PEM public key\n")
    return _add_args("--public-key", str(path))


def _private_pem(tmp_path: Path) -> list[str]:
    path = tmp_path / "private.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return _add_args("--public-key", str(path))


def _curve_key(curve: ec.EllipticCurve, name: str) -> Callable[[Path], list[str]]:
    def args(tmp_path: Path) -> list[str]:
        pem = write_public_pem(tmp_path / name, ec.generate_private_key(curve))
        return _add_args("--public-key", str(pem))

    return args


def _unknown_audience(tmp_path: Path) -> list[str]:
    return _add_args("--secret", audience="no-such-audience")


def _duplicate_id(tmp_path: Path) -> list[str]:
    return _add_args("--secret", client_id="sensor-1")


def _control_character_id(tmp_path: Path) -> list[str]:
    # The service refuses control characters on the wire: such a client could never log in.
    return _add_args("--secret", client_id="sensor\nforged")


def _control_character_scope(tmp_path: Path) -> list[str]:
    return ["sensor-x", "--audience", "thermostat", "--scope", "temp:read\x01", "--secret"]


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(_missing_file, id="unreadable-path"),
        pytest.param(_directory, id="directory-as-key-file"),
        pytest.param(_not_pem, id="not-pem"),
        pytest.param(_private_pem, id="private-key-pem"),
        pytest.param(_unknown_audience, id="unknown-audience"),
        pytest.param(_duplicate_id, id="duplicate-id"),
        pytest.param(_control_character_id, id="control-character-id"),
        pytest.param(_control_character_scope, id="control-character-scope"),
        pytest.param(_curve_key(ec.SECP384R1(), "p384.pem"), id="p384-key"),
        pytest.param(_curve_key(ec.SECP256K1(), "k1.pem"), id="secp256k1-key"),
    ],
)
def test_bad_client_add_fails_with_one_line_and_changes_nothing(
    registered: tuple[Path, str], tmp_path: Path, make_args: Any
) -> None:
    data_dir, secret = registered
    before = list_json("clients", data_dir)

    result = run_cli("clients", "add", *make_args(tmp_path), data_dir=data_dir)

    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert secret not in result.stdout + result.stderr
    assert not any(SECRET_LINE.match(line) for line in result.stdout.splitlines())
    assert list_json("clients", data_dir) == before


@pytest.mark.parametrize("exists", [False, True], ids=["missing-dir", "empty-dir"])
def test_command_on_uninitialised_data_dir_fails_and_creates_nothing(
    tmp_path: Path, exists: bool
) -> None:
    data_dir = tmp_path / "never-initialised"
    if exists:
        data_dir.mkdir()

    result = run_cli("clients", "list", "--json", data_dir=data_dir)

    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "init" in result.stderr
    if exists:
        assert list(data_dir.iterdir()) == []
    else:
        assert not data_dir.exists()


# -- serve --------------------------------------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    data_dir: Path
    secret: str
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def base(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def wait_for_line(self, expected: str | re.Pattern[str], timeout: float) -> str:
        """The first line equal to `expected` (or that it matches, if a pattern)."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break  # stdout closed: the process ended
            seen.append(line)
            if line == expected if isinstance(expected, str) else expected.match(line):
                return line
        raise AssertionError(f"no line {expected!r} within {timeout} s; stdout: {seen}")


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


@pytest.fixture
def served(registered: tuple[Path, str], tmp_path: Path) -> Iterator[Served]:
    """`coap-auth serve` on 127.0.0.1 and a free port, as a subprocess: port 0, the one the
    system picks, which the listening line gives (a port picked here and bound later by the
    server could be taken in between, by another test worker)."""
    data_dir, secret = registered
    stderr_log = (tmp_path / "serve.stderr").open("w")
    process = subprocess.Popen(
        serve_argv(data_dir, 0),
        stdout=subprocess.PIPE,
        stderr=stderr_log,
        text=True,
        # The v1 secret client, on plain CoAP (lab mode); tests/secure/ covers the default.
        env=clean_env(COAP_AUTH_REQUIRE_OSCORE="false"),
        cwd=tmp_path,
    )
    handle = Served(process, 0, data_dir, secret)
    threading.Thread(target=_pump, args=(process.stdout, handle.lines), daemon=True).start()
    try:
        listening = LISTENING_LINE.match(handle.wait_for_line(LISTENING_LINE, STARTUP_TIMEOUT))
        assert listening is not None
        handle.port = int(listening.group(2))
        yield handle
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=EXIT_TIMEOUT)
        stderr_log.close()


def test_serve_does_not_listen_on_tcp(served: Served) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", served.port), timeout=1).close()
    assert served.process.poll() is None, "server died"


async def _request_token(ctx: aiocoap.Context, served: Served) -> aiocoap.Message:
    message = aiocoap.Message(
        code=aiocoap.POST,
        uri=f"{served.base}/token",
        payload=cbor2.dumps({CLIENT_ID: "sensor-1", CLIENT_SECRET: served.secret}),
        content_format=CF_ACE_CBOR,
    )
    return await asyncio.wait_for(ctx.request(message).response, NOTIFY_TIMEOUT)


async def _token_kid(ctx: aiocoap.Context, served: Served) -> str:
    response = await _request_token(ctx, served)
    assert response.code == aiocoap.CREATED, (response.code, response.payload)
    assert response.opt.content_format == CF_ACE_CBOR
    return token_kid(cbor2.loads(response.payload)[ACCESS_TOKEN])


async def test_serve_issues_tokens_and_follows_cli_key_rotation(served: Served) -> None:
    data_dir = served.data_dir
    before = keys_by_state(data_dir)
    (old_active,), (old_next,) = before["active"], before["next"]

    ctx = await aiocoap.Context.create_client_context()
    try:
        observe = aiocoap.Message(code=aiocoap.GET, uri=f"{served.base}/keys", observe=0)
        request = ctx.request(observe)
        first = await asyncio.wait_for(request.response, NOTIFY_TIMEOUT)
        assert first.code == aiocoap.CONTENT
        assert first.opt.content_format == CF_COSE_KEY_SET
        assert first.opt.observe is not None, "/keys did not accept the observation"
        assert key_set_kids(first.payload) == {old_active, old_next}
        notifications = aiter(request.observation)

        assert await _token_kid(ctx, served) == old_active

        # The next key was published moments ago: rotating now could hand devices a token
        # whose kid they have not seen, so the CLI refuses and changes nothing...
        early = await asyncio.to_thread(run_cli, "keys", "rotate", data_dir=data_dir)
        assert early.returncode == 2 and "lead" in early.stderr, early.stderr
        assert len(early.stderr.strip().splitlines()) == 1
        assert await asyncio.to_thread(keys_by_state, data_dir) == before
        # ...unless forced. The operator rotates while the server runs; only the store
        # connects the two.
        rotated = await asyncio.to_thread(run_cli, "keys", "rotate", "--force", data_dir=data_dir)
        assert rotated.returncode == 0, rotated.stderr
        after = await asyncio.to_thread(keys_by_state, data_dir)
        (new_active,), (new_next,) = after["active"], after["next"]
        assert new_active == old_next
        assert after["retiring"] == [old_active]
        assert new_next not in {old_active, old_next}

        async def notified_kids() -> set[str]:
            # The iterator was made before the rotation (so nothing is missed); aiocoap's
            # iterator has __anext__ but no __aiter__, hence anext() rather than `async for`.
            while True:
                try:
                    notification = await anext(notifications)
                except StopAsyncIteration:
                    raise AssertionError("observation of /keys ended") from None
                assert notification.code == aiocoap.CONTENT
                kids = key_set_kids(notification.payload)
                if new_next in kids:
                    return kids

        kids = await asyncio.wait_for(notified_kids(), NOTIFY_TIMEOUT)
        # The retiring key stays published: tokens it signed are still valid.
        assert kids == {old_active, new_active, new_next}

        # The notification is rendered from the reloaded key ring, so the next token
        # must already be signed by the new active key.
        assert await _token_kid(ctx, served) == new_active

        # Compromise: the operator revokes the active key; it vanishes from the set at once
        # and the (already published) next key signs from now on.
        revoked = await asyncio.to_thread(run_cli, "keys", "revoke", new_active, data_dir=data_dir)
        assert revoked.returncode == 0, revoked.stderr

        async def notified_without_revoked() -> set[str]:
            while True:
                kids = key_set_kids((await anext(notifications)).payload)
                if new_active not in kids:
                    return kids

        kids = await asyncio.wait_for(notified_without_revoked(), NOTIFY_TIMEOUT)
        assert new_next in kids and old_active in kids
        assert await _token_kid(ctx, served) == new_next
    finally:
        await ctx.shutdown()

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=EXIT_TIMEOUT) == 0
    served.wait_for_line("coap-auth stopping", timeout=EXIT_TIMEOUT)


async def test_cli_lists_and_revokes_refresh_families(served: Served) -> None:
    ctx = await aiocoap.Context.create_client_context()
    try:
        for _ in range(2):
            response = await _request_token(ctx, served)
            assert response.code == aiocoap.CREATED
        refresh_token = cbor2.loads(response.payload)[37]
    finally:
        await ctx.shutdown()
    families = json.loads(
        cli_ok("tokens", "families", "--client", "sensor-1", "--json", data_dir=served.data_dir)
    )
    assert len(families) == 2 and {f["client_id"] for f in families} == {"sensor-1"}
    assert refresh_token.hex() not in json.dumps(families)

    out = cli_ok("tokens", "revoke-family", "--client", "sensor-1", data_dir=served.data_dir)
    assert out.startswith("2 refresh families of sensor-1 revoked")
    assert json.loads(cli_ok("tokens", "families", "--json", data_dir=served.data_dir)) == []

    bad = run_cli("tokens", "revoke-family", "--client", "ghost", data_dir=served.data_dir)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


async def test_cli_revokes_a_token_by_hash_and_trl_observers_hear_it(served: Served) -> None:
    ctx = await aiocoap.Context.create_client_context()
    try:
        response = await _request_token(ctx, served)
        access_token = cbor2.loads(response.payload)[ACCESS_TOKEN]
        # RFC 9770 §4, written out: 0x01 || SHA-256(base64url without padding).
        text = base64.urlsafe_b64encode(access_token).rstrip(b"=")
        token_hash = b"\x01" + hashlib.sha256(text).digest()

        observe = aiocoap.Message(code=aiocoap.GET, uri=f"{served.base}/revoke/trl", observe=0)
        request = ctx.request(observe)
        first = await asyncio.wait_for(request.response, NOTIFY_TIMEOUT)
        assert first.opt.content_format == 262 and cbor2.loads(first.payload)[0] == []
        notifications = aiter(request.observation)

        bad = await asyncio.to_thread(
            run_cli, "tokens", "revoke", "--hash", "01" + "ab" * 32, data_dir=served.data_dir
        )
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
        out = await asyncio.to_thread(
            cli_ok, "tokens", "revoke", "--hash", token_hash.hex(), data_dir=served.data_dir
        )
        assert out.strip() == f"access token {token_hash.hex()} revoked"
        update = await asyncio.wait_for(anext(notifications), NOTIFY_TIMEOUT)
        assert cbor2.loads(update.payload)[0] == [token_hash]
    finally:
        await ctx.shutdown()
    tail = json.loads(cli_ok("audit", "tail", "-n", "1", "--json", data_dir=served.data_dir))
    assert tail[0]["event"] == "token.revoked" and tail[0]["subject"] == token_hash.hex()
    assert access_token.hex() not in json.dumps(tail)


def test_audience_with_own_symmetric_keys_and_introspection_secret(
    registered: tuple[Path, str],
) -> None:
    data_dir, _ = registered
    out = cli_ok(
        "audiences",
        "add",
        "valve",
        "--own-keys",
        "--key-alg",
        "HMAC256/64",
        "--introspect-secret",
        data_dir=data_dir,
    )
    assert "key family valve (HMAC256/64)" in out
    (secret,) = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("intro")]
    listed = json.dumps(list_json("audiences", data_dir))
    assert secret not in listed and '"introspection": "secret"' in listed
    valve_keys = json.loads(
        cli_ok("keys", "list", "--family", "valve", "--json", data_dir=data_dir)
    )
    assert {k["state"] for k in valve_keys} == {"active", "next"}
    assert {k["alg"] for k in valve_keys} == {"HMAC_256_64"}
    exported = cbor2.loads(
        base64.urlsafe_b64decode(cli_ok("keys", "export", "--family", "valve", data_dir=data_dir))
    )
    assert {k[2].hex() for k in exported} == {k["kid"] for k in valve_keys}
    assert all(k[1] == 4 and len(k[-1]) == 32 for k in exported)  # kty Symmetric, 256-bit k
    # A default-family export is refused: those keys are public at /keys.
    refused = run_cli("keys", "export", "--family", "default", data_dir=data_dir)
    assert refused.returncode == 2
    jwt_hmac = run_cli(
        "audiences",
        "add",
        "x",
        "--own-keys",
        "--key-alg",
        "HMAC256/64",
        "--token-format",
        "jwt",
        data_dir=data_dir,
    )
    assert jwt_hmac.returncode == 2
    assert "x" not in {a["audience_id"] for a in list_json("audiences", data_dir)}
