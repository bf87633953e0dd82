"""In-process measurements: device-side verification against raw `cryptography`, token sizes.

Rates are taken in interleaved rounds (ours, raw, ours, raw, ...) and compared round by round,
so that outside load on a shared machine lands on both sides of each comparison.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coap_auth.keys import KID_BYTES
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    cose_key_from_public,
    decode_cose,
    encode_cwt,
    encode_jwt,
    encode_maced_cwt,
    verify_cwt,
    verify_jwt,
)
from coap_auth.tokens.cose_key import b64url_decode
from coap_auth.wire import CoseAlg
from device_client import KeySet, TokenVerifier

ISSUER = "coap-auth"  # the default `issuer` setting
CLIENT_ID = "sensor-1"
AUDIENCE = "thermostat"
SCOPE = "temp:read temp:write"


def sample_claims(with_cnf: bool) -> Claims:
    """What the service puts in a token for the bench client (TokenMinter.mint in
    coap_auth.service.minting)."""
    now = int(time.time())
    cnf = None
    if with_cnf:
        device_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        cnf = cose_key_from_public(device_key)
    return Claims(
        iss=ISSUER, sub=CLIENT_ID, aud=AUDIENCE, exp=now + 3600, iat=now,
        cti=os.urandom(8), scope=SCOPE, cnf_key=cnf,
    )  # fmt: skip


@dataclass(frozen=True)
class SigningSetup:
    alg: CoseAlg
    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    kid: bytes

    @property
    def verification_key(self) -> VerificationKey:
        return VerificationKey(self.kid, self.alg, self.private_key.public_key())


def signing_setups() -> list[SigningSetup]:
    return [
        SigningSetup(CoseAlg.ES256, ec.generate_private_key(ec.SECP256R1()), os.urandom(KID_BYTES)),
        SigningSetup(CoseAlg.EDDSA, ed25519.Ed25519PrivateKey.generate(), os.urandom(KID_BYTES)),
    ]


# -- verification rates ---------------------------------------------------------------------


def _batch_seconds(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - started


def compare_rates(
    candidates: dict[str, Callable[[], object]],
    baseline: str,
    rounds: int = 80,
    batch: float = 0.004,
) -> tuple[dict[str, float], dict[str, float]]:
    """Rates (calls/s) and ratios to `baseline` on a noisy, shared machine.

    Every round times one short batch of each candidate back to back, so the batches of a
    round see the same outside load. A candidate's ratio is the median over the rounds of
    its rate divided by the baseline's rate in the same round; its rate is its median rate.
    """
    calls = {
        name: max(1, int(batch / max(_batch_seconds(fn, 20) / 20, 1e-9)))
        for name, fn in candidates.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(calls[name] / _batch_seconds(fn, calls[name]))
    rates = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {
        name: statistics.median(a / b for a, b in zip(values, samples[baseline], strict=True))
        for name, values in samples.items()
    }
    return rates, ratios


def _raw_verifier(setup: SigningSetup, signed: bytes, signature: bytes) -> Callable[[], None]:
    """`cryptography` alone on the same bytes and signature: the floor of any verifier."""
    public_key = setup.private_key.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        half = len(signature) // 2
        der = encode_dss_signature(
            int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
        )
        algorithm = ec.ECDSA(hashes.SHA256())
        return lambda: public_key.verify(der, signed, algorithm)
    return lambda: public_key.verify(signature, signed)  # type: ignore[call-arg]


def _cwt_signed_bytes(token: bytes) -> tuple[bytes, bytes]:
    import cbor2

    message = decode_cose(token)
    signed = cbor2.dumps(["Signature1", message.protected_bytes, b"", message.payload])
    return signed, message.tag_or_signature


def _jwt_signed_bytes(token: bytes) -> tuple[bytes, bytes]:
    header, payload, signature = token.split(b".")
    return header + b"." + payload, b64url_decode(signature.decode())


@dataclass(frozen=True)
class VerificationRow:
    token: str  # e.g. "CWT ES256"
    device_rate: float  # TokenVerifier.verify_offline: signature, claims, TRL hash, scope
    codec_rate: float  # verify_cwt / verify_jwt alone: signature and claims decoding
    raw_rate: float  # cryptography's verify on the same bytes
    device_ratio: float  # device / raw, paired by round
    codec_ratio: float  # codec / raw, paired by round


def verification_rates() -> list[VerificationRow]:
    rows = []
    claims = sample_claims(with_cnf=False)
    for setup in signing_setups():
        keys = KeySet((setup.verification_key,))
        verifier = TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)
        for kind in ("CWT", "JWT"):
            if kind == "CWT":
                token = encode_cwt(claims, setup.private_key, setup.alg, setup.kid)
                signed, signature = _cwt_signed_bytes(token)
                codec = verify_cwt
            else:
                token = encode_jwt(claims, setup.private_key, setup.alg, setup.kid)
                signed, signature = _jwt_signed_bytes(token)
                codec = verify_jwt
            verifier.verify_offline(token, scope="temp:read")  # it must verify at all
            rates, ratios = compare_rates(
                {
                    "device": lambda t=token, v=verifier: v.verify_offline(t, scope="temp:read"),
                    "codec": lambda t=token, c=codec, k=keys: c(t, k.lookup),
                    "raw": _raw_verifier(setup, signed, signature),
                },
                baseline="raw",
            )
            rows.append(
                VerificationRow(
                    f"{kind} {setup.alg.name}",
                    rates["device"],
                    rates["codec"],
                    rates["raw"],
                    ratios["device"],
                    ratios["codec"],
                )
            )
    return rows


# -- sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeRow:
    cwt: str
    with_cnf: bool
    cwt_bytes: int
    jwt: str
    jwt_bytes: int

    @property
    def ratio(self) -> float:
        return self.cwt_bytes / self.jwt_bytes


def token_sizes() -> list[SizeRow]:
    """Our CWTs against our JWT for the same claims; a MACed CWT against the ES256 JWT (a
    MACed audience gets no JWT at all; ES256 is the JWT it would otherwise get)."""
    es256, eddsa = signing_setups()
    mac_key, mac_kid = os.urandom(32), os.urandom(KID_BYTES)
    rows = []
    for with_cnf in (False, True):
        claims = sample_claims(with_cnf)

        def jwt(setup: SigningSetup, c: Claims = claims) -> int:
            return len(encode_jwt(c, setup.private_key, setup.alg, setup.kid))

        def cwt(setup: SigningSetup, c: Claims = claims) -> int:
            return len(encode_cwt(c, setup.private_key, setup.alg, setup.kid))

        mac = len(encode_maced_cwt(claims, mac_key, mac_kid))
        rows += [
            SizeRow("Sign1 ES256", with_cnf, cwt(es256), "JWT ES256", jwt(es256)),
            SizeRow("Sign1 EdDSA", with_cnf, cwt(eddsa), "JWT EdDSA", jwt(eddsa)),
            SizeRow("Mac0 HMAC 256/64", with_cnf, mac, "JWT ES256", jwt(es256)),
        ]
    return rows
