"""Settings: defaults < TOML file < environment (COAP_AUTH_*) < command-line flags, and the
range each one accepts (LIMITS, which docs/configuration.md follows).

An unknown key in the TOML file is an error, not silence; an unknown COAP_AUTH_* variable a
warning (environment_warnings), a value out of its range an error naming the range.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from coap_auth.addresses import network_list
from coap_auth.errors import OperatorError
from coap_auth.setting_limits import Between, Limit, OneOf, Shape, is_host
from coap_auth.text import has_control_character
from coap_auth.wire import MAX_TOKEN_LIFETIME

ENV_PREFIX = "COAP_AUTH_"
DEFAULT_DATA_DIR = Path("coap-auth-data")


class LogFormat(StrEnum):
    """How `serve` writes its log: lines of text, or one JSON object per line."""

    TEXT = "text"
    JSON = "json"


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
    # docs/protocol.md: a client assertion's exp is at most this far ahead.
    assertion_max_lifetime: int = 300
    # Allowed clock difference when checking a client assertion's iat.
    clock_skew: int = 30
    # Refresh tokens (docs/protocol.md): grace window for a lost response, idle timeout and
    # absolute lifetime of a refresh family, in seconds.
    refresh_grace: int = 30
    refresh_idle_timeout: int = 7 * 24 * 3600
    refresh_max_lifetime: int = 30 * 24 * 3600
    # Signing-key rollover (docs/protocol.md "Keys and rollover"): scheduled rotation period, how
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
    log_format: LogFormat = LogFormat.TEXT
    # Prometheus metrics and /healthz on an HTTP listener: off while metrics_port is 0.
    metrics_bind: str = "127.0.0.1"
    metrics_port: int = 0
    # `clients rotate-secret`: how long (s) the previous secret keeps working beside the new.
    client_secret_overlap: int = 86_400
    # Protected channels (docs/protocol.md): /token, /introspect, /revoke and /revoke/trl refuse
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
    # Amplification (docs/protocol.md "Amplification and Observe"): an unprotected answer to a
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
# PostgreSQL truncates longer identifiers (NAMEDATALEN - 1).
MAX_SCHEMA_BYTES = 63
DAY = 24 * 3600
# COAP_AUTH_* names the project reads that are not settings: the master key (read by
# coap_auth.store.master_key) and the tests' PostgreSQL DSN (tests/pg.py).
NOT_SETTINGS = frozenset({"COAP_AUTH_MASTER_KEY", "COAP_AUTH_TEST_PG_DSN"})


# -- what each setting accepts (coap_auth.setting_limits) ------------------------------------


def _networks(text: str) -> bool:
    try:
        network_list(text)
    except ValueError:
        return False
    return True


def _store_url(text: str) -> bool:
    """A postgresql:// URL whose host and port parse (a bad port or IPv6 literal was a
    traceback out of asyncpg; the URL may hold a password, so it is never echoed)."""
    if not text.startswith(("postgresql://", "postgres://")):
        return False
    try:
        urllib.parse.urlsplit(text).port  # noqa: B018 (parsed for the ValueError)
    except ValueError:
        return False
    return True


def _issuer(text: str) -> bool:
    return 0 < len(text.encode("utf-8")) <= MAX_ISSUER_BYTES and not has_control_character(text)


HOST = Shape("an IP address or a host name", is_host)
POWERS_OF_TWO = (16, 32, 64, 128, 256, 512, 1024)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Every setting and what it accepts: load_settings checks each value against it, and
# tests/test_docs.py holds docs/configuration.md to the same text, so neither can drift.
# The bounds only reject nonsense; the comments say where one comes from.
LIMITS: Mapping[str, Limit] = {
    "data_dir": Shape("a directory path", lambda p: str(p) != ""),
    "store": Shape("empty, or a postgresql:// URL", lambda s: s == "" or _store_url(s)),
    "store_schema": Shape(
        f"an identifier of at most {MAX_SCHEMA_BYTES} bytes",
        lambda s: s.isidentifier() and len(s.encode("utf-8")) <= MAX_SCHEMA_BYTES,
    ),
    "bind": HOST,
    "port": Between(0, 65535, grouped=False),  # 0: any free port (the tests use it)
    "workers": Between(1, 64, "processes"),
    # The subject of the AS's EDHOC credential too, which lakers caps in size.
    "issuer": Shape(f"1 to {MAX_ISSUER_BYTES} bytes of text", _issuer),
    "signing_alg": OneOf(("ES256", "EdDSA")),
    # Verifiers refuse longer tokens (wire.MAX_TOKEN_LIFETIME, device_client's max_lifetime).
    "token_lifetime": Between(1, MAX_TOKEN_LIFETIME, "s"),
    # Room for the largest legitimate request (an /introspect of a JWT PoP token, under 1 KB);
    # block-wise uploads are held in memory, up to coap.blockwise.MAX_UPLOADS of them.
    "max_payload": Between(1024, 16384, "bytes"),
    # Its cti stays in the replay cache until its exp.
    "assertion_max_lifetime": Between(1, 3600, "s"),
    "clock_skew": Between(0, 300, "s"),
    # 0 turns the grace off; at least MAX_TRANSMIT_SPAN (45 s, RFC 7252 §4.8.2) covers every
    # retransmission of a lost answer.
    "refresh_grace": Between(0, 3600, "s"),
    "refresh_idle_timeout": Between(60, 365 * DAY, "s"),
    "refresh_max_lifetime": Between(60, 365 * DAY, "s"),
    # Below a minute, keys would churn faster than a device can follow them.
    "key_rotation_period": Between(60, 365 * DAY, "s"),
    "key_prepublication_lead": Between(0, 30 * DAY, "s"),
    "key_retire_leeway": Between(0, DAY, "s"),
    # RFC 9770 §6.2.1: MAX_DIFF_BATCH <= MAX_N, checked below.
    "trl_max_n": Between(1, 1024, "updates"),
    "trl_max_diff_batch": Between(1, 1024, "updates"),
    "rate_limit_window": Between(1, DAY, "s"),
    "rate_limit_per_address": Between(0, 1_000_000, "requests"),
    "rate_limit_per_client": Between(0, 1_000_000, "requests"),
    # It also paces the key schedule and TRL expiry, and change propagation between instances.
    "change_poll_interval": Between(0.01, 60, "s"),
    "log_level": OneOf(LOG_LEVELS, fold_case=True),
    "log_format": OneOf(tuple(LogFormat)),
    "metrics_bind": HOST,
    "metrics_port": Between(0, 65535, grouped=False),  # 0: off
    "client_secret_overlap": Between(0, 30 * DAY, "s"),
    "require_oscore": OneOf((True, False)),
    "oscore_max_contexts": Between(1, 1_000_000, "contexts"),
    "oscore_idle_timeout": Between(60, 30 * DAY, "s"),
    "edhoc_max_pending": Between(1, 65536, "handshakes"),
    "edhoc_pending_per_address": Between(1, 65536, "handshakes"),
    "edhoc_handshake_timeout": Between(1, 300, "s"),
    "echo_verified_lifetime": Between(1, 7 * DAY, "s"),
    "echo_verified_max": Between(1, 10_000_000, "addresses"),
    "verified_networks": Shape("comma-separated CIDR prefixes, or empty", _networks),
    "observers_per_source": Between(1, 100_000, "observations"),
    "observers_max": Between(1, 1_000_000, "observations"),
    "notify_rate": Between(1, 1_000_000, "notifications/s"),
    # RFC 7641 §4.5: a CON at least every 24 hours.
    "notify_con_interval": Between(1, DAY, "s"),
    # RFC 7959 §2.2: SZX 0-6 (BERT's 7 is for reliable transports only).
    "max_block_size": OneOf(POWERS_OF_TWO, "bytes"),
}


def check(settings: Settings) -> None:
    """Raise OperatorError, one line naming the setting and what it accepts, for the first
    value out of its range."""
    for name, limit in LIMITS.items():
        value = getattr(settings, name)
        if not limit.accepts(value):
            raise OperatorError(limit.problem(name, value))
    if settings.trl_max_diff_batch > settings.trl_max_n:
        raise OperatorError("trl_max_diff_batch must not exceed trl_max_n (RFC 9770 §6.2.1)")


# -- loading ----------------------------------------------------------------------------------


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
        if kind in ("LogFormat", LogFormat) and value in tuple(LogFormat):
            return LogFormat(value)  # anything else is refused by the setting's range
        return value
    except (TypeError, ValueError):
        limit = LIMITS[name]
        unit = f" {limit.unit}" if limit.unit else ""
        raise OperatorError(
            f"setting {name!r} has a value of the wrong type: it must be {limit.text}{unit}"
        ) from None


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """The settings from these sources, each value checked against LIMITS; OperatorError
    for an unknown key in the file, a value of the wrong type or out of its range."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise OperatorError(f"cannot read config file {config_file}: {exc}") from None
        for name, value in document.items():
            if name not in _FIELDS:
                hint = _suggestion(name, list(_FIELDS))
                raise OperatorError(f"unknown setting {name!r} in {config_file}{hint}")
            values[name] = _coerce(name, value)
    for name, value in (os.environ if env is None else env).items():
        key = name[len(ENV_PREFIX) :].lower() if name.startswith(ENV_PREFIX) else None
        if key in _FIELDS:
            values[key] = _coerce(key, value)
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = dataclasses.replace(Settings(), **values)
    check(settings)
    return settings


def environment_warnings(env: Mapping[str, str] | None = None) -> list[str]:
    """One warning per COAP_AUTH_* variable that names no setting (and is not one the project
    reads elsewhere), with the likely intended name; load_settings ignores them."""
    known = [ENV_PREFIX + name.upper() for name in _FIELDS]
    warnings = []
    for name in sorted(os.environ if env is None else env):
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        if name[len(ENV_PREFIX) :].lower() in _FIELDS:
            continue
        hint = _suggestion(name, known + sorted(NOT_SETTINGS))
        warnings.append(f"unknown environment variable {name} ignored{hint}")
    return warnings


def _suggestion(name: str, candidates: list[str]) -> str:
    """' (did you mean X?)' for the candidate closest to `name`, or ''. The shared prefix is
    left out of the comparison: it would make every name look alike."""
    strip = ENV_PREFIX if name.startswith(ENV_PREFIX) else ""
    by_tail = {c[len(strip) :].lower(): c for c in candidates}
    close = difflib.get_close_matches(name[len(strip) :].lower(), list(by_tail), n=1, cutoff=0.75)
    return f" (did you mean {by_tail[close[0]]}?)" if close else ""


def verified_networks(settings: Settings) -> tuple[str, ...]:
    """The prefixes of `verified_networks`, checked; raises ValueError for one that is not an
    IP network."""
    return network_list(settings.verified_networks)
