"""`make demo` runs and shows every step: grant, refresh, key rollover and revocation, each
seen by the thermostat (the resource server), with the service started by the CLI with its
defaults: the sensor and the thermostat reach it over the protected channel (EDHOC, OSCORE),
and the sensor's readings reach the thermostat under the EDHOC + OSCORE profile. Then a
second device with the sensor's stolen token is refused every way it tries: EDHOC with its
own key (and the sensor's name), after uploading the token, plain CoAP, and a datagram forged
with the sensor's address and port. Last, a second audience of the coap_oscore profile: its
AES keys exported to its resource server (never shown), a second sensor's readings under the
RFC 9203 context.

The children print concurrently, so the test orders only what must be ordered: the demo's
own lines, and each child's evidence between the action that caused it and the step's end.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT = 180  # s; the demo itself takes about 10

# (step, evidence that must appear after the cause and before the step's "demo: ... ok")
STEPS = [
    (
        "grant",
        r"^== step 1: grant",
        [
            r"^\[sensor\] grant: new token \w{8} for thermostat, expires in 6 s",
            r"^\[thermostat\] authz-info: accepted token \w{8} of sensor-1 signed by key \w{16}",
            r"^\[thermostat\] reading [\d.]+ C from sensor-1 \(edhoc_oscore,"
            r" coap://127\.0\.0\.1:\d+\)$",
        ],
    ),
    ("refresh", r"^demo: grant ok: ", [r"^\[sensor\] refresh: new token \w{8} for thermostat"]),
    (
        "rollover",
        r"^\$ coap-auth keys rotate$",
        [
            r"^\[thermostat\] keys: rollover seen: published \w{16}",
            r"^\[coap-auth\] family default: active key \w{16}; next key \w{16}$",
        ],
    ),
    (
        "revocation",
        r"^\$ coap-auth tokens revoke --client sensor-1$",
        [
            r"^\[thermostat\] revocation list: \d+ hashes, [1-9]\d* new$",
            r"^\[sensor\] grant: new token \w{8}",
        ],
    ),
    (
        "stolen token",
        r"^== step 5: a stolen token",
        [
            r"^\[thief\] took the sensor's token \(\d+ bytes\)",
            # In message_3 when it fits (refused: its cnf is not the thief's key), else skipped.
            r"^\[thief\] EDHOC (as thief, token in message_3: refused \(.*EDHOC error 1"
            r"|with the token in message_3: skipped, \d+ bytes is more than)",
            r"^\[thief\] POST /authz-info with the token: 2\.01 Created",
            r"^\[thief\] EDHOC as thief after the upload: refused \(.*EDHOC error 1",
            r"^\[thief\] EDHOC as sensor-1 after the upload: refused \(.*EDHOC error 1",
            r"^\[thief\] plain PUT /temperature from its own address: 4\.01 Unauthorized$",
            r"^\[thief\] forged datagram (from the sensor's address 127\.0\.0\.1:\d+:"
            r" 4\.01 Unauthorized|: skipped, a raw socket needs root or CAP_NET_RAW)$",
        ],
    ),
    (
        "coap_oscore",
        r"^== step 6: the coap_oscore profile",
        [
            r"^\[sensor-2\] grant: new token \w{8} for lock",
            r"^\[lock\] authz-info: accepted token \w{8} of sensor-2 encrypted under key \w{16},"
            r" scope temp:write, coap_oscore: bound to a new OSCORE context$",
            r"^\[lock\] reading [\d.]+ C from sensor-2 \(coap_oscore, coap://127\.0\.0\.1:\d+\)$",
        ],
    ),
]


def _first(lines: list[str], pattern: str, start: int = 0) -> int:
    regex = re.compile(pattern)
    for i in range(start, len(lines)):
        if regex.search(lines[i]):
            return i
    raise AssertionError(f"no line {pattern!r} after line {start}:\n" + "\n".join(lines))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_shows_every_step() -> None:
    result = subprocess.run(
        ["make", "-s", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=DEMO_TIMEOUT
    )
    output = result.stdout
    assert result.returncode == 0, output[-4000:] + result.stderr[-2000:]
    lines = output.splitlines()

    # The operator's setup through the CLI, then the children come up.
    setup_end = _first(lines, r"^== step 1: grant")
    for pattern in (
        r"^\$ coap-auth init$",
        r"^\$ coap-auth edhoc-credential --json$",
        r"^\$ coap-auth audiences add thermostat .* --introspect-public-key ",
        r"^\$ coap-auth clients add sensor-1 .* --public-key ",
        r"^\[thermostat\] revocation list: over EDHOC \+ OSCORE as thermostat$",
        r"^\[thermostat\] profiles: edhoc_oscore$",
        r"^\$ coap-auth audiences add lock --profile coap_oscore .* --introspect-public-key ",
        r"^\$ coap-auth keys export lock > lock-token-keys\.txt$",
        r"^\[coap-auth\] \(lock-token-keys\.txt: secret keys, not shown\)$",
        r"^\$ coap-auth clients add sensor-2 --audience lock .* --public-key ",
        r"^\[lock\] profiles: edhoc_oscore, coap_oscore$",
        r"^\[lock\] revocation list: over EDHOC \+ OSCORE as lock$",
        r"^\[coap-auth\] coap-auth listening on coap://127\.0\.0\.1:\d+$",
        r"^\[thermostat\] keys: 2 published keys: \w{16} \w{16}$",
    ):
        assert _first(lines, pattern) < setup_end, pattern

    _first(lines, r"^\[sensor\] protected channel: EDHOC \+ OSCORE with the AS as sensor-1$")
    _first(lines, r"^\[sensor\] security context with the thermostat set up: edhoc_oscore, token")
    _first(lines, r"^\[sensor-2\] security context with the thermostat set up: coap_oscore, token")

    position = setup_end
    for name, cause, evidence in STEPS:
        start = _first(lines, cause, position)
        end = _first(lines, rf"^demo: {name} ok: ", start)
        for pattern in evidence:
            assert start < _first(lines, pattern, start) < end, (name, pattern, output)
        position = end
    _first(lines, r"^demo: all steps done$", position)

    # The tokens the thermostat accepted after the rotation were signed by the key that
    # `keys rotate` made active.
    active = re.search(r"^\[coap-auth\] family default: active key (\w{16});", output, re.M)
    assert active is not None
    assert f"signed by the new key {active.group(1)} accepted" in output
    assert "Traceback" not in output + result.stderr
    # The thief planted nothing: every reading the thermostat took came from the sensor.
    readings = [line for line in lines if line.startswith("[thermostat] reading ")]
    assert readings and all(" from sensor-1 (edhoc_oscore, " in line for line in readings)
    assert not any(line.startswith("[thermostat] reading 99.9 ") for line in lines)
    assert "ACCEPTED" not in output
    # The exported AES keys (a base64url COSE_KeySet) went to a file, never to the output.
    assert not re.search(r"^\[coap-auth\] [A-Za-z0-9_-]{40,}=*$", output, re.M)
