"""COSE_Key (RFC 9052 §7, RFC 9053 §7) and JWK (RFC 7517/8037) forms of public keys.

A `VerificationKey` is what a verifier needs: a kid, the one algorithm the key may be used
with (never the algorithm a token claims), and the public key.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.errors import MalformedToken, UnsupportedPopKey
from coap_auth.wire import CoseAlg, CoseCurve, CoseKeyOp, CoseKeyParam, CoseKty

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

JWS_ALG = {CoseAlg.ES256: "ES256", CoseAlg.EDDSA: "EdDSA"}
_P256_COORD = 32
_ED25519_LEN = 32
# RFC 7515 §2 / RFC 4648 §5: the base64url alphabet, no padding, no whitespace.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# The members of the JWKs `cose_key_to_jwk` writes, and all `jwk_to_cose_key` reads.
_EC_JWK = frozenset({"kty", "crv", "x", "y"})
_OKP_JWK = frozenset({"kty", "crv", "x"})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Unpadded base64url in its one form: `b64url(result) == text`, else MalformedToken.

    Python's decoder skips characters outside the alphabet and ignores the unused low bits
    of the last character, so several texts would decode to one value; we take one text."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise MalformedToken("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise MalformedToken("base64url with non-zero unused bits")
    return data


def kid_text(kid: bytes) -> str:
    """The one text form of a byte-string kid: lowercase hex (JWT `kid`, CLI, logs)."""
    return kid.hex()


def alg_for_key(key: PublicKey | PrivateKey) -> CoseAlg:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("only P-256 elliptic-curve keys are supported")
        return CoseAlg.ES256
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return CoseAlg.EDDSA
    raise ValueError("unsupported key type")


def cose_key_from_public(
    public_key: PublicKey,
    *,
    kid: bytes | None = None,
    alg: CoseAlg | None = None,
    key_ops: tuple[CoseKeyOp, ...] = (),
) -> dict[int, Any]:
    """The COSE_Key map of a public key; optional members only when given.

    Raises ValueError for anything but a P-256 or Ed25519 key.
    """
    alg_for_key(public_key)
    out: dict[int, Any]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        out = {
            CoseKeyParam.KTY: CoseKty.EC2,
            CoseKeyParam.CRV: CoseCurve.P256,
            CoseKeyParam.X: numbers.x.to_bytes(_P256_COORD, "big"),
            CoseKeyParam.Y: numbers.y.to_bytes(_P256_COORD, "big"),
        }
    else:
        out = {
            CoseKeyParam.KTY: CoseKty.OKP,
            CoseKeyParam.CRV: CoseCurve.ED25519,
            CoseKeyParam.X: _raw_ed25519(public_key),
        }
    if kid is not None:
        out[CoseKeyParam.KID] = kid
    if alg is not None:
        out[CoseKeyParam.ALG] = alg
    if key_ops:
        out[CoseKeyParam.KEY_OPS] = list(key_ops)
    return out


_P256_PRIME = 2**256 - 2**224 + 2**192 + 2**96 - 1


def public_key_from_cose(cose_key: Any) -> PublicKey:
    """Parse a COSE_Key map into a public key, refusing anything but P-256 and Ed25519.

    Raises UnsupportedPopKey: the error RFC 9200 §5.8.3 names for a key the AS cannot use.
    """
    if not isinstance(cose_key, Mapping):
        raise UnsupportedPopKey("COSE_Key must be a map")
    kty = cose_key.get(CoseKeyParam.KTY)
    crv = cose_key.get(CoseKeyParam.CRV)
    # Exact ints only: True, 1.0 and friends compare equal to 1 but are not COSE labels.
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (kty, crv)):
        raise UnsupportedPopKey("COSE_Key kty and crv must be integers")
    x = cose_key.get(CoseKeyParam.X)
    if CoseKeyParam.D in cose_key and kty != CoseKty.SYMMETRIC:
        raise UnsupportedPopKey("COSE_Key must not contain a private key")
    if kty == CoseKty.EC2 and crv == CoseCurve.P256:
        y = cose_key.get(CoseKeyParam.Y)
        if _is_coord(x) and isinstance(y, bool):
            # RFC 9053 §7.1.1: a compressed point, y the SEC 1 §2.3.3 sign bit (the parity
            # of y: true when odd), i.e. the X9.62 compressed form 0x02 | sign, then x.
            try:
                return ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), bytes([0x02 | y]) + x
                )
            except ValueError:
                raise UnsupportedPopKey("EC2 point is not on P-256") from None
        if not (_is_coord(x) and _is_coord(y)):
            raise UnsupportedPopKey("EC2 key needs a 32-byte x and a 32-byte y or a sign bit")
        if max(int.from_bytes(x, "big"), int.from_bytes(y, "big")) >= _P256_PRIME:
            # One key, one form: a coordinate past the field prime names the same point as
            # its reduction, which a byte comparison of keys would tell apart.
            raise UnsupportedPopKey("EC2 point is not on P-256")
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError:
            raise UnsupportedPopKey("EC2 point is not on P-256") from None
    if kty == CoseKty.OKP and crv == CoseCurve.ED25519:
        if not (isinstance(x, bytes) and len(x) == _ED25519_LEN):
            raise UnsupportedPopKey("OKP key needs a 32-byte x")
        return ed25519.Ed25519PublicKey.from_public_bytes(x)
    raise UnsupportedPopKey("only EC2 P-256 and OKP Ed25519 keys are supported")


def compress_cose_key(cose_key: Mapping[int, Any]) -> dict[int, Any]:
    """The same COSE_Key with an EC2 P-256 point in compressed form (RFC 9053 §7.1.1: `y` the
    sign bit, CBOR true when y is odd), 33 bytes shorter in CBOR; any other key, or one
    already compressed, unchanged (a copy). Other members (kid, alg, ...) are kept.

    Raises UnsupportedPopKey for an EC2 P-256 key that `public_key_from_cose` refuses.
    """
    out = dict(cose_key)
    kty, crv = out.get(CoseKeyParam.KTY), out.get(CoseKeyParam.CRV)
    if (
        isinstance(kty, int)
        and not isinstance(kty, bool)
        and kty == CoseKty.EC2
        and isinstance(crv, int)
        and not isinstance(crv, bool)
        and crv == CoseCurve.P256
        and not isinstance(out.get(CoseKeyParam.Y), bool)
    ):
        public_key = public_key_from_cose(out)  # a point on the curve, or UnsupportedPopKey
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        out[CoseKeyParam.Y] = public_key.public_numbers().y % 2 == 1
    return out


def same_public_key(a: Any, b: Any) -> bool:
    """Whether two COSE_Keys name the same public key, whichever point form each uses (a
    compressed EC2 key equals its uncompressed form). Raises nothing: a map that is no
    usable public key equals nothing."""
    try:
        first, second = public_key_from_cose(a), public_key_from_cose(b)
    except (UnsupportedPopKey, ValueError):
        return False
    return _public_bytes(first) == _public_bytes(second)


def jwk_from_public(
    public_key: PublicKey, *, kid: str | None = None, alg: CoseAlg | None = None
) -> dict[str, Any]:
    """The JWK (RFC 7517; OKP per RFC 8037) of a public key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        jwk: dict[str, Any] = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(_P256_COORD, "big")),
            "y": b64url(numbers.y.to_bytes(_P256_COORD, "big")),
        }
    else:
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(_raw_ed25519(public_key))}
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = JWS_ALG[alg]
        jwk["use"] = "sig"
    return jwk


def cose_key_to_jwk(cose_key: Mapping[int, Any]) -> dict[str, Any]:
    """Translate a PoP COSE_Key into the JWK a JWT `cnf` carries (RFC 7800 §3.2)."""
    return jwk_from_public(public_key_from_cose(cose_key))


def jwk_to_cose_key(jwk: Any) -> dict[int, Any]:
    """The inverse of `cose_key_to_jwk`: the COSE_Key of a public EC P-256 or OKP Ed25519 JWK.

    Strict: exactly the members `cose_key_to_jwk` writes (no `d`, no extras), coordinates in
    canonical base64url of the right length, a point on the curve. Raises UnsupportedPopKey.
    """
    if not isinstance(jwk, Mapping):
        raise UnsupportedPopKey("JWK must be an object")
    members = frozenset(jwk)
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "EC" and crv == "P-256" and members == _EC_JWK:
        cose_key = {
            CoseKeyParam.KTY: CoseKty.EC2,
            CoseKeyParam.CRV: CoseCurve.P256,
            CoseKeyParam.X: _jwk_bytes(jwk["x"]),
            CoseKeyParam.Y: _jwk_bytes(jwk["y"]),
        }
    elif kty == "OKP" and crv == "Ed25519" and members == _OKP_JWK:
        cose_key = {
            CoseKeyParam.KTY: CoseKty.OKP,
            CoseKeyParam.CRV: CoseCurve.ED25519,
            CoseKeyParam.X: _jwk_bytes(jwk["x"]),
        }
    else:
        raise UnsupportedPopKey("JWK must be a public EC P-256 or OKP Ed25519 key, nothing more")
    # Through the public key: checks lengths and the point, and gives the one COSE_Key form.
    return cose_key_from_public(public_key_from_cose(cose_key))


def _jwk_bytes(value: Any) -> bytes:
    try:
        return b64url_decode(value)
    except MalformedToken:
        raise UnsupportedPopKey("JWK coordinates must be unpadded base64url") from None


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A published public key: the kid it is found by and the only algorithm it verifies."""

    kid: bytes
    alg: CoseAlg
    public_key: PublicKey

    def to_cose_key(self) -> dict[int, Any]:
        return cose_key_from_public(
            self.public_key, kid=self.kid, alg=self.alg, key_ops=(CoseKeyOp.VERIFY,)
        )

    def to_jwk(self) -> dict[str, Any]:
        return jwk_from_public(self.public_key, kid=kid_text(self.kid), alg=self.alg)

    @classmethod
    def from_cose_key(cls, cose_key: Mapping[int, Any]) -> VerificationKey:
        """Read one entry of a COSE_KeySet (as a device does with `/keys`)."""
        kid = cose_key.get(CoseKeyParam.KID)
        if not isinstance(kid, bytes):
            raise ValueError("COSE_Key in a key set needs a byte-string kid")
        public_key = public_key_from_cose(cose_key)
        alg = alg_for_key(public_key)
        if cose_key.get(CoseKeyParam.ALG, alg) != alg:
            raise ValueError("COSE_Key alg does not match its key type")
        return cls(kid=kid, alg=alg, public_key=public_key)


def _is_coord(value: Any) -> TypeGuard[bytes]:
    return isinstance(value, bytes) and len(value) == _P256_COORD


def _public_bytes(public_key: PublicKey) -> bytes:
    """The key type and its one byte form (X9.62 uncompressed for P-256, raw for Ed25519)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return b"EC2" + public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return b"OKP" + _raw_ed25519(public_key)


def _raw_ed25519(public_key: ed25519.Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
