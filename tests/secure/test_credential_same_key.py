"""EdhocCredential.same_key takes a token's cnf COSE_Key in either point form: the AS sends it
compressed (RFC 9053 §7.1.1: y the sign bit) in CWTs, uncompressed in JWTs. It raises nothing."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from coap_auth.secure.credentials import make_credential
from coap_auth.tokens import compress_cose_key, cose_key_from_public

KTY, CRV, X, Y = 1, -1, -2, -3


def test_same_key_takes_both_point_forms() -> None:
    for _ in range(8):  # both parities of y, almost surely
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        credential = make_credential("sensor-1", public_key)
        full = cose_key_from_public(public_key)
        compressed = compress_cose_key(full)
        # Independently: X9.62 compressed, 0x03 for an odd y.
        x962 = public_key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        assert compressed[Y] is (x962[0] == 0x03)

        assert credential.same_key(full) and credential.same_key(compressed)
        assert credential.same_key(public_key)
        assert not credential.same_key({**compressed, Y: not compressed[Y]})
        other = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
        assert not credential.same_key(other)
        assert not credential.same_key(compress_cose_key(other))


def test_same_key_raises_nothing() -> None:
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    credential = make_credential("sensor-1", public_key)
    compressed = compress_cose_key(cose_key_from_public(public_key))
    for junk in (
        None,
        b"",
        [],
        {},
        {**compressed, Y: 1 if compressed[Y] else 0},  # an int is no sign bit
        {**compressed, Y: None},
        {**compressed, X: compressed[X][1:]},
        {**compressed, KTY: 1},
        {**compressed, CRV: 2},
    ):
        assert credential.same_key(junk) is False
