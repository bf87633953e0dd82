"""`make bench-timing`: is a client id's existence visible in the time /token takes to refuse?

Median time of a refused client_credentials grant (AuthService.issue_token: the /token path,
on the registry cache) for known vs unknown client ids (in-process, SQLite store): secret,
ES256 and EdDSA assertions; every attempt fails (wrong secret, or an assertion
signed with the wrong key for the known id), as an attacker probing ids would. The cases run
interleaved in random order, so drift of the machine hits each alike (issue 13, item 7).
"""

import asyncio
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.clock import SettableClock
from coap_auth.config import Settings
from coap_auth.errors import InvalidClient
from coap_auth.service import AuthService, TokenRequest
from coap_auth.store import Audience, Client, MasterKey, SqliteStore
from coap_auth.tokens import Claims, cose_key_from_public
from coap_auth.tokens.cose import sign1
from coap_auth.wire import CoseAlg

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3000


def assertion(key: Any, alg: CoseAlg, client_id: str, now: int) -> bytes:
    """A tagged client assertion CWT (docs/protocol.md) signed with `key`."""
    claims = Claims(
        iss=client_id,
        sub=client_id,
        aud="coap://as.test",
        exp=now + 120,
        iat=now,
        cti=secrets.token_bytes(8),
    )
    return cbor2.dumps(cbor2.CBORTag(61, sign1(cbor2.dumps(claims.to_cwt_map()), key, alg, b"k")))


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            issuer="coap://as.test",
            rate_limit_per_address=0,
            rate_limit_per_client=0,
        )
        master = MasterKey.load(Path(tmp), create=True)
        store = SqliteStore.in_data_dir(Path(tmp), master)
        await store.open()
        clock = SettableClock()
        service = AuthService(store, master, settings, clock)
        await service.load_keys()
        now = clock.now()
        await store.add_audience(Audience("thermostat", "cwt", 600, now), "operator")
        await store.add_client(
            Client(
                "sensor-1",
                ("thermostat",),
                ("r",),
                now,
                secret_digest=service.secret_digest("right-secret"),
            ),
            "operator",
        )
        es, ed = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
        await store.add_client(
            Client(
                "meter-es",
                ("thermostat",),
                ("r",),
                now,
                public_key=cose_key_from_public(es.public_key()),
            ),
            "operator",
        )
        await store.add_client(
            Client(
                "meter-ed",
                ("thermostat",),
                ("r",),
                now,
                public_key=cose_key_from_public(ed.public_key()),
            ),
            "operator",
        )
        wrong_es, wrong_ed = (
            ec.generate_private_key(ec.SECP256R1()),
            ed25519.Ed25519PrivateKey.generate(),
        )
        cases = {
            "secret known": ("sensor-1", "wrong-secret-0123456789", None),
            "secret unknown": ("ghost-1", "wrong-secret-0123456789", None),
            "ES256 known": (None, None, assertion(wrong_es, CoseAlg.ES256, "meter-es", now)),
            "ES256 unknown": (None, None, assertion(wrong_es, CoseAlg.ES256, "ghost-es", now)),
            "EdDSA known": (None, None, assertion(wrong_ed, CoseAlg.EDDSA, "meter-ed", now)),
            "EdDSA unknown": (None, None, assertion(wrong_ed, CoseAlg.EDDSA, "ghost-ed", now)),
        }
        samples: dict[str, list[int]] = {name: [] for name in cases}
        for _ in range(200):  # warm up
            for args in cases.values():
                try:
                    await _grant(service, *args)
                except InvalidClient:
                    pass
        order = list(cases.items())
        for _ in range(RUNS):
            random.shuffle(order)  # interleaved, in random order: drift hits every case alike
            for name, args in order:
                start = time.perf_counter_ns()
                try:
                    await _grant(service, *args)
                except InvalidClient:
                    pass
                else:
                    raise AssertionError(name)
                samples[name].append(time.perf_counter_ns() - start)
        await store.close()
    for kind in ("secret", "ES256", "EdDSA"):
        known = statistics.median(samples[f"{kind} known"]) / 1000
        unknown = statistics.median(samples[f"{kind} unknown"]) / 1000
        diff = unknown - known
        print(f"{kind:6}  known {known:7.1f} us   unknown {unknown:7.1f} us   diff {diff:+6.1f} us")


async def _grant(
    service: AuthService, client_id: str | None, secret: str | None, assertion: bytes | None
) -> None:
    request = TokenRequest(client_id=client_id, client_secret=secret, client_assertion=assertion)
    await service.issue_token(request)


if __name__ == "__main__":
    asyncio.run(main())
