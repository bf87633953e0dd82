"""Settings precedence: defaults < TOML file < environment (COAP_AUTH_*) < command-line flags;
the range of every setting; warnings for unknown COAP_AUTH_* variables; `--version`.

Every call passes `env=` explicitly so the real environment cannot leak in; the command-line
tests run the real `coap-auth` with a clean environment.
"""

from __future__ import annotations

import base64
import re
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from coap_auth.config import (
    LIMITS,
    NOT_SETTINGS,
    Between,
    OneOf,
    Settings,
    environment_warnings,
    load_settings,
)
from coap_auth.errors import OperatorError
from coap_auth.store import master_key
from tests.processes import CLI_TIMEOUT, COAP_AUTH, clean_env

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coap-auth.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(env={})

    assert settings == Settings()
    assert settings.data_dir == Path("coap-auth-data")
    assert settings.bind == "::"
    assert settings.port == 5683
    assert settings.signing_alg == "ES256"
    assert settings.change_poll_interval == 0.5


def test_toml_values(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        """
data_dir = "/var/lib/coap-auth"
bind = "127.0.0.1"
port = 6000
issuer = "coap://as.example"
signing_alg = "EdDSA"
token_lifetime = 120
change_poll_interval = 0.25
log_level = "DEBUG"
""",
    )

    settings = load_settings(config, env={})

    assert settings.data_dir == Path("/var/lib/coap-auth")
    assert isinstance(settings.data_dir, Path)
    assert settings.bind == "127.0.0.1"
    assert settings.port == 6000
    assert settings.issuer == "coap://as.example"
    assert settings.signing_alg == "EdDSA"
    assert settings.token_lifetime == 120
    assert settings.change_poll_interval == 0.25
    assert settings.log_level == "DEBUG"
    # What the file does not mention keeps its default.
    assert settings.max_payload == Settings().max_payload


def test_env_overrides_toml(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'port = 6000\nbind = "127.0.0.1"\n')

    settings = load_settings(
        config,
        env={
            "COAP_AUTH_PORT": "7000",
            "COAP_AUTH_DATA_DIR": "/srv/data",
            "COAP_AUTH_CHANGE_POLL_INTERVAL": "2.5",
            "PORT": "1",  # no prefix: not ours
            "COAP_AUTH_MASTER_KEY": "not-a-setting",  # prefixed but read by MasterKey, not here
        },
    )

    assert settings.port == 7000 and isinstance(settings.port, int)
    assert settings.data_dir == Path("/srv/data")
    assert settings.change_poll_interval == 2.5
    assert settings.bind == "127.0.0.1"  # from the file, the environment says nothing


def test_flags_override_env(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'port = 6000\nbind = "127.0.0.1"\n')

    settings = load_settings(
        config,
        env={"COAP_AUTH_PORT": "7000", "COAP_AUTH_BIND": "::1"},
        flags={"port": 8000, "bind": None, "data_dir": Path("/flag/dir")},
    )

    assert settings.port == 8000
    assert settings.bind == "::1"  # a flag left as None does not override
    assert settings.data_dir == Path("/flag/dir")


def test_unknown_toml_key(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "port = 6000\nprot = 6001\n")

    with pytest.raises(OperatorError, match="prot"):
        load_settings(config, env={})


@pytest.mark.parametrize(
    "toml",
    [
        'port = "many"',
        "port = true",
        "port = [5683]",
        "bind = 5",
        "data_dir = [1, 2]",
        'change_poll_interval = "fast"',
        "log_level = 10",
        "issuer = {name = 'x'}",
    ],
)
def test_wrong_type_in_toml(tmp_path: Path, toml: str) -> None:
    config = write_toml(tmp_path, toml + "\n")

    with pytest.raises(OperatorError):
        load_settings(config, env={})


@pytest.mark.parametrize(
    "toml",
    [
        pytest.param("port = 5683.9", id="float-for-int"),
        pytest.param("change_poll_interval = true", id="bool-for-float"),
    ],
)
def test_wrong_scalar_type_in_toml_is_not_coerced(tmp_path: Path, toml: str) -> None:
    config = write_toml(tmp_path, toml + "\n")

    with pytest.raises(OperatorError):
        load_settings(config, env={})


def test_wrong_type_in_env() -> None:
    with pytest.raises(OperatorError, match="port"):
        load_settings(env={"COAP_AUTH_PORT": "fifty"})


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(OperatorError):
        load_settings(tmp_path / "missing.toml", env={})
    with pytest.raises(OperatorError):
        load_settings(write_toml(tmp_path, "port = = 1\n"), env={})


@pytest.mark.parametrize("source", ["toml", "env", "flag"])
def test_signing_alg_must_be_es256_or_eddsa(tmp_path: Path, source: str) -> None:
    config = write_toml(tmp_path, 'signing_alg = "RS256"\n') if source == "toml" else None
    env = {"COAP_AUTH_SIGNING_ALG": "HS256"} if source == "env" else {}
    flags = {"signing_alg": "es256"} if source == "flag" else None

    with pytest.raises(OperatorError, match="signing_alg"):
        load_settings(config, env=env, flags=flags)


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_signing_alg_accepted(alg: str) -> None:
    assert load_settings(env={"COAP_AUTH_SIGNING_ALG": alg}).signing_alg == alg


@pytest.mark.parametrize("lifetime", ["0", "86401"])
def test_token_lifetime_is_at_most_the_verifiers_maximum(lifetime: str) -> None:
    # Resource servers refuse tokens living longer than 24 h (device_client's max_lifetime).
    with pytest.raises(OperatorError, match="token_lifetime"):
        load_settings(env={"COAP_AUTH_TOKEN_LIFETIME": lifetime})
    assert load_settings(env={"COAP_AUTH_TOKEN_LIFETIME": "86400"}).token_lifetime == 86400


# -- ranges: every setting has one, load_settings enforces it ------------------------------------


def env_of(**values: object) -> dict[str, str]:
    return {f"COAP_AUTH_{name.upper()}": str(value) for name, value in values.items()}


def with_companions(name: str, value: object) -> dict[str, object]:
    """`name = value`, plus what a cross-check needs so that only `name`'s range decides."""
    values: dict[str, object] = {name: value}
    if name == "trl_max_n":
        values["trl_max_diff_batch"] = 1
    if name == "trl_max_diff_batch":
        values["trl_max_n"] = 1024
    return values


def test_every_setting_has_a_range_and_its_default_is_inside() -> None:
    assert list(LIMITS) == [f.name for f in fields(Settings)]
    defaults = Settings()
    for name, limit in LIMITS.items():
        assert limit.accepts(getattr(defaults, name)), name


NUMERIC = [(name, limit) for name, limit in LIMITS.items() if isinstance(limit, Between)]


def step(limit: Between) -> float:
    return 1 if isinstance(limit.low, int) and isinstance(limit.high, int) else 0.001


@pytest.mark.parametrize(("name", "limit"), NUMERIC, ids=[name for name, _ in NUMERIC])
def test_numeric_range_edges(name: str, limit: Between) -> None:
    for inside in (limit.low, limit.high):
        settings = load_settings(env=env_of(**with_companions(name, inside)))
        assert getattr(settings, name) == inside
    unit = f" {re.escape(limit.unit)}" if limit.unit else ""
    for outside in (limit.low - step(limit), limit.high + step(limit)):
        # One line naming the setting, its range and unit, and the value given.
        pattern = f"^{name} must be {re.escape(limit.text)}{unit}, not [-0-9.,]+$"
        with pytest.raises(OperatorError, match=pattern):
            load_settings(env=env_of(**with_companions(name, outside)))


CHOICES = [(name, limit) for name, limit in LIMITS.items() if isinstance(limit, OneOf)]


@pytest.mark.parametrize(("name", "limit"), CHOICES, ids=[name for name, _ in CHOICES])
def test_choices(name: str, limit: OneOf) -> None:
    for value in limit.values:
        assert getattr(load_settings(env=env_of(**{name: value})), name) == value
    bogus = "nonsense" if not isinstance(limit.values[0], int) else 48
    with pytest.raises(OperatorError, match=f"^(setting '{name}'.*|{name} must be .*)$"):
        load_settings(env=env_of(**{name: bogus}))


# The examples and the settings whose range is a shape, not numbers, through the file
# as an operator would write them.
OUT_OF_RANGE = [
    ("refresh_grace = -3", "refresh_grace must be 0 to 3,600 s, not -3"),
    ("max_payload = 0", "max_payload must be 1,024 to 16,384 bytes, not 0"),
    ("token_lifetime = -1", "token_lifetime must be 1 to 86,400 s, not -1"),
    ("port = 99999", "port must be 0 to 65535, not 99999"),
    ("port = -1", "port must be 0 to 65535, not -1"),
    ("workers = 0", "workers must be 1 to 64 processes, not 0"),
    ("metrics_port = 65536", "metrics_port must be 0 to 65535, not 65536"),
    ("change_poll_interval = 0.0", "change_poll_interval must be 0.01 to 60 s, not 0"),
    ("client_secret_overlap = 2592001", "client_secret_overlap must be 0 to 2,592,000 s, not"),
    ('log_format = "xml"', "log_format must be text or json"),
    ('log_level = "chatty"', "log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ('signing_alg = "RS256"', "signing_alg must be ES256 or EdDSA"),
    ("max_block_size = 2048", "max_block_size must be 16, 32, 64, 128, 256, 512 or 1024"),
    ('bind = ""', "bind must be an IP address or a host name"),
    ('bind = "999.1.1.1"', "bind must be an IP address or a host name"),
    ('bind = "[::1]"', "bind must be an IP address or a host name"),
    ('bind = "as example"', "bind must be an IP address or a host name"),
    ('bind = "-as.example"', "bind must be an IP address or a host name"),
    ('metrics_bind = "127.0.0.1:9100"', "metrics_bind must be an IP address or a host name"),
    ('issuer = ""', "issuer must be 1 to 60 bytes of text"),
    (f'issuer = "{"x" * 61}"', "issuer must be 1 to 60 bytes of text"),
    ('issuer = "as\\nforged"', "issuer must be 1 to 60 bytes of text"),
    ('store = "mysql://user:hunter2@db/x"', "store must be empty, or a postgresql:// URL"),
    ('store_schema = "a-b"', "store_schema must be an identifier of at most 63 bytes"),
    (f'store_schema = "{"s" * 64}"', "store_schema must be an identifier of at most 63 bytes"),
    ('verified_networks = "10.0.0.0/33"', "verified_networks must be comma-separated CIDR"),
    ("trl_max_n = 8", "trl_max_diff_batch must not exceed trl_max_n"),
]


@pytest.mark.parametrize(("toml", "message"), OUT_OF_RANGE, ids=[t for t, _ in OUT_OF_RANGE])
def test_out_of_range_in_toml(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(OperatorError) as raised:
        load_settings(write_toml(tmp_path, toml + "\n"), env={})

    description = raised.value.description
    assert description.startswith(message)
    assert "\n" not in description
    assert "hunter2" not in description  # a store URL may hold a password: never echoed


@pytest.mark.parametrize(
    "toml",
    [
        'bind = "::"',
        'bind = "0.0.0.0"',
        'bind = "fe80::1%eth0"',
        'bind = "localhost"',
        'bind = "as.example.com."',
        'bind = "host-1.example"',
        'metrics_bind = "::1"',
        "port = 0",
        "workers = 64",
        'log_format = "json"',
        'log_level = "debug"',
        "refresh_grace = 0",
        "metrics_port = 9100",
        'verified_networks = ""',
        'store = "postgresql://coap@db/coap"',
        "change_poll_interval = 0.2",
    ],
)
def test_in_range_in_toml(tmp_path: Path, toml: str) -> None:
    name = toml.split(" = ")[0]
    settings = load_settings(write_toml(tmp_path, toml + "\n"), env={})
    assert getattr(settings, name) == tomllib.loads(toml)[name]


def test_flags_are_range_checked_too() -> None:
    with pytest.raises(OperatorError, match="^workers must be 1 to 64 processes, not 65$"):
        load_settings(env={}, flags={"workers": 65})


def test_unknown_toml_key_names_the_likely_one(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match=r"unknown setting 'refresh_grase'.*refresh_grace\?"):
        load_settings(write_toml(tmp_path, "refresh_grase = 45\n"), env={})


def test_wrong_type_says_what_is_accepted() -> None:
    with pytest.raises(OperatorError, match="require_oscore.*must be true or false$"):
        load_settings(env={"COAP_AUTH_REQUIRE_OSCORE": "maybe"})


# -- unknown COAP_AUTH_* variables ---------------------------------------------------------------


def test_unknown_environment_variables_are_warned_with_a_suggestion() -> None:
    warnings = environment_warnings(
        {
            "COAP_AUTH_PROT": "6000",
            "COAP_AUTH_REFRESH_GRASE": "45",
            "COAP_AUTH_FROBNICATE": "1",
            "COAP_AUTH_PORT": "6001",
            "PORT": "1",
        }
    )

    assert warnings == [
        "unknown environment variable COAP_AUTH_FROBNICATE ignored",
        "unknown environment variable COAP_AUTH_PROT ignored (did you mean COAP_AUTH_PORT?)",
        "unknown environment variable COAP_AUTH_REFRESH_GRASE ignored"
        " (did you mean COAP_AUTH_REFRESH_GRACE?)",
    ]


def test_names_the_project_reads_elsewhere_are_not_warned_about() -> None:
    assert master_key.ENV_VAR in NOT_SETTINGS
    known = {name: "x" for name in NOT_SETTINGS}
    known.update(env_of(port=1, data_dir="d", require_oscore="false"))
    assert environment_warnings(known) == []


def coap_auth(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COAP_AUTH, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(**env),
    )


def test_cli_warns_about_unknown_variables_and_still_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    result = coap_auth(
        "init",
        "--data-dir",
        str(data_dir),
        COAP_AUTH_SIGNING_ALGO="EdDSA",
        COAP_AUTH_MASTER_KEY=key,
        COAP_AUTH_TEST_PG_DSN="postgresql://nowhere/x",
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "coap-auth: warning: unknown environment variable COAP_AUTH_SIGNING_ALGO ignored"
        " (did you mean COAP_AUTH_SIGNING_ALG?)"
    ]
    assert "(ES256)" in result.stdout  # the misspelt setting did not apply


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--port", "99999"), {}, "port must be 0 to 65535, not 99999"),
        (("--port", "-1"), {}, "port must be 0 to 65535, not -1"),
        (("--bind", "no host"), {}, "bind must be an IP address or a host name"),
        ((), {"COAP_AUTH_REFRESH_GRACE": "-3"}, "refresh_grace must be 0 to 3,600 s, not -3"),
        ((), {"COAP_AUTH_MAX_PAYLOAD": "0"}, "max_payload must be 1,024 to 16,384 bytes, not 0"),
    ],
    ids=["port-99999", "port--1", "bind", "refresh-grace", "max-payload"],
)
def test_serve_refuses_out_of_range_settings(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    data_dir = tmp_path / "data"
    result = coap_auth("serve", "--data-dir", str(data_dir), "--bind", "127.0.0.1", *args, **env)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"coap-auth: error: {message}"]
    assert result.stdout == ""
    assert not data_dir.exists()  # nothing was created


def test_version_is_the_projects() -> None:
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]

    result = coap_auth("--version")

    assert result.returncode == 0
    assert result.stdout == f"coap-auth {version}\n"


@pytest.mark.parametrize(
    "url", ["postgresql://u:hunter2@db:x/coap", "postgresql://u:hunter2@[zz/c"]
)
def test_a_store_url_that_does_not_parse_is_one_line_without_its_password(url: str) -> None:
    """Attack round 1 of issue 18: a bad port or IPv6 literal was a traceback out of
    asyncpg at the first connection."""
    with pytest.raises(OperatorError) as refused:
        load_settings(env={"COAP_AUTH_STORE": url})
    assert refused.value.description == "store must be empty, or a postgresql:// URL"
