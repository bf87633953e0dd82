"""Issue 18: the deployment files in deploy/. The systemd units pass `systemd-analyze verify`
and its offline security review, and their command lines really run (the service with its
master key from a credential, never written to the state directory); the container files
say what matters (no Docker daemon here to build them: see the README)."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.processes import COAP_AUTH, LISTENING_LINE, STARTUP_TIMEOUT, clean_env

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = ["coap-auth.service", "coap-auth-thermostat.service", "coap-auth-sensor.service"]
INSTALLED = "/opt/coap-auth"  # where the units expect the venv (README "Deployment")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def unit_settings(unit: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, continuation lines joined, in order per key."""
    text = (DEPLOY / unit).read_text().replace("\\\n", " ")
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def local_unit(unit: str, into: Path) -> Path:
    """The unit with /opt/coap-auth pointing at this checkout's venv and examples, so that
    systemd-analyze finds every executable it names."""
    bin_dir = into / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("coap-auth-with-secrets",):
        shutil.copy2(DEPLOY / name, bin_dir / name)
    if not (bin_dir / "coap-auth").exists():
        (bin_dir / "coap-auth").symlink_to(COAP_AUTH)
        # Not a symlink: a venv's python finds its site-packages by the path it was run as.
        python = bin_dir / "python"
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
    examples = into / "examples"
    if not examples.exists():
        examples.symlink_to(ROOT / "examples")
    path = into / unit
    path.write_text((DEPLOY / unit).read_text().replace(INSTALLED, str(into)))
    return path


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    path = local_unit(unit, tmp_path)
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys, bad values and missing executables are reported (and exit 1).
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    # The offline review scores the sandbox from 0 (locked down) to 10 (none): at most 2.0.
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    assert re.search(r"Overall exposure level for .*: 1\.\d OK", security.stdout)


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    path = local_unit("coap-auth.service", tmp_path)
    path.write_text(path.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "strikt" in verify.stderr  # so the check above is not vacuous


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_hardened(unit: str) -> None:
    settings = unit_settings(unit)
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",  # UDP 5683/5685 need no privilege
        "Restart": "on-failure",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], (unit, key, settings.get(key))
    name = unit.removesuffix(".service")
    assert settings["StateDirectory"] == [name]
    assert settings["User"] == [name]


def test_service_unit_keeps_the_master_key_in_a_credential() -> None:
    settings = unit_settings("coap-auth.service")
    assert settings["LoadCredential"] == ["master_key:/etc/coap-auth/master.key"]
    assert settings["ExecStart"] == [f"{INSTALLED}/bin/coap-auth-with-secrets serve"]
    assert settings["Environment"] == ["COAP_AUTH_DATA_DIR=%S/coap-auth"]
    admin = (DEPLOY / "coap-auth-admin").read_text()
    for same in ("User=coap-auth", "StateDirectory=coap-auth", "LoadCredential=master_key:"):
        assert same in admin  # the admin commands run as the service does


def test_scripts_are_valid_shell() -> None:
    for name in ("coap-auth-with-secrets", "coap-auth-admin"):
        script = DEPLOY / name
        assert script.stat().st_mode & 0o111, f"{name} is not executable"
        assert subprocess.run(["sh", "-n", str(script)], timeout=10).returncode == 0


async def test_service_command_line_runs_with_the_key_from_its_credential(
    tmp_path: Path,
) -> None:
    """What systemd runs for coap-auth.service, with what it sets: CREDENTIALS_DIRECTORY
    holding the key (base64url text), the unit's Environment=. The key never reaches the
    state directory, and the CLI given the same credential reads the same store."""
    local_unit("coap-auth.service", tmp_path)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    (credentials / "master_key").write_text(key + "\n")  # as `print` writes it
    state = tmp_path / "state" / "coap-auth"
    env = clean_env(
        CREDENTIALS_DIRECTORY=str(credentials),
        COAP_AUTH_DATA_DIR=str(state),
        COAP_AUTH_BIND="127.0.0.1",
        COAP_AUTH_PORT="0",
    )
    exec_start = unit_settings("coap-auth.service")["ExecStart"][0]
    argv = shlex.split(exec_start.replace(INSTALLED, str(tmp_path)))
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT)
        assert LISTENING_LINE.match(line.decode().strip()), line
        assert (state / "coap-auth.sqlite3").exists()
        assert not (state / "master.key").exists()
        admin = [str(tmp_path / "bin" / "coap-auth-with-secrets"), "keys", "list", "--json"]
        listed = subprocess.run(admin, env=env, capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert '"active"' in listed.stdout
        without = dict(env, CREDENTIALS_DIRECTORY=str(tmp_path / "none"))
        refused = subprocess.run(admin, env=without, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2
        assert "no master key" in refused.stderr
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 10)


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("coap-auth-sensor.service", "no state file at"),
        ("coap-auth-thermostat.service", "cannot start"),
    ],
)
def test_example_unit_command_lines_are_accepted(tmp_path: Path, unit: str, expected: str) -> None:
    """The examples take the units' arguments (argparse would say `usage:`); with nothing
    provisioned yet they stop on the missing state file or key, as they should."""
    local_unit(unit, tmp_path)
    exec_start = unit_settings(unit)["ExecStart"][0]
    state = tmp_path / "state"
    values = {
        "%S": str(state),
        "${AS_URI}": "coap://127.0.0.1:1",
        "${AUDIENCE}": "thermostat",
        "${RS_URI}": "coap://127.0.0.1:2",
        INSTALLED: str(tmp_path),
        "--port 5685": "--port 0",
    }
    for name, value in values.items():
        exec_start = exec_start.replace(name, value)
    assert "$" not in exec_start and "%" not in exec_start
    result = subprocess.run(
        shlex.split(exec_start), capture_output=True, text=True, timeout=30, env=clean_env()
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "usage:" not in output, output
    assert expected in output, output


# -- the container image and compose file ---------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_runs_the_wheel_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    ops = {op: [arg for o, arg in final if o == op] for op, _ in final}
    assert all(arg.startswith("python:3.11-slim") for o, arg in instructions if o == "FROM")
    user = ops["USER"][-1].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    assert ops["EXPOSE"] == ["5683/udp"]
    assert ops["VOLUME"] == ['["/var/lib/coap-auth"]']
    assert any("COAP_AUTH_DATA_DIR=/var/lib/coap-auth" in env for env in ops["ENV"])
    assert any('pip install --no-cache-dir "$1[postgres]"' in run for run in ops["RUN"])
    assert ops["ENTRYPOINT"] == ['["/usr/local/bin/coap-auth-with-secrets"]']
    assert ops["HEALTHCHECK"][0].endswith('CMD ["/usr/local/bin/coap-auth-with-secrets", "check"]')
    # Every file the image copies exists, and .dockerignore does not leave it out.
    ignored = (ROOT / ".dockerignore").read_text().split()
    for op, arg in instructions:
        if op == "COPY" and "--from" not in arg:
            for source in [a for a in arg.split() if not a.startswith("--")][:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source


def test_compose_runs_the_service_on_postgresql_without_secrets_in_it() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    service = compose["services"]["coap-auth"]
    postgres = compose["services"]["postgres"]
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    )
    assert service["ports"] == ["5683:5683/udp"]
    assert service["volumes"] == ["coap-auth-data:/var/lib/coap-auth"]
    assert "coap-auth-data" in compose["volumes"]
    store = service["environment"]["COAP_AUTH_STORE"]
    assert re.fullmatch(r"postgresql://coap@postgres:5432/coap", store)  # no password in it
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert set(service["secrets"]) == {"master_key", "postgres_password"}
    for secret in compose["secrets"].values():
        path = DEPLOY / secret["file"]
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, timeout=10)
        assert ignored.returncode == 0, f"{path} would be committable"
    assert "MASTER_KEY=" not in text and "PASSWORD:" not in text
    assert not re.search(r"postgresql://[^@\s]*:[^@\s]*@", text)


def test_compose_config_is_valid_where_docker_compose_exists() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30
        ).returncode
    ):
        pytest.skip("no `docker compose` here: the file is checked by the test above")
    secrets_dir = DEPLOY / "secrets"
    if not secrets_dir.exists():
        pytest.skip("deploy/secrets/ not made (README): compose refuses missing secret files")
    result = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
