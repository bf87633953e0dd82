"""Settings precedence: defaults < TOML file < environment (COAP_AUTH_*) < command-line flags.

Every call passes `env=` explicitly so the real environment cannot leak in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coap_auth.config import Settings, load_settings
from coap_auth.errors import OperatorError


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
