"""What a device keeps across reboots, in one file written atomically with mode 0600.

The file holds the credentials, the AS's EDHOC credential (for the protected channel), the
cached access token (with, for the ACE OSCORE profiles, its OSCORE input material: a secret)
and the refresh token: it is written to a temporary file in the same
directory, fsynced and renamed over the old one (POSIX rename is atomic), so a crash leaves
either the old state or the new one, never half of either. A file written before the protected
channel existed has no AS credential, and loads as a plain-CoAP device; one written before
the ACE profiles has no profile fields on its token, and loads with none (None).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from coap_auth.secure.credentials import EdhocCredential, parse_credential
from coap_auth.tokens import token_hash
from coap_auth.tokens.claims import check_oscore_input
from coap_auth.wire import TokenType
from device_client.credentials import Credentials, DeviceKey, SecretCredentials
from device_client.errors import CoapAuthError, StateFileError

log = logging.getLogger("device_client.state")

FORMAT = "coap-auth-device-state"
VERSION = 1
MODE = 0o600


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An access token as the device holds it; times are the device clock's.

    `value` is the access_token byte string of the /token response (the tagged CWT, or the
    JWT's ASCII): what a resource server's /authz-info takes.

    For the ACE OSCORE profiles (docs/protocol.md, RFC 9203, draft-ietf-ace-edhoc-oscore-profile)
    the /token response also says: `profile` (ace_profile, wire.AceProfile: 2 coap_oscore,
    4 coap_edhoc_oscore), `cnf_osc` (the OSCORE_Input_Material, RFC 9203 §3.2.1: holds the
    master secret, never shown in repr nor logged), `cnf_key` (the COSE_Key the token is
    bound to, echoed) and `rs_cnf` (the resource server's COSE_Key, RFC 9201 §5). None for a
    token without them. Raises nothing (a plain record).
    """

    value: bytes = field(repr=False)
    token_type: TokenType
    expires_at: int
    # When the client refreshes ahead of expiry: a jittered fraction of the lifetime.
    refresh_at: int
    received_at: int
    audience: str | None = None
    # The granted scope when the AS said it was narrower (RFC 6749 §5.1), else the requested.
    scope: str | None = None
    profile: int | None = None
    cnf_osc: Mapping[int, Any] | None = field(default=None, repr=False, hash=False)
    cnf_key: Mapping[int, Any] | None = field(default=None, repr=False, hash=False)
    rs_cnf: Mapping[int, Any] | None = field(default=None, repr=False, hash=False)

    @property
    def token_hash(self) -> bytes:
        """RFC 9770 §4 token hash: safe to log and what a TRL lists."""
        return token_hash(self.value)

    def valid_at(self, now: int) -> bool:
        """Whether the token has not expired at clock time `now`. Raises nothing."""
        return now < self.expires_at


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Everything a device needs to resume after a reboot. With `as_credential` (the AS's
    EDHOC credential) the device talks to the AS over the protected channel. Raises nothing
    (a plain record; StateFile checks what it loads)."""

    as_uri: str
    credentials: Credentials
    issuer: str = "coap-auth"
    audience: str | None = None
    scope: str | None = None
    token_format: str | None = None
    access_token: AccessToken | None = None
    refresh_token: bytes | None = field(default=None, repr=False)
    as_credential: EdhocCredential | None = None


class StateFile:
    """The one file a device's state lives in. `save` is atomic; the file is mode 0600.
    The constructor touches no file and raises nothing; `load` and `save` raise
    StateFileError."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StateFile({str(self.path)!r})"

    def exists(self) -> bool:
        """Whether the file is there. Raises OSError only when that cannot be told (say
        its directory is not searchable)."""
        return self.path.exists()

    def load(self) -> DeviceState | None:
        """The saved state, or None when there is no file yet. Raises StateFileError when
        the file cannot be read or is not a valid device state (the message never quotes
        it)."""
        try:
            info = self.path.stat()
            if stat.S_IMODE(info.st_mode) & 0o077:
                # Someone loosened it (or copied it carelessly): it holds secrets.
                log.warning("state file %s was readable by others; set to 0600", self.path)
                os.chmod(self.path, MODE)
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"cannot read state file {self.path}: {exc.strerror}") from None
        try:
            return _decode(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError):
            # Never echo the content: it holds the secret and the tokens.
            raise StateFileError(f"state file {self.path} is not a valid device state") from None

    def save(self, state: DeviceState) -> None:
        """Write `state` atomically: temp file, fsync, rename, fsync the directory. Raises
        StateFileError when it cannot be written (the old file is then left as it was)."""
        data = json.dumps(_encode(state), indent=1).encode("utf-8")
        directory = self.path.parent
        try:
            # mkstemp creates the file with mode 0600 (O_EXCL), so no window where it is open.
            fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as exc:
            raise StateFileError(
                f"cannot write state file in {directory}: {exc.strerror}"
            ) from None
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StateFileError(f"cannot write state file {self.path}: {exc.strerror}") from None
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _encode(state: DeviceState) -> dict[str, Any]:
    credentials: dict[str, Any]
    if isinstance(state.credentials, DeviceKey):
        credentials = {
            "client_id": state.credentials.client_id,
            "device_key_pem": state.credentials.private_pem().decode("ascii"),
        }
    else:
        credentials = {
            "client_id": state.credentials.client_id,
            "client_secret": state.credentials.secret,
        }
    token = state.access_token
    return {
        "format": FORMAT,
        "version": VERSION,
        "as_uri": state.as_uri,
        "issuer": state.issuer,
        "audience": state.audience,
        "scope": state.scope,
        "token_format": state.token_format,
        "credentials": credentials,
        "access_token": None
        if token is None
        else {
            "value": _b64(token.value),
            "token_type": int(token.token_type),
            "expires_at": token.expires_at,
            "refresh_at": token.refresh_at,
            "received_at": token.received_at,
            "audience": token.audience,
            "scope": token.scope,
            # The ACE profile fields (absent in older files); COSE maps as base64 CBOR.
            "profile": token.profile,
            "cnf_osc": _cbor_b64(token.cnf_osc),
            "cnf_key": _cbor_b64(token.cnf_key),
            "rs_cnf": _cbor_b64(token.rs_cnf),
        },
        "refresh_token": None if state.refresh_token is None else _b64(state.refresh_token),
        # The CCS, in hex as `coap-auth edhoc-credential` prints it; absent in older files.
        "as_credential": None if state.as_credential is None else state.as_credential.ccs.hex(),
    }


def _cbor_b64(value: Mapping[int, Any] | None) -> str | None:
    return None if value is None else _b64(cbor2.dumps(dict(value)))


def _cbor_map(document: dict[str, Any], key: str) -> dict[Any, Any] | None:
    raw = document.get(key)
    if raw is None:
        return None
    value = cbor2.loads(_unb64(raw))
    if not isinstance(value, dict):
        raise TypeError(key)
    return value


def _optional_int(document: dict[str, Any], key: str) -> int | None:
    value = document.get(key)
    return None if value is None else _int(value)


def _optional_text(document: dict[str, Any], key: str) -> str | None:
    value = document.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(key)
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return int(value)


def _material(value: dict[Any, Any] | None) -> dict[int, Any] | None:
    if value is None:
        return None
    try:
        return check_oscore_input(value)
    except CoapAuthError:
        raise ValueError("cnf_osc") from None


def _decode(document: Any) -> DeviceState:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError("not a device state file")
    if document.get("version") != VERSION:
        raise ValueError("unsupported state file version")
    raw = document["credentials"]
    client_id = raw["client_id"]
    if not isinstance(client_id, str):
        raise TypeError("client_id")
    credentials: Credentials
    if "device_key_pem" in raw:
        credentials = DeviceKey.from_pem(client_id, raw["device_key_pem"].encode("ascii"))
    elif isinstance(raw.get("client_secret"), str):
        credentials = SecretCredentials(client_id, raw["client_secret"])
    else:
        raise ValueError("no credentials")
    raw_token = document.get("access_token")
    token = None
    if raw_token is not None:
        token = AccessToken(
            value=_unb64(raw_token["value"]),
            token_type=TokenType(_int(raw_token["token_type"])),
            expires_at=_int(raw_token["expires_at"]),
            refresh_at=_int(raw_token["refresh_at"]),
            received_at=_int(raw_token["received_at"]),
            audience=_optional_text(raw_token, "audience"),
            scope=_optional_text(raw_token, "scope"),
            profile=_optional_int(raw_token, "profile"),
            cnf_osc=_material(_cbor_map(raw_token, "cnf_osc")),
            cnf_key=_cbor_map(raw_token, "cnf_key"),
            rs_cnf=_cbor_map(raw_token, "rs_cnf"),
        )
    refresh = document.get("refresh_token")
    raw_credential = document.get("as_credential")
    if raw_credential is not None and not isinstance(raw_credential, str):
        raise TypeError("as_credential")
    as_credential = (
        None if raw_credential is None else parse_credential(bytes.fromhex(raw_credential))
    )
    as_uri = document["as_uri"]
    issuer = document["issuer"]
    if not isinstance(as_uri, str) or not isinstance(issuer, str):
        raise TypeError("as_uri and issuer must be text")
    return DeviceState(
        as_uri=as_uri,
        credentials=credentials,
        issuer=issuer,
        audience=_optional_text(document, "audience"),
        scope=_optional_text(document, "scope"),
        token_format=_optional_text(document, "token_format"),
        access_token=token,
        refresh_token=None if refresh is None else _unb64(refresh),
        as_credential=as_credential,
    )
