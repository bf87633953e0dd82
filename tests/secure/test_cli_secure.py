"""Issue 14's commands: `edhoc-credential` shows what devices are provisioned with, the same
on every run; `clients oscore` provisions and withdraws a context, refusing unknown clients."""

from __future__ import annotations

import json
from pathlib import Path

from coap_auth.secure.credentials import parse_credential
from coap_auth.secure.provisioned import names
from tests.processes import cli_ok, run_cli


def test_edhoc_credential_is_stable_and_parses(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cli_ok("init", data_dir=data_dir)
    shown = json.loads(cli_ok("edhoc-credential", "--json", data_dir=data_dir))
    assert shown == json.loads(cli_ok("edhoc-credential", "--json", data_dir=data_dir))
    assert (shown["method"], shown["cipher_suite"]) == (3, 2)
    credential = parse_credential(bytes.fromhex(shown["ccs"]))
    assert credential.subject == shown["subject"] == "coap-auth"
    assert credential.kid.hex() == shown["kid"]
    text = cli_ok("edhoc-credential", data_dir=data_dir)
    assert f"ccs: {shown['ccs']}" in text and "BEGIN PUBLIC KEY" in text
    # Derived from the master key: another data directory has another credential.
    other = tmp_path / "other"
    cli_ok("init", data_dir=other)
    assert json.loads(cli_ok("edhoc-credential", "--json", data_dir=other)) != shown


def test_clients_oscore_provisions_and_removes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cli_ok("init", data_dir=data_dir)
    cli_ok("audiences", "add", "thermostat", data_dir=data_dir)
    refused = run_cli("clients", "oscore", "nobody", data_dir=data_dir)
    assert refused.returncode == 2 and "no enabled client 'nobody'" in refused.stderr
    cli_ok(
        "clients",
        "add",
        "legacy",
        "--audience",
        "thermostat",
        "--scope",
        "x",
        "--secret",
        data_dir=data_dir,
    )
    device = json.loads(cli_ok("clients", "oscore", "legacy", "--json", data_dir=data_dir))
    assert len(bytes.fromhex(device["master_secret"])) == 16
    assert device["sender_id"] != device["recipient_id"]
    settings = json.loads(next((data_dir / "oscore").glob("*/settings.json")).read_text())
    # The AS's side is the mirror image of the device's.
    assert settings["recipient-id_hex"] == device["sender_id"]
    assert settings["sender-id_hex"] == device["recipient_id"]
    (name,) = names(data_dir / "oscore")
    assert (data_dir / "oscore" / name / "settings.json").stat().st_mode & 0o077 == 0
    conf = cli_ok("clients", "oscore", "legacy", data_dir=data_dir)
    assert f'master_secret,hex,"{device["master_secret"]}"' not in conf  # a fresh context
    assert conf.endswith("hkdf_alg,integer,-10\n") and "sender_id,hex," in conf
    assert "client.oscore_provisioned" in cli_ok("audit", "tail", data_dir=data_dir)
    cli_ok("clients", "oscore", "legacy", "--remove", data_dir=data_dir)
    assert [d for d in (data_dir / "oscore").iterdir() if d.is_dir()] == []
    again = run_cli("clients", "oscore", "legacy", "--remove", data_dir=data_dir)
    assert again.returncode == 2
    assert "audit log intact" in cli_ok("audit", "verify", data_dir=data_dir)
