"""Settings: defaults < TOML file < environment (COAP_AUTH_*) < command-line flags.

An unknown key in the TOML file is an error, not silence.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from coap_auth.addresses import network_list
from coap_auth.errors import OperatorError
from coap_auth.wire import MAX_TOKEN_LIFETIME

ENV_PREFIX = "COAP_AUTH_"
DEFAULT_DATA_DIR = Path("coap-auth-data")


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = DEFAULT_DATA_DIR
    # Where the state lives: "" for the embedded SQLite file in data_dir, or a PostgreSQL URL
    # (postgresql://user@host/db) shared by several instances.
    store: str = ""
    # The PostgreSQL schema (namespace) to keep the tables in.
    store_schema: str = "public"
    bind: str = "::"
    port: int = 5683
    # Worker processes serving the one port (`serve --workers N`): only then is the socket
    # shared (SO_REUSEPORT, the kernel spreading sources over them); one `serve` otherwise
    # refuses a port another process holds.
    workers: int = 1
    # The AS identifier: `iss` of every token, `aud` a client assertion must carry.
    issuer: str = "coap-auth"
    # Algorithm of the signing keys `init` creates: ES256 or EdDSA.
    signing_alg: str = "ES256"
    # Default lifetime (s) of an audience's access tokens when `audiences add` gives none.
    token_lifetime: int = 3600
    # Largest accepted request payload in bytes (larger: 4.13).
    max_payload: int = 2048
    # PROTOCOL.md: a client assertion's exp is at most this far ahead.
    assertion_max_lifetime: int = 300
    # Allowed clock difference when checking a client assertion's iat.
    clock_skew: int = 30
    # Refresh tokens (PROTOCOL.md): grace window for a lost response, idle timeout and
    # absolute lifetime of a refresh family, in seconds.
    refresh_grace: int = 30
    refresh_idle_timeout: int = 7 * 24 * 3600
    refresh_max_lifetime: int = 30 * 24 * 3600
    # Signing-key rollover (PROTOCOL.md "Keys and rollover"): scheduled rotation period, how
    # long a key is published before it signs, and how long past the longest token lifetime
    # a retired key stays published. All in seconds.
    key_rotation_period: int = 24 * 3600
    key_prepublication_lead: int = 3600
    key_retire_leeway: int = 60
    # RFC 9770: how many TRL updates a diff query can reach (MAX_N), and the most one diff
    # response carries (MAX_DIFF_BATCH, <= MAX_N).
    trl_max_n: int = 32
    trl_max_diff_batch: int = 32
    # Rate limits (requests per window of rate_limit_window s; 0 turns one off): every POST
    # from one source address, and the requests of one authenticated client.
    rate_limit_window: int = 60
    rate_limit_per_address: int = 120
    rate_limit_per_client: int = 30
    # How often (s) the server looks at the store's change feed and the key schedule.
    change_poll_interval: float = 0.5
    log_level: str = "INFO"
    # "text" (one line per record) or "json" (one JSON object per line).
    log_format: str = "text"
    # Prometheus metrics and /healthz on an HTTP listener: off while metrics_port is 0.
    metrics_bind: str = "127.0.0.1"
    metrics_port: int = 0
    # `clients rotate-secret`: how long (s) the previous secret keeps working beside the new.
    client_secret_overlap: int = 86_400
    # Protected channels (PROTOCOL.md): /token, /introspect, /revoke and /revoke/trl refuse
    # requests that are not OSCORE-protected under an EDHOC-made context. Turn off for labs
    # only (`serve` warns on every start).
    require_oscore: bool = True
    # OSCORE contexts held at once (least recently used go first), and how long (s) an unused
    # one lives; a device whose context is gone runs EDHOC again.
    oscore_max_contexts: int = 10_000
    oscore_idle_timeout: int = 3600
    # EDHOC handshakes waiting for message_3: at most this many, each for at most this long
    # (s), and at most edhoc_pending_per_address from one source address.
    edhoc_max_pending: int = 256
    edhoc_pending_per_address: int = 8
    edhoc_handshake_timeout: int = 10
    # Amplification (PROTOCOL.md "Amplification and Observe"): an unprotected answer to a
    # source address not verified is at most 3x its request, else 4.01 with an Echo option.
    # A source that returns the Echo value is verified for echo_verified_lifetime s; at most
    # echo_verified_max addresses are remembered. Sources in verified_networks (a comma-
    # separated list of CIDR prefixes, "" for none) count as verified: loopback by default,
    # since the kernel drops outside datagrams that claim a loopback source.
    echo_verified_lifetime: int = 3600
    echo_verified_max: int = 100_000
    verified_networks: str = "127.0.0.0/8,::1/128"
    # Observe (RFC 7641): observations held at once from one source (an address, an IPv6 /64,
    # or an authenticated peer) and in all; past either, a registration is answered without
    # Observe. Notifications go out NON, at most notify_rate a second, with a CON to each
    # observer at least every notify_con_interval s.
    observers_per_source: int = 8
    observers_max: int = 20_000
    notify_rate: int = 10_000
    notify_con_interval: int = 86_400
    # The largest block (bytes, a power of two from 16 to 1024) of a block-wise answer or
    # notification (RFC 7959); a client's smaller Block2 size is honoured.
    max_block_size: int = 1024


_FIELDS = {f.name: f for f in fields(Settings)}
# The longest issuer id whose EDHOC credential (coap_auth.secure.credentials) still fits.
MAX_ISSUER_BYTES = 60


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind in ("Path", Path):
            return Path(value)
        if kind in ("bool", bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower() if isinstance(value, str) else None
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        # Text comes from the environment or flags; a TOML number must already be the type.
        if kind in ("int", int):
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError
            return int(value)
        if kind in ("float", float):
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise OperatorError(f"setting {name!r} has a value of the wrong type") from None


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise OperatorError(f"cannot read config file {config_file}: {exc}") from None
        for name, value in document.items():
            if name not in _FIELDS:
                raise OperatorError(f"unknown setting {name!r} in {config_file}")
            values[name] = _coerce(name, value)
    for name, value in (os.environ if env is None else env).items():
        key = name[len(ENV_PREFIX) :].lower() if name.startswith(ENV_PREFIX) else None
        if key in _FIELDS:
            values[key] = _coerce(key, value)
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = dataclasses.replace(Settings(), **values)
    if settings.signing_alg not in ("ES256", "EdDSA"):
        raise OperatorError("signing_alg must be ES256 or EdDSA")
    for name in (
        "key_rotation_period",
        "trl_max_n",
        "trl_max_diff_batch",
        "rate_limit_window",
        "oscore_max_contexts",
        "oscore_idle_timeout",
        "edhoc_max_pending",
        "edhoc_pending_per_address",
        "edhoc_handshake_timeout",
        "echo_verified_lifetime",
        "echo_verified_max",
        "observers_per_source",
        "observers_max",
        "notify_rate",
        "notify_con_interval",
    ):
        if getattr(settings, name) < 1:
            raise OperatorError(f"{name} must be at least 1")
    for name in (
        "key_prepublication_lead",
        "key_retire_leeway",
        "rate_limit_per_address",
        "rate_limit_per_client",
    ):
        if getattr(settings, name) < 0:
            raise OperatorError(f"{name} must not be negative")
    if not 1 <= settings.token_lifetime <= MAX_TOKEN_LIFETIME:
        raise OperatorError(f"token_lifetime must be 1 to {MAX_TOKEN_LIFETIME} seconds")
    if settings.trl_max_diff_batch > settings.trl_max_n:
        raise OperatorError("trl_max_diff_batch must not exceed trl_max_n (RFC 9770 §6.2.1)")
    if settings.store and not settings.store.startswith(("postgresql://", "postgres://")):
        raise OperatorError("store must be empty (SQLite) or a postgresql:// URL")
    if not settings.store_schema.isidentifier():
        raise OperatorError("store_schema must be a plain identifier")
    if len(settings.issuer.encode("utf-8")) > MAX_ISSUER_BYTES:
        # It is the subject of the AS's EDHOC credential, which lakers caps in size.
        raise OperatorError(f"issuer must be at most {MAX_ISSUER_BYTES} bytes")
    if settings.max_block_size not in (16, 32, 64, 128, 256, 512, 1024):
        raise OperatorError("max_block_size must be a power of two from 16 to 1024")
    try:
        verified_networks(settings)
    except ValueError:
        raise OperatorError("verified_networks must be comma-separated CIDR prefixes") from None
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise OperatorError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return settings


def verified_networks(settings: Settings) -> tuple[str, ...]:
    """The prefixes of `verified_networks`, checked; raises ValueError for one that is not an
    IP network."""
    return network_list(settings.verified_networks)
