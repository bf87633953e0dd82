"""`make demo` runs and shows every step: grant, refresh, key rollover and revocation, each
seen by the thermostat (the resource server), with the service started by the CLI with its
defaults: the sensor and the thermostat reach it over the protected channel (EDHOC, OSCORE).

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
            r"^\[thermostat\] reading [\d.]+ C from sensor-1$",
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
        r"^\[coap-auth\] coap-auth listening on coap://127\.0\.0\.1:\d+$",
        r"^\[thermostat\] keys: 2 published keys: \w{16} \w{16}$",
    ):
        assert _first(lines, pattern) < setup_end, pattern

    _first(lines, r"^\[sensor\] protected channel: EDHOC \+ OSCORE with the AS as sensor-1$")

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
