"""The state file: round trip, mode 0600, atomic replacement, refusal of anything not ours,
and no secret in errors or repr."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from coap_auth.wire import TokenType
from device_client import (
    AccessToken,
    DeviceKey,
    DeviceState,
    SecretCredentials,
    StateFile,
    StateFileError,
)

SECRET = "s3cr3t-device-secret-0123456789"
TOKEN = b"\xd8\x3d\xd2the-access-token-bytes"
REFRESH = b"R" * 32


def _state(credentials: SecretCredentials | DeviceKey | None = None) -> DeviceState:
    return DeviceState(
        as_uri="coap://as.example:5683",
        credentials=credentials or SecretCredentials("sensor-1", SECRET),
        issuer="coap-auth",
        audience="thermostat",
        scope="temp:read",
        access_token=AccessToken(
            value=TOKEN,
            token_type=TokenType.BEARER,
            expires_at=1_700_003_600,
            refresh_at=1_700_002_500,
            received_at=1_700_000_000,
            audience="thermostat",
            scope="temp:read",
        ),
        refresh_token=REFRESH,
    )


@pytest.mark.parametrize("kind", ["secret", "device-key"])
def test_round_trip_with_mode_0600(tmp_path: Path, kind: str) -> None:
    credentials = (
        SecretCredentials("sensor-1", SECRET) if kind == "secret" else DeviceKey.generate("m-7")
    )
    state_file = StateFile(tmp_path / "device.state")
    old_umask = os.umask(0)  # a careless umask must not make the file readable
    try:
        state_file.save(_state(credentials))
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(state_file.path.stat().st_mode) == 0o600
    loaded = state_file.load()
    assert loaded == _state(credentials)
    if isinstance(credentials, DeviceKey):
        assert isinstance(loaded.credentials, DeviceKey)  # type: ignore[union-attr]
        assert loaded.credentials.private_pem() == credentials.private_pem()  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == ["device.state"]  # no temp file left


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "nothing-yet").load() is None


def test_failed_write_leaves_the_old_state_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_file = StateFile(tmp_path / "device.state")
    state_file.save(_state())
    before = state_file.path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)  # the rename never happens
    with pytest.raises(StateFileError, match="No space left"):
        state_file.save(_state(SecretCredentials("sensor-1", "a-new-secret-9876543210")))
    monkeypatch.undo()

    assert state_file.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["device.state"]


def test_loosened_permissions_are_tightened(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "device.state")
    state_file.save(_state())
    os.chmod(state_file.path, 0o644)
    assert state_file.load() == _state()
    assert stat.S_IMODE(state_file.path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not json " + SECRET.encode(), id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(json.dumps({"format": "other"}).encode(), id="other-format"),
        pytest.param(b"__OURS__", id="wrong-version"),
        pytest.param(b"__BAD_PEM__", id="bad-device-key"),
        pytest.param(b"__BAD_B64__", id="bad-base64"),
    ],
)
def test_anything_else_is_refused_without_echoing_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "device.state"
    StateFile(path).save(_state())
    document = json.loads(path.read_text())
    if content == b"__OURS__":
        document["version"] = 99
    elif content == b"__BAD_PEM__":
        document["credentials"] = {"client_id": "m-7", "device_key_pem": SECRET}
    elif content == b"__BAD_B64__":
        document["refresh_token"] = "%%" + SECRET
    if content.startswith(b"__"):
        content = json.dumps(document).encode()
    path.write_bytes(content)

    with pytest.raises(StateFileError) as raised:
        StateFile(path).load()
    assert SECRET not in str(raised.value)
    assert str(path) in str(raised.value)


def test_unwritable_directory(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="cannot write"):
        StateFile(tmp_path / "no-such-dir" / "device.state").save(_state())


def test_repr_shows_no_secret() -> None:
    device_key = DeviceKey.generate("m-7")
    pem = device_key.private_pem().decode()
    for state in (_state(), _state(device_key)):
        text = repr(state) + str(state)
        for secret in (SECRET, repr(TOKEN), repr(REFRESH), pem, TOKEN.hex()):
            assert secret not in text
    assert "sensor-1" in repr(_state())
