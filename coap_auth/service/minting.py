"""Minting access tokens: claims by the audience's profile, the key of its family, the encoding
(signed or MACed CWT, encrypted CWT for coap_oscore, JWT), and the confirmation key (PoP)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coap_auth.clock import Clock
from coap_auth.config import Settings
from coap_auth.errors import InvalidRequest, UnsupportedPopKey
from coap_auth.secure.credentials import PeerCredential
from coap_auth.service.rollover import KeyRollover
from coap_auth.store import Audience, Client, IssuedAccess
from coap_auth.tokens import (
    Claims,
    compress_cose_key,
    cose_key_from_public,
    encode_cwt,
    encode_jwt,
    encode_maced_cwt,
    public_key_from_cose,
    token_hash,
)
from coap_auth.tokens.cwt import encode_encrypted_cwt
from coap_auth.wire import (
    MAX_TOKEN_LIFETIME,
    AceProfile,
    CnfMethod,
    CoseAlg,
    CoseCurve,
    CoseKeyParam,
    CoseKty,
    GrantType,
    OscoreInput,
    TokenType,
)

CTI_BYTES = 8
# RFC 9203 §3.2.1 OSCORE input material of a coap_oscore token: a random id (unique in
# practice: 64 bits), master secret and master salt; AEAD, HKDF and version at the RFC 8613
# defaults, no ID Context.
OSCORE_ID_BYTES = 8
OSCORE_MASTER_SECRET_BYTES = 16
OSCORE_SALT_BYTES = 8
# The ace_profile (38) value of each audience profile; none for bearer tokens.
ACE_PROFILES = {
    "coap_oscore": AceProfile.COAP_OSCORE,
    "edhoc_oscore": AceProfile.COAP_EDHOC_OSCORE,
}


@dataclass(frozen=True, slots=True)
class TokenRequest:
    grant_type: GrantType = GrantType.CLIENT_CREDENTIALS
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_assertion: bytes | None = field(default=None, repr=False)
    audience: str | None = None
    scope: str | None = None
    req_cnf: Mapping[Any, Any] | None = None
    refresh_token: bytes | None = field(default=None, repr=False)
    token_format: str | None = None
    # Who the protected channel (EDHOC + OSCORE) authenticated; None on plain CoAP.
    peer: PeerCredential | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: bytes = field(repr=False)
    expires_in: int
    token_type: TokenType
    claims: Claims
    # Set when the granted scope is narrower than the one requested (RFC 6749 §5.1).
    narrowed_scope: str | None = None
    # {1: COSE_Key} or, for coap_oscore, {4: OSCORE input material}: it holds the master
    # secret, so it is never shown.
    cnf: Mapping[int, Any] | None = field(default=None, repr=False)
    refresh_token: bytes | None = field(default=None, repr=False)
    # The audience's ACE profile (None: bearer), and for edhoc_oscore the RS's key
    # {1: COSE_Key} when the audience registered one.
    profile: AceProfile | None = None
    rs_cnf: Mapping[int, Any] | None = None
    # For the access log and `tokens revoke --hash`: the token's RFC 9770 hash, and the
    # refresh family it belongs to (never the token itself).
    token_hash: bytes = b""
    family_id: bytes | None = None
    # What TokenMinter.mint made: "jwt", or "cwt" (signed, MACed or encrypted).
    token_format: str = "cwt"

    @property
    def hash_prefix(self) -> str:
        """The first 16 hex digits of the token hash: unique enough to name it in a log."""
        return self.token_hash.hex()[:16]


class TokenMinter:
    """Mints the access tokens of grants and refreshes, with the active key of each audience's
    family (the key rollover's rings, in memory: minting reads no store)."""

    def __init__(self, keys: KeyRollover, settings: Settings, clock: Clock) -> None:
        self.keys = keys
        self.settings = settings
        self.clock = clock

    def mint(
        self,
        client_id: str,
        audience: Audience,
        scope: str,
        cnf: Mapping[int, Any] | None,
        token_format: str | None,
    ) -> IssuedToken:
        """One access token for `audience`, by its profile: coap_oscore an encrypted CWT
        with fresh OSCORE input material (`cnf` must be None: see _confirmation_key), the
        others a signed or MACed token bound to `cnf` when given. Raises InvalidRequest for
        a JWT where only a CWT can be."""
        now = self.clock.now()
        # An audience registered before the cap may say more; verifiers refuse longer tokens.
        lifetime = min(audience.lifetime, MAX_TOKEN_LIFETIME)
        oscore = audience.profile == "coap_oscore"
        material = _oscore_material() if oscore else None
        key = self.keys.ring(audience.key_family).active
        jwt = (token_format or audience.token_format) == "jwt"
        # (A symmetric family MACs a CWT whatever format the audience names.)
        as_cwt = not jwt or isinstance(key.private_key, bytes)
        if cnf is not None and audience.profile == "edhoc_oscore" and as_cwt:
            # A CWT carries the client's point compressed (RFC 9053 §7.1.1), 33 bytes less,
            # so the token fits EAD_3 of EDHOC message_3 (draft-ietf-ace-edhoc-oscore-profile
            # -11 §4.1). A JWT keeps its full JWK (RFC 7518 has no compressed form). The
            # refresh family keeps the key uncompressed: a refresh's req_cnf is compared
            # with that.
            cnf = compress_cose_key(cnf)
        claims = Claims(
            iss=self.settings.issuer,
            sub=client_id,
            aud=audience.audience_id,
            exp=now + lifetime,
            iat=now,
            cti=secrets.token_bytes(CTI_BYTES),
            scope=scope,
            cnf_key=cnf,
            cnf_osc=material,
        )
        if material is not None:
            # RFC 9203 §3.2: the master secret is encrypted for the RS alone.
            if token_format == "jwt":
                raise InvalidRequest(
                    f"audience {audience.audience_id} takes encrypted CWTs (coap_oscore), not JWTs"
                )
            if key.alg != CoseAlg.AES_CCM_16_64_128 or not isinstance(key.private_key, bytes):
                raise RuntimeError(f"family {audience.key_family!r} has no AES key to encrypt with")
            access_token = encode_encrypted_cwt(claims, key.private_key, key.kid)
        elif isinstance(key.private_key, bytes):
            if token_format == "jwt":
                raise InvalidRequest("this audience takes only MACed CWTs")
            access_token = encode_maced_cwt(claims, key.private_key, key.kid)
        else:
            assert key.private_key is not None, "an active key has its private part"
            encode = encode_jwt if jwt else encode_cwt
            access_token = encode(claims, key.private_key, key.alg, key.kid)
        if material is not None:
            confirmation: dict[int, Any] | None = {CnfMethod.OSC: dict(material)}
        else:
            confirmation = {CnfMethod.COSE_KEY: dict(cnf)} if cnf is not None else None
        rs_key = audience.introspect_public_key
        return IssuedToken(
            access_token=access_token,
            token_format="cwt" if as_cwt or material is not None else "jwt",
            token_hash=token_hash(access_token),
            expires_in=lifetime,
            token_type=TokenType.POP if confirmation is not None else TokenType.BEARER,
            claims=claims,
            cnf=confirmation,
            profile=ACE_PROFILES.get(audience.profile),
            # draft-ietf-ace-edhoc-oscore-profile-11 §3.3: AUTH_CRED_RS for the client.
            rs_cnf=(
                {CnfMethod.COSE_KEY: dict(rs_key)}
                if audience.profile == "edhoc_oscore" and rs_key is not None
                else None
            ),
        )


_NO_REQ_CNF = "audience {} takes no req_cnf: the AS provides the OSCORE input material"
_NEEDS_KEY = (
    "audience {} needs a proof-of-possession key: send req_cnf or register the client's public key"
)


def check_secret_travels_protected(audience: Audience, request: TokenRequest) -> None:
    """A coap_oscore answer carries the OSCORE master secret (RFC 9203 §3.2): it is issued
    only over the protected channel, also when `require_oscore` is off (a lab), or anyone on
    the path could set the token's context up. Raises InvalidRequest."""
    if audience.profile == "coap_oscore" and request.peer is None:
        raise InvalidRequest(
            f"audience {audience.audience_id} (coap_oscore): its tokens come with a master"
            " secret, issued only over OSCORE"
        )


def confirmation_key(
    client: Client, audience: Audience, requested: Mapping[int, Any] | None
) -> Mapping[int, Any] | None:
    """The key a token for `audience` is bound to, by its profile: bearer, the requested one
    if any; coap_oscore, none (the token carries OSCORE input material instead; a request
    with req_cnf raises InvalidRequest); edhoc_oscore, the requested one or else the
    client's registered public key, a P-256 key either way (EDHOC cipher suite 2: raises
    UnsupportedPopKey), and InvalidRequest when there is neither."""
    if audience.profile == "coap_oscore":
        if requested is not None:
            raise InvalidRequest(_NO_REQ_CNF.format(audience.audience_id))
        return None
    if audience.profile != "edhoc_oscore":
        return requested
    key = requested
    if key is None and client.public_key is not None:
        key = pop_key({CnfMethod.COSE_KEY: client.public_key})
    if key is None:
        raise InvalidRequest(_NEEDS_KEY.format(audience.audience_id))
    if key.get(CoseKeyParam.KTY) != CoseKty.EC2 or key.get(CoseKeyParam.CRV) != CoseCurve.P256:
        raise UnsupportedPopKey(f"audience {audience.audience_id} needs a P-256 key (EDHOC)")
    return key


def _oscore_material() -> dict[int, bytes]:
    """Fresh OSCORE input material for one token (RFC 9203 §3.2.1: id, ms, salt)."""
    return {
        OscoreInput.ID: secrets.token_bytes(OSCORE_ID_BYTES),
        OscoreInput.MS: secrets.token_bytes(OSCORE_MASTER_SECRET_BYTES),
        OscoreInput.SALT: secrets.token_bytes(OSCORE_SALT_BYTES),
    }


def pop_key(req_cnf: Mapping[Any, Any] | None) -> Mapping[int, Any] | None:
    """RFC 9200 §5.8.1 / RFC 8747 §3.1: req_cnf {1: COSE_Key} binds the token to that key."""
    if req_cnf is None:
        return None
    cose_key = req_cnf.get(CnfMethod.COSE_KEY) if len(req_cnf) == 1 else None
    if cose_key is None:
        raise UnsupportedPopKey("req_cnf must be {1: COSE_Key}")
    # Rebuilt from the parsed key: only kty, crv, x (and y) reach the token, whatever else
    # the client sent.
    return cose_key_from_public(public_key_from_cose(cose_key))


def access_record(issued: IssuedToken) -> IssuedAccess:
    claims = issued.claims
    return IssuedAccess(issued.token_hash, claims.sub, claims.exp, claims.aud)
