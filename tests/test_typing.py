"""The device library and the token code stay `mypy --strict` clean (issue 15), with the
configuration in pyproject.toml ([tool.mypy]: strict, and aiocoap/lakers, which ship no types,
as Any), and device_client says so to its users with a py.typed marker (PEP 561)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api as mypy_api

ROOT = Path(__file__).resolve().parent.parent


def test_device_client_ships_py_typed() -> None:
    assert (ROOT / "device_client" / "py.typed").is_file()


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    # From the project root, so pyproject.toml's [tool.mypy] applies; the cache (.mypy_cache)
    # makes later runs fast.
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = mypy_api.run(
        ["--strict", "--config-file", "pyproject.toml", "device_client", "coap_auth/tokens"]
    )
    assert status == 0, f"mypy --strict failed:\n{stdout}{stderr}"
    assert "Success" in stdout, stdout
