"""One byte form per CWT (docs/protocol.md "Canonical tokens", issue 13): re-encodings of an
issued token, signed tokens that are not in deterministic encoding, `crit`, low-s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.keys import KeyRing, SigningKey
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    cose,
    cose_key_from_public,
    decode_cose,
    encode_cwt,
    encode_maced_cwt,
    peek_kid,
    token_hash,
    verify_cwt,
    verify_maced_cwt,
)
from coap_auth.wire import CoseAlg
from tests.tokens.variants import (
    NOW,
    cwt_parts,
    cwt_variants,
    ed25519_plus_l,
    is_low_s,
    sample_claims,
    signature_twin,
)

ALGS = [CoseAlg.ES256, CoseAlg.EDDSA]
MAC_KEY = bytes(range(32))
MAC_KID = b"mac-kid"


def _claims() -> Claims:
    holder = ec.generate_private_key(ec.SECP256R1()).public_key()
    # nbf, cnf and scope too: their keys (5, 8, 9) came out of order before (issue 13).
    return sample_claims(nbf=NOW, cnf=cose_key_from_public(holder))


def _recording(key: SigningKey) -> tuple[Callable[[bytes], VerificationKey | None], list[bytes]]:
    looked_up: list[bytes] = []

    def lookup(kid: bytes) -> VerificationKey | None:
        looked_up.append(kid)
        return key.verification_key() if kid == key.kid else None

    return lookup, looked_up


# The variant names, from a throwaway token of each kind.
_sample = KeyRing.initial(CoseAlg.ES256, NOW).active
SIGN1_VARIANTS = list(
    cwt_variants(encode_cwt(_claims(), _sample.private_key, _sample.alg, _sample.kid), es256=True)
)
MAC0_VARIANTS = list(cwt_variants(encode_maced_cwt(_claims(), MAC_KEY, MAC_KID), es256=False))


def test_issued_cwt_is_in_deterministic_encoding() -> None:
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    token = encode_cwt(_claims(), key.private_key, key.alg, key.kid)
    assert token[:4] == b"\xd8\x3d\xd2\x84"  # 61(18([...])), shortest heads
    _, (protected, unprotected, payload, _) = cwt_parts(token)
    assert unprotected == {} and token[4 + len(cbor2.dumps(protected))] == 0xA0
    for encoded in (protected, payload):
        decoded = cbor2.loads(encoded)
        # cbor2 keeps the order it read: equal bytes mean shortest heads in this key order.
        assert cbor2.dumps(decoded) == encoded
        assert list(decoded) == sorted(decoded, key=cbor2.dumps)
    assert list(cbor2.loads(payload)) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("variant", SIGN1_VARIANTS)
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_reencoded_signed_cwt_is_refused_before_key_lookup(alg: CoseAlg, variant: str) -> None:
    key = KeyRing.initial(alg, NOW).active
    token = encode_cwt(_claims(), key.private_key, key.alg, key.kid)
    variants = cwt_variants(token, es256=alg == CoseAlg.ES256)
    if variant not in variants:
        pytest.skip("ES256 only")
    lookup, looked_up = _recording(key)
    assert verify_cwt(token, lookup).sub == "sensor-1"
    looked_up.clear()

    other = variants[variant]
    assert token_hash(other) != token_hash(token)
    with pytest.raises(MalformedToken):
        verify_cwt(other, lookup)
    assert looked_up == []
    with pytest.raises(MalformedToken):
        decode_cose(other)
    with pytest.raises(MalformedToken):
        peek_kid(other)
    assert peek_kid(token) == key.kid


@pytest.mark.parametrize("variant", MAC0_VARIANTS)
def test_reencoded_maced_cwt_is_refused(variant: str) -> None:
    claims = _claims()
    token = encode_maced_cwt(claims, MAC_KEY, MAC_KID)
    assert verify_maced_cwt(token, MAC_KEY) == claims
    other = cwt_variants(token, es256=False)[variant]
    with pytest.raises(MalformedToken):
        verify_maced_cwt(other, MAC_KEY)
    with pytest.raises(MalformedToken):
        peek_kid(other)


def test_variants_are_twins_not_forgeries() -> None:
    """Each variant still carries the token's valid signature (so a lenient verifier takes
    it): the same signed parts, and a high-s twin that OpenSSL verifies."""
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    token = encode_cwt(_claims(), key.private_key, key.alg, key.kid)
    _, (protected, _, payload, signature) = cwt_parts(token)
    signed = cbor2.dumps(["Signature1", protected, b"", payload])
    twin = signature_twin(signature)
    assert not is_low_s(twin)
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    r, s = int.from_bytes(twin[:32], "big"), int.from_bytes(twin[32:], "big")
    key.private_key.public_key().verify(
        encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA256())
    )
    for name, other in cwt_variants(token, es256=True).items():
        item = cbor2.loads(other)
        inner = item.value if item.tag == 61 else item
        assert inner.value[0] == protected and inner.value[2] == payload, name


# -- low-s -------------------------------------------------------------------------------------


def test_es256_cwt_signatures_are_low_s() -> None:
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    claims = _claims()
    for _ in range(200):  # half would be high-s without normalisation: 2^-200 by chance
        _, parts = cwt_parts(encode_cwt(claims, key.private_key, key.alg, key.kid))
        assert is_low_s(parts[3])


def test_high_s_is_refused_by_the_cose_layer_too() -> None:
    """cose.verify_sign1 (used for client assertions) refuses the twin: InvalidSignature."""
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    token = encode_cwt(_claims(), key.private_key, key.alg, key.kid)
    _, parts = cwt_parts(token)
    message = decode_cose(token)
    cose.verify_sign1(message, key.private_key.public_key(), CoseAlg.ES256)
    twin = cose.CoseMessage(
        message.tag,
        message.protected_bytes,
        message.protected,
        message.unprotected,
        message.payload,
        signature_twin(parts[3]),
    )
    with pytest.raises(InvalidSignature, match="low s"):
        cose.verify_sign1(twin, key.private_key.public_key(), CoseAlg.ES256)


def test_eddsa_signature_with_s_plus_l_is_refused() -> None:
    key = KeyRing.initial(CoseAlg.EDDSA, NOW).active
    token = encode_cwt(_claims(), key.private_key, key.alg, key.kid)
    tag, parts = cwt_parts(token)
    other = cbor2.dumps(
        cbor2.CBORTag(61, cbor2.CBORTag(tag, [*parts[:3], ed25519_plus_l(parts[3])]))
    )
    with pytest.raises(InvalidSignature):
        verify_cwt(other, _recording(key)[0])


# -- signed by the right key, but not in the one form --------------------------------------------


def _signed(
    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    protected: bytes,
    payload: bytes,
    *,
    unprotected: dict[Any, Any] | None = None,
    tag: int = 18,
) -> bytes:
    """61(18([...])) over exactly these bytes, signed by hand (low-s), as a key holder could."""
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private_key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if not is_low_s(signature):
            signature = signature_twin(signature)
    else:
        signature = private_key.sign(to_sign)
    parts = [protected, unprotected or {}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(61, cbor2.CBORTag(tag, parts)))


def _header(key: SigningKey, **extra: Any) -> dict[Any, Any]:
    return {1: int(key.alg), 4: key.kid, **{int(k[1:]): v for k, v in extra.items()}}


def _payload() -> bytes:
    return cbor2.dumps(_claims().to_cwt_map())


@pytest.fixture
def es256_key() -> SigningKey:
    return KeyRing.initial(CoseAlg.ES256, NOW).active


def test_hand_signed_canonical_token_verifies(es256_key: SigningKey) -> None:
    """The control for the tests below: the hand signer makes tokens we accept."""
    token = _signed(es256_key.private_key, cbor2.dumps(_header(es256_key)), _payload())
    assert verify_cwt(token, _recording(es256_key)[0]).sub == "sensor-1"


@pytest.mark.parametrize(
    "protected",
    [
        pytest.param(lambda h: cbor2.dumps({4: h[4], 1: h[1]}), id="keys in reverse"),
        pytest.param(lambda h: b"\xa2\x01\x38\x06\x04" + cbor2.dumps(h[4]), id="alg -7 long head"),
        pytest.param(lambda h: b"\xbf" + cbor2.dumps(h)[1:] + b"\xff", id="indefinite map"),
        pytest.param(lambda h: cbor2.dumps(h) + b"\x00", id="trailing byte"),
        pytest.param(lambda h: cbor2.dumps([h[1], h[4]]), id="not a map"),
    ],
)
def test_signed_protected_header_not_deterministic_is_refused(
    es256_key: SigningKey, protected: Callable[[dict[Any, Any]], bytes]
) -> None:
    token = _signed(es256_key.private_key, protected(_header(es256_key)), _payload())
    lookup, looked_up = _recording(es256_key)
    with pytest.raises(MalformedToken, match="protected header"):
        verify_cwt(token, lookup)
    assert looked_up == []


def _map_with(claims: dict[int, Any], key: int, raw: bytes) -> bytes:
    """The claims map with the value of `key` written as these raw bytes."""
    entries = (cbor2.dumps(k) + (raw if k == key else cbor2.dumps(v)) for k, v in claims.items())
    return bytes([0xA0 | len(claims)]) + b"".join(entries)


def _length_first_claims() -> bytes:
    # cbor2's canonical=True: -1 (0x20) before 24 (0x18 0x18), RFC 7049 order.
    return cbor2.dumps({**_claims().to_cwt_map(), -1: 0, 24: 0}, canonical=True)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda m: cbor2.dumps(dict(reversed(list(m.items())))), id="keys reversed"),
        pytest.param(
            lambda m: _map_with(m, 4, b"\x1b" + m[4].to_bytes(8, "big")),
            id="exp in a nine-byte head",
        ),
        pytest.param(
            lambda m: _map_with(m, 2, b"\x7f" + cbor2.dumps(m[2]) + b"\xff"), id="sub indefinite"
        ),
        pytest.param(lambda m: cbor2.dumps(m) + b"\xf6", id="trailing null"),
        pytest.param(lambda m: _length_first_claims(), id="length-first key order"),
        pytest.param(lambda m: cbor2.dumps({**m, 5: 1.5}), id="nbf 1.5 as a double"),
    ],
)
def test_signed_claims_not_deterministic_are_refused(
    es256_key: SigningKey, payload: Callable[[dict[int, Any]], bytes]
) -> None:
    claims = {int(k): v for k, v in _claims().to_cwt_map().items()}
    token = _signed(es256_key.private_key, cbor2.dumps(_header(es256_key)), payload(claims))
    lookup, looked_up = _recording(es256_key)
    with pytest.raises(MalformedToken, match="CWT claims"):
        verify_cwt(token, lookup)
    assert looked_up == []


def test_claims_in_bytewise_order_are_accepted(es256_key: SigningKey) -> None:
    """The other half of the length-first case: the same map sorted bytewise verifies."""
    claims = {**_claims().to_cwt_map(), 24: 0, -1: 0}
    ordered = dict(sorted(claims.items(), key=lambda kv: cbor2.dumps(kv[0])))
    assert list(ordered)[-2:] == [24, -1]
    token = _signed(es256_key.private_key, cbor2.dumps(_header(es256_key)), cbor2.dumps(ordered))
    assert verify_cwt(token, _recording(es256_key)[0]).sub == "sensor-1"


def test_kid_in_the_unprotected_header_is_refused(es256_key: SigningKey) -> None:
    """RFC 8392 A.3's layout (kid unprotected): valid COSE, not our one form."""
    protected = cbor2.dumps({1: -7})
    token = _signed(es256_key.private_key, protected, _payload(), unprotected={4: es256_key.kid})
    with pytest.raises(MalformedToken, match="unprotected"):
        verify_cwt(token, _recording(es256_key)[0])


def test_encrypt0_tag_16_is_refused(es256_key: SigningKey) -> None:
    token = _signed(es256_key.private_key, cbor2.dumps(_header(es256_key)), _payload(), tag=16)
    with pytest.raises(MalformedToken, match="COSE"):
        verify_cwt(token, _recording(es256_key)[0])


# -- crit (RFC 9052 §3.1) ------------------------------------------------------------------------


@pytest.mark.parametrize("crit", [[4], [1], [1, 4]], ids=str)
def test_crit_naming_what_we_process_is_accepted(es256_key: SigningKey, crit: list[int]) -> None:
    header = {**_header(es256_key), 2: crit}
    token = _signed(es256_key.private_key, cbor2.dumps(dict(sorted(header.items()))), _payload())
    assert verify_cwt(token, _recording(es256_key)[0]).sub == "sensor-1"
    assert peek_kid(token) == es256_key.kid


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({2: [99], 99: 0}, "does not process"),
        ({2: ["exp-hint"], "exp-hint": 1}, "does not process"),
        ({2: [3], 3: 0}, "does not process"),  # content type: we do not look at it
        ({2: [5]}, "absent"),
        ({2: [[4]]}, "absent"),
        ({2: []}, "non-empty array"),
        ({2: 4}, "non-empty array"),
    ],
    ids=[
        "unknown-int",
        "unknown-text",
        "content-type",
        "absent",
        "not-label",
        "empty",
        "not-array",
    ],
)
def test_crit_naming_what_we_do_not_process_is_refused(
    es256_key: SigningKey, extra: dict[Any, Any], reason: str
) -> None:
    header = {**_header(es256_key), **extra}
    ordered = dict(sorted(header.items(), key=lambda kv: cbor2.dumps(kv[0])))
    token = _signed(es256_key.private_key, cbor2.dumps(ordered), _payload())
    lookup, looked_up = _recording(es256_key)
    with pytest.raises(MalformedToken, match=reason):
        verify_cwt(token, lookup)
    assert looked_up == []
    with pytest.raises(MalformedToken, match=reason):
        peek_kid(token)


def test_crit_in_the_unprotected_header_is_refused(es256_key: SigningKey) -> None:
    item = cbor2.CBORTag(18, [cbor2.dumps(_header(es256_key)), {2: [4]}, _payload(), b"s" * 64])
    with pytest.raises(MalformedToken, match="crit must be in the protected header"):
        cose.decode(item)


def test_unknown_non_critical_protected_parameter_is_ignored(es256_key: SigningKey) -> None:
    """RFC 9052 §3: a signed parameter we do not know, not marked critical, is ignored."""
    header = {**_header(es256_key), 99: 0}
    token = _signed(es256_key.private_key, cbor2.dumps(header), _payload())
    assert verify_cwt(token, _recording(es256_key)[0]).sub == "sensor-1"
