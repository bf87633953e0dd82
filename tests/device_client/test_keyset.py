"""KeySet: parsing a COSE_KeySet (content format 102) as /keys serves it; pure, no network."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.tokens import cose_key_from_public
from coap_auth.wire import CoseAlg, CoseKeyOp
from device_client import KeySet


def _entry(key: object, kid: bytes, alg: CoseAlg) -> dict[int, object]:
    return cose_key_from_public(
        key.public_key(),  # type: ignore[attr-defined]
        kid=kid,
        alg=alg,
        key_ops=(CoseKeyOp.VERIFY,),
    )


def test_parses_p256_and_ed25519_and_skips_what_it_cannot_use() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    edkey = ed25519.Ed25519PrivateKey.generate()
    payload = cbor2.dumps(
        [
            _entry(p256, b"k-p256", CoseAlg.ES256),
            _entry(edkey, b"k-ed", CoseAlg.EDDSA),
            {1: 3, 2: b"k-rsa", -1: b"\x01" * 256, -2: b"\x01\x00\x01"},  # RSA: not ours
            {1: 2, -1: 1, -2: b"\x00" * 32, -3: b"\x00" * 32},  # no kid
            {1: 4, 2: b"k-short", 3: 4, -1: b"\x00" * 8},  # HMAC key too short
            _entry(ec.generate_private_key(ec.SECP256R1()), b"k-p256", CoseAlg.ES256),  # dup
        ]
    )
    keys = KeySet.from_cose_key_set(payload)
    assert keys.kids == {b"k-p256", b"k-ed"}
    assert keys.lookup(b"k-p256").alg == CoseAlg.ES256  # type: ignore[union-attr]
    assert keys.lookup(b"k-p256").public_key.public_numbers() == (  # type: ignore[union-attr]
        p256.public_key().public_numbers()  # the first of a duplicated kid wins
    )
    assert keys.lookup(b"k-ed").alg == CoseAlg.EDDSA  # type: ignore[union-attr]
    assert keys.lookup(b"nope") is None
    assert keys.shared == {}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff", id="not-cbor"),
        pytest.param(cbor2.dumps({1: 2}), id="not-an-array"),
        pytest.param(cbor2.dumps([b"key"]), id="entry-not-a-map"),
        pytest.param(cbor2.dumps([{1: 2, 2: b"k" * 64}] * 300), id="too-large"),
    ],
)
def test_malformed_key_sets(payload: bytes) -> None:
    with pytest.raises(ValueError):
        KeySet.from_cose_key_set(payload)
