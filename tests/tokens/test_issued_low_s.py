"""The AS's own ES256 tokens are low-s (issue 13: 23 of 40 were not), CWT and JWT alike:
1,000 of each, issued through the service in-process (tests/device_client covers the wire)."""

from __future__ import annotations

import asyncio

import cbor2
import pytest

from coap_auth.service import AuthService, TokenRequest
from coap_auth.store import Audience, Client
from coap_auth.tokens import token_hash
from coap_auth.wire import CoseAlg
from tests.tokens.variants import b64url_lenient, is_low_s

COUNT = 1000
SECRET = "secret-of-low-s-client-0123456789abcdef"


@pytest.fixture
async def issuer(service: AuthService) -> AuthService:
    now = service.clock.now()
    await service.store.add_audience(Audience("meter-cwt", "cwt", 600, now), "operator")
    await service.store.add_audience(Audience("meter-jwt", "jwt", 600, now), "operator")
    await service.store.add_client(
        Client(
            "low-s-client",
            ("meter-cwt", "meter-jwt"),
            ("temp:read",),
            now,
            secret_digest=service.secret_digest(SECRET),
        ),
        "operator",
    )
    return service


def _signature(token: bytes) -> bytes:
    if token.startswith(b"ey"):
        return b64url_lenient(token.decode("ascii").rpartition(".")[2])
    return cbor2.loads(token).value.value[3]


@pytest.mark.parametrize("audience", ["meter-cwt", "meter-jwt"])
async def test_a_thousand_issued_es256_tokens_are_low_s(issuer: AuthService, audience: str) -> None:
    request = TokenRequest(client_id="low-s-client", client_secret=SECRET, audience=audience)
    assert issuer.keys.ring().active.alg == CoseAlg.ES256  # the default (docs/protocol.md)
    issued = await asyncio.gather(*(issuer.issue_token(request) for _ in range(COUNT)))
    tokens = [i.access_token for i in issued]
    assert len({token_hash(t) for t in tokens}) == COUNT
    assert all(t.startswith(b"ey") == (audience == "meter-jwt") for t in tokens)
    high = [t for t in tokens if not is_low_s(_signature(t))]
    assert high == []
