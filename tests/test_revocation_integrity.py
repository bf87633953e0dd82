"""Revocations cannot be undone quietly, end to end: a token revoked through `coap-auth serve`
(or a client's families killed by the CLI), then un-revoked with plain SQL by someone who has
the database but not the master key, is reported by `coap-auth audit verify` (exit 2), which
names the token hash's prefix and never the token.
"""

from __future__ import annotations

from pathlib import Path

import aiocoap
import cbor2

from coap_auth.tokens.token_hash import token_hash
from tests import test_registry_integrity
from tests.test_registry_integrity import (
    ACCESS_TOKEN,
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN,
    Deployment,
    Registered,
    _post,
    _served,
)

# The same deployments (SQLite, and PostgreSQL when configured) and registrations.
deployment = test_registry_integrity.deployment
registered = test_registry_integrity.registered

PREFIX_HEX = 16
UNDONE = "revocation undone: "


async def _issue(registered: Registered, tmp_path: Path, *, revoke: bool) -> bytes:
    """An access token for sensor-1 from the running server, revoked over /revoke if asked."""
    credentials = {CLIENT_ID: "sensor-1", CLIENT_SECRET: registered.secret}
    async with _served(registered, tmp_path) as (url, context):
        response, body = await _post(context, url + "/token", credentials)
        assert response.code == aiocoap.CREATED, body
        token = body[ACCESS_TOKEN]
        if revoke:
            response, _ = await _post(context, url + "/revoke", {TOKEN: token, **credentials})
            assert response.code == aiocoap.CHANGED
    return token


async def _unrevoke(deployment: Deployment, th: bytes) -> None:
    """What the attacker did: the row un-revoked, a TRL update removing it, the feed bumped."""
    await deployment.tamper("UPDATE access_tokens SET revoked_at = NULL WHERE token_hash = $1", th)
    await deployment.tamper(
        "INSERT INTO trl_updates (seq, at, removed, added)"
        " SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3 FROM trl_updates",
        0,
        cbor2.dumps([th]),
        cbor2.dumps([]),
    )
    await deployment.tamper("UPDATE change_feed SET revocations = revocations + 1")


def _problems(deployment: Deployment, token: bytes) -> list[str]:
    result = deployment.cli("audit", "verify")
    assert result.returncode == 2, result.stdout
    for secret in (token.hex(), token_hash(token).hex()):
        assert secret not in result.stderr + result.stdout
    return [line for line in result.stderr.splitlines() if line.startswith("coap-auth: error:")]


async def test_an_unrevoked_access_token_is_reported(
    registered: Registered, tmp_path: Path
) -> None:
    deployment = registered.deployment
    token = await _issue(registered, tmp_path, revoke=True)
    th = token_hash(token)
    stdout = deployment.cli_ok("audit", "verify")
    assert "revocations match the audit log: 1 unexpired revoked tokens" in stdout

    await _unrevoke(deployment, th)

    problems = _problems(deployment, token)
    assert len(problems) == 1, problems
    (line,) = problems
    assert UNDONE + f"access token {th.hex()[:PREFIX_HEX]}..." in line
    assert "it is not revoked in access_tokens" in line
    assert "TRL update" in line


async def test_a_revived_family_and_its_tokens_are_reported(
    registered: Registered, tmp_path: Path
) -> None:
    deployment = registered.deployment
    token = await _issue(registered, tmp_path, revoke=False)
    th = token_hash(token)
    deployment.cli_ok("tokens", "revoke", "--client", "sensor-1")
    deployment.cli_ok("audit", "verify")

    await _unrevoke(deployment, th)
    await deployment.tamper("UPDATE refresh_families SET killed_at = NULL, kill_reason = NULL")

    problems = _problems(deployment, token)
    assert len(problems) == 2, problems
    assert any(f"access token {th.hex()[:PREFIX_HEX]}..." in line for line in problems)
    assert any("refresh family" in line and "alive again" in line for line in problems)
