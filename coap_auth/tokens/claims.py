"""The claims of an access token, in their CWT (RFC 8392) and JWT (RFC 9068) forms.

Decoding checks types; `validate` checks time, issuer and audience against a `now` passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coap_auth.errors import InvalidClaims, MalformedToken, UnsupportedPopKey
from coap_auth.tokens.cose_key import b64url, b64url_decode, cose_key_to_jwk, jwk_to_cose_key
from coap_auth.wire import CnfMethod, CwtClaim, OscoreInput

# Module aliases of the labels `from_cwt_map` reads on every verification.
_ISS, _SUB, _AUD, _EXP, _NBF, _IAT, _CTI, _CNF, _SCOPE = (
    CwtClaim.ISS,
    CwtClaim.SUB,
    CwtClaim.AUD,
    CwtClaim.EXP,
    CwtClaim.NBF,
    CwtClaim.IAT,
    CwtClaim.CTI,
    CwtClaim.CNF,
    CwtClaim.SCOPE,
)


@dataclass(frozen=True, slots=True)
class Claims:
    iss: str
    sub: str
    aud: str
    exp: int
    iat: int
    cti: bytes
    scope: str | None = None
    nbf: int | None = None
    # RFC 8747 §3.1: the confirmation key as a COSE_Key map, for PoP tokens.
    cnf_key: Mapping[int, Any] | None = field(default=None, hash=False)
    # RFC 9203 §3.2.1: cnf {4: OSCORE_Input_Material} of an OSCORE-profile token (only ever
    # in an encrypted CWT: it holds the master secret). At most one of cnf_key and cnf_osc.
    cnf_osc: Mapping[int, Any] | None = field(default=None, hash=False, repr=False)

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split()) if self.scope else frozenset()

    def to_cwt_map(self) -> dict[int, Any]:
        """The claims map, in key order (encode it with `deterministic.dumps` all the same)."""
        out: dict[int, Any] = {
            CwtClaim.ISS: self.iss,
            CwtClaim.SUB: self.sub,
            CwtClaim.AUD: self.aud,
            CwtClaim.EXP: self.exp,
        }
        if self.nbf is not None:
            out[CwtClaim.NBF] = self.nbf
        out[CwtClaim.IAT] = self.iat
        out[CwtClaim.CTI] = self.cti
        if self.cnf_key is not None:
            out[CwtClaim.CNF] = {CnfMethod.COSE_KEY: dict(self.cnf_key)}
        elif self.cnf_osc is not None:
            out[CwtClaim.CNF] = {CnfMethod.OSC: dict(self.cnf_osc)}
        if self.scope is not None:
            out[CwtClaim.SCOPE] = self.scope
        return out

    def to_jwt_dict(self) -> dict[str, Any]:
        # RFC 9068 §2.2: iss, exp, aud, sub, client_id, iat, jti are required.
        out: dict[str, Any] = {
            "iss": self.iss,
            "sub": self.sub,
            "aud": self.aud,
            "exp": self.exp,
            "iat": self.iat,
            "jti": b64url(self.cti),
            "client_id": self.sub,
        }
        if self.nbf is not None:
            out["nbf"] = self.nbf
        if self.scope is not None:
            out["scope"] = self.scope
        if self.cnf_osc is not None:
            raise ValueError("an OSCORE-profile token is a CWT (its cnf holds a secret)")
        if self.cnf_key is not None:
            out["cnf"] = {"jwk": cose_key_to_jwk(self.cnf_key)}
        return out

    @classmethod
    def from_cwt_map(cls, claims: Any) -> Claims:
        # Every device verification comes here: claim labels are read through the module's
        # aliases (an enum member lookup costs ~0.1 us), and exact types skip the general
        # checks. The checks, their order and messages are those `_text` and `_date` make.
        if not isinstance(claims, dict):
            raise MalformedToken("CWT claims must be a map")
        get = claims.get
        cnf = get(_CNF)
        cnf_key = cnf_osc = None
        if cnf is not None:
            # RFC 8747 §3.1: one confirmation method; we issue a COSE_Key, or (RFC 9203) an
            # OSCORE_Input_Material.
            if not (isinstance(cnf, dict) and len(cnf) == 1):
                raise MalformedToken("cnf claim must hold one confirmation method")
            if isinstance(cnf.get(CnfMethod.COSE_KEY), dict):
                cnf_key = cnf[CnfMethod.COSE_KEY]
            elif isinstance(cnf.get(CnfMethod.OSC), dict):
                cnf_osc = check_oscore_input(cnf[CnfMethod.OSC])
            else:
                raise MalformedToken("cnf claim must hold a COSE_Key or OSCORE input material")
        scope = get(_SCOPE)
        if scope is not None and not isinstance(scope, str):
            raise MalformedToken("scope claim must be a text string")
        iss, sub, aud = get(_ISS), get(_SUB), get(_AUD)
        if not isinstance(iss, str):
            raise MalformedToken("iss claim must be a text string")
        if not isinstance(sub, str):
            raise MalformedToken("sub claim must be a text string")
        if not isinstance(aud, str):
            raise MalformedToken("aud claim must be a text string")
        exp, iat, cti, nbf = get(_EXP), get(_IAT), get(_CTI), get(_NBF)
        if type(exp) is not int:
            exp = _date(exp, "exp")
        if type(iat) is not int:
            iat = _date(iat, "iat")
        if not isinstance(cti, bytes):
            raise MalformedToken("cti claim must be a byte string")
        if nbf is not None and type(nbf) is not int:
            nbf = _date(nbf, "nbf")
        return cls(iss, sub, aud, exp, iat, cti, scope, nbf, cnf_key, cnf_osc)

    @classmethod
    def from_jwt_dict(cls, claims: Any) -> Claims:
        if not isinstance(claims, dict):
            raise MalformedToken("JWT claims must be an object")
        jti = claims.get("jti")
        if not isinstance(jti, str):
            raise MalformedToken("jti claim must be a string")
        try:
            cti = b64url_decode(jti)
        except MalformedToken:
            raise MalformedToken("jti claim is not base64url") from None
        scope = claims.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise MalformedToken("scope claim must be a string")
        return cls(
            iss=_text(claims, "iss", "iss"),
            sub=_text(claims, "sub", "sub"),
            aud=_text(claims, "aud", "aud"),
            exp=_date(claims.get("exp"), "exp"),
            iat=_date(claims.get("iat"), "iat"),
            cti=cti,
            scope=scope,
            nbf=None if claims.get("nbf") is None else _date(claims["nbf"], "nbf"),
            cnf_key=_jwt_cnf_key(claims.get("cnf")),
        )

    def validate(
        self,
        *,
        now: int,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: int = 0,
    ) -> None:
        """Raise InvalidClaims unless the token is valid at `now` for this issuer and audience."""
        if now >= self.exp + leeway:
            raise InvalidClaims("token expired")
        if self.nbf is not None and now + leeway < self.nbf:
            raise InvalidClaims("token not yet valid")
        if issuer is not None and self.iss != issuer:
            raise InvalidClaims("token from another issuer")
        if audience is not None and self.aud != audience:
            raise InvalidClaims("token for another audience")


# RFC 9203 §3.2.1 / RFC 8613 §3.2: what this side can derive a context from.
_OSCORE_TYPES: dict[int, type | tuple[type, ...]] = {
    OscoreInput.ID: bytes,
    OscoreInput.VERSION: int,
    OscoreInput.MS: bytes,
    OscoreInput.HKDF: (int, str),
    OscoreInput.ALG: (int, str),
    OscoreInput.SALT: bytes,
    OscoreInput.CONTEXT_ID: bytes,
}
MIN_MASTER_SECRET_BYTES = 16


def check_oscore_input(material: Any) -> dict[int, Any]:
    """An OSCORE_Input_Material map (RFC 9203 §3.2.1) checked for types: `id` and `ms` (at
    least 16 bytes) present, version 1 when given, no label outside Table 1. Raises
    MalformedToken, naming the label but never a value."""
    if not isinstance(material, dict):
        raise MalformedToken("OSCORE input material must be a map")
    for label, value in material.items():
        expected = _OSCORE_TYPES.get(label) if isinstance(label, int) else None
        if expected is None:
            raise MalformedToken("OSCORE input material has an unknown parameter")
        if isinstance(value, bool) or not isinstance(value, expected):
            raise MalformedToken(f"OSCORE input material parameter {label} has the wrong type")
    if OscoreInput.ID not in material or OscoreInput.MS not in material:
        raise MalformedToken("OSCORE input material needs id and ms")
    if len(material[OscoreInput.MS]) < MIN_MASTER_SECRET_BYTES:
        raise MalformedToken("OSCORE master secret shorter than 16 bytes")
    if material.get(OscoreInput.VERSION, 1) != 1:
        raise MalformedToken("OSCORE version other than 1")
    return dict(material)


def _jwt_cnf_key(cnf: Any) -> dict[int, Any] | None:
    """RFC 7800 §3.2: cnf {"jwk": JWK} back to the COSE_Key a CWT's cnf holds (RFC 8747)."""
    if cnf is None:
        return None
    if not (isinstance(cnf, dict) and len(cnf) == 1 and "jwk" in cnf):
        raise MalformedToken("cnf claim must hold a JWK")
    try:
        return jwk_to_cose_key(cnf["jwk"])
    except UnsupportedPopKey:
        raise MalformedToken("cnf claim must hold a public P-256 or Ed25519 JWK") from None


def _text(claims: Mapping[Any, Any], key: Any, name: str) -> str:
    value = claims.get(key)
    if not isinstance(value, str):
        raise MalformedToken(f"{name} claim must be a text string")
    return value


def _date(value: Any, name: str) -> int:
    # RFC 8392 §2: NumericDate; we issue integers and accept floats by truncation.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedToken(f"{name} claim must be a NumericDate")
    if value != value or value in (float("inf"), float("-inf")):
        raise MalformedToken(f"{name} claim must be a NumericDate")
    return int(value)
