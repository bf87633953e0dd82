"""Offline verification of access tokens on a resource server: CWT (RFC 8392) and JWT (RFC 9068).

First whether the verifier's own view is current (key set and TRL confirmed by the AS within
the staleness bound: fail closed), then the token's one canonical form and its signature
against a published key (the algorithm that key is registered for, never the one the token
names), then iss, aud, exp/nbf with a leeway and exp - iat within the maximum lifetime, then
the TRL, then the scope. A kept token is re-checked on every use, its key included.

An encrypted CWT (61(16(...)), COSE_Encrypt0 with AES-CCM-16-64-128: the token of the ACE
OSCORE profile, RFC 9203 §3.2, whose cnf holds a master secret) is decrypted with the
audience's own key named by its kid (`encryption_keys`, from `coap-auth keys export`), under
the same checks. The audience check comes after the time checks and fails with
`WrongAudience` (4.03 at an RS, RFC 9200 §5.10.1.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from coap_auth.errors import CoapAuthError, InvalidClaims, InvalidSignature, MalformedToken
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    decode_cose,
    token_hash,
    verify_cwt,
    verify_jwt,
    verify_maced_cwt,
)
from coap_auth.tokens.cose import decrypt0
from coap_auth.tokens.cwt import decrypt_cwt
from coap_auth.wire import MAX_TOKEN_LIFETIME, CoseTag, OscoreInput
from device_client.clock import Clock, SystemClock
from device_client.errors import InsufficientScope, StaleState, TokenRevoked
from device_client.keyset import KeySet
from device_client.trl import RevocationList

# A JWS compact serialization starts with the base64url of '{"' (RFC 7515 §7.1): "ey".
_JWT_PREFIX = b"ey"
# A kid and the key it named when the token verified (a VerificationKey, or an HMAC key).
_KeyUsed = tuple[bytes, VerificationKey | bytes]

# The canonical head of a MACed CWT, 61(17(...)): tags are in their shortest form, so a peek at
# three bytes routes it (the codec checks the whole form; anything else fails there).
_MACED_CWT_PREFIX = bytes([0xD8, CoseTag.CWT, 0xC0 | CoseTag.MAC0])
_ENCRYPTED_CWT_PREFIX = bytes([0xD8, CoseTag.CWT, 0xC0 | CoseTag.ENCRYPT0])

# A key set or TRL the caller fixed: taken as current by the staleness check.
_FIXED_SOURCES = (KeySet, RevocationList)

# What a verified token binds to (design "Profiles"): a master secret (RFC 9203), a client's
# key (the EDHOC + OSCORE profile), or nothing (a bearer token).
Profile = Literal["coap_oscore", "edhoc_oscore", "bearer"]

# The longest access-token lifetime the AS issues (`audiences add --lifetime` refuses more):
# a token claiming a longer one was not made by the AS, whatever key signed it.
DEFAULT_MAX_LIFETIME = MAX_TOKEN_LIFETIME
# How old (s) the AS's last confirmation of the key set and the TRL may be before every token
# is refused. Watchers confirm every `WatchPolicy.check_interval` (30 s) while the AS answers,
# so 120 s rides out three lost polls; it is also the longest a token revoked during an
# outage can still be used here.
DEFAULT_MAX_STALENESS = 120


class WrongAudience(InvalidClaims):
    """A valid token for another audience: the RS answers 4.03 Forbidden (RFC 9200
    §5.10.1.1; device_client.rs renders it)."""


class UnusableClaims(MalformedToken):
    """A token whose protection verified (it decrypted under our key) but whose claims cannot
    be used, an OSCORE input material with a parameter we do not know say: the RS answers 4.00
    (RFC 9200 §5.10.1.1 "claims cannot be obtained", RFC 9203 §4.2)."""


class KeySource(Protocol):
    """Where verification keys come from: a `KeySet`, or a `KeySetWatcher` following /keys."""

    def lookup(self, kid: bytes) -> VerificationKey | None:
        """The verification key named `kid`, or None. Must raise nothing."""
        ...

    async def refetch(self) -> bool:
        """Fetch the key set now if allowed (rate-limited); True if it may have changed.
        Must raise nothing on a failed fetch (False), only a caller's cancellation."""
        ...


class RevocationSource(Protocol):
    """What a `TrlWatcher` offers the verifier: membership of a token hash (RFC 9770 §4)."""

    def is_revoked(self, token_hash: bytes) -> bool:
        """Whether `token_hash` is on the revocation list held now. Must raise nothing."""
        ...


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check, with its claims and its RFC 9770 hash. Made by
    TokenVerifier; raises nothing."""

    claims: Claims
    token_hash: bytes
    format: Literal["cwt", "jwt"]
    # The published key it verified with.
    kid: bytes
    # That key itself (a VerificationKey, or the HMAC key of a MACed token): every later use
    # checks the key set still holds it under this kid.
    key: VerificationKey | bytes | None = field(default=None, repr=False, compare=False)

    @property
    def scopes(self) -> frozenset[str]:
        """The token's scopes (its space-separated scope claim as a set)."""
        return self.claims.scopes

    @property
    def profile(self) -> Profile:
        """ "coap_oscore" (cnf holds OSCORE input material), "edhoc_oscore" (cnf holds the
        client's COSE_Key) or "bearer" (no cnf)."""
        if self.claims.cnf_osc is not None:
            return "coap_oscore"
        if self.claims.cnf_key is not None:
            return "edhoc_oscore"
        return "bearer"

    @property
    def material_id(self) -> bytes | None:
        """The id of the OSCORE input material (RFC 9203 §3.2.1), or None."""
        material = self.claims.cnf_osc
        return None if material is None else material[OscoreInput.ID]

    def allows(self, *scopes: str) -> bool:
        """Whether the token's scope covers every one of `scopes`. Raises nothing."""
        return set(scopes) <= self.claims.scopes


class _VerifiedFields:
    """VerifiedToken's own slots, writable: filled by `_verified`, then made a VerifiedToken."""

    __slots__ = VerifiedToken.__slots__
    claims: Claims
    token_hash: bytes
    format: Literal["cwt", "jwt"]
    kid: bytes
    key: VerificationKey | bytes | None


def _verified(
    claims: Claims,
    th: bytes,
    token_format: Literal["cwt", "jwt"],
    kid: bytes,
    key: VerificationKey | bytes,
) -> VerifiedToken:
    """`VerifiedToken(claims, th, token_format, kid, key)` in a third of the time: a frozen
    dataclass's __init__ sets each field through object.__setattr__; plain stores fill the
    same slots here, then the object is given its class (allowed between classes of one
    layout). A field added to VerifiedToken must be set here too: tests/device_client/
    test_verify_fast.py compares what this builds with VerifiedToken(...). As `Claims` are
    read."""
    fields = _VerifiedFields()
    fields.claims = claims
    fields.token_hash = th
    fields.format = token_format
    fields.kid = kid
    fields.key = key
    fields.__class__ = VerifiedToken  # type: ignore[assignment]
    return fields  # type: ignore[return-value]


def _decrypts(token: bytes, key: VerificationKey | bytes) -> bool:
    """Whether an encrypted CWT decrypts under `key` (told apart from a malformed wrapper)."""
    if not isinstance(key, bytes):
        return False
    try:
        decrypt0(decode_cose(token), key)
    except CoapAuthError:
        return False
    return True


def scope_set(scope: str | Iterable[str] | None) -> frozenset[str]:
    if scope is None:
        return frozenset()
    if isinstance(scope, str):
        return frozenset(scope.split())
    return frozenset(s for item in scope for s in item.split())


class TokenVerifier:
    """Verifies tokens for one audience from one issuer, offline.

    `leeway` (s) absorbs clock skew between the AS and this device for exp and nbf.
    `max_lifetime` (s) bounds exp - iat: a longer-lived token is refused (InvalidClaims).
    `max_staleness` (s): when the last confirmation by the AS of `keys` or `revocations`
    (their `confirmed_at`, as the watchers keep it) is older than this, or missing, every
    verification raises StaleState (5.03) until it is current again; None turns the check
    off (not advised). A fixed `KeySet` or `RevocationList` is taken as current; any other
    source without `confirmed_at` counts as never confirmed (fail closed). Raises ValueError for a
    negative leeway, a non-positive bound, or a max_staleness not longer than a watcher's
    check_interval. `encryption_keys` (kid -> AES-CCM-16-64-128 key, `KeySet.encryption` of
    `KeySet.from_export`) decrypt the tokens of an OSCORE-profile audience.
    The constructor does no I/O.
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        revocations: RevocationSource | None = None,
        clock: Clock | None = None,
        leeway: int = 30,
        shared_keys: Mapping[bytes, bytes] | None = None,
        max_lifetime: int = DEFAULT_MAX_LIFETIME,
        max_staleness: int | None = DEFAULT_MAX_STALENESS,
        encryption_keys: Mapping[bytes, bytes] | None = None,
    ) -> None:
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        if max_lifetime <= 0 or (max_staleness is not None and max_staleness <= 0):
            raise ValueError("max_lifetime and max_staleness must be positive")
        polls = [getattr(s, "check_interval", 0) for s in (keys, revocations)]
        if max_staleness is not None and max_staleness <= max(polls):
            # A healthy watcher confirms once per check_interval: a shorter bound would
            # refuse every token between two polls while the AS is fine.
            raise ValueError("max_staleness must be longer than the watchers' check_interval")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.revocations = revocations
        self.clock = clock if clock is not None else SystemClock()
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.max_staleness = max_staleness
        # kid -> HMAC key, for an audience with its own symmetric keys (KeySet.shared).
        self._shared_keys = dict(shared_keys or {})
        # kid -> AES key, for the encrypted tokens of an OSCORE-profile audience.
        self._encryption_keys = dict(encryption_keys or {})

    @property
    def encryption_kids(self) -> frozenset[bytes]:
        """The kids of the AES keys this verifier decrypts with (never the keys)."""
        return frozenset(self._encryption_keys)

    def set_encryption_keys(self, keys: Mapping[bytes, bytes]) -> None:
        """Replace the AES keys (after the operator exported the family again, say): a token
        kept under a key no longer listed fails its next `still_valid` check. Raises
        nothing."""
        self._encryption_keys = dict(keys)

    async def verify(
        self, token: bytes, *, scope: str | Iterable[str] | None = None
    ) -> VerifiedToken:
        """Verify; when the kid is unknown, fetch the key set once (rate-limited by the key
        source) before rejecting: the key may have been published a moment ago.

        Raises a TokenError (MalformedToken, InvalidSignature, InvalidClaims (WrongAudience
        for a token of another audience), TokenRevoked), InsufficientScope, or StaleState."""
        missed: list[bytes] = []
        try:
            return self._verify(token, scope, missed)
        except InvalidSignature:
            if not missed or not await self.keys.refetch():
                raise
        return self._verify(token, scope, [])

    def verify_offline(
        self, token: bytes, *, scope: str | Iterable[str] | None = None
    ) -> VerifiedToken:
        """Verify with the keys and revocations at hand, no I/O. Raises a TokenError
        (MalformedToken, InvalidSignature, InvalidClaims, TokenRevoked), InsufficientScope
        or StaleState."""
        return self._verify(token, scope, [])

    def _verify(
        self, token: bytes, scope: str | Iterable[str] | None, missed: list[bytes]
    ) -> VerifiedToken:
        if not isinstance(token, bytes) or not token:
            raise MalformedToken("token must be a non-empty byte string")
        now = self.clock.now()
        self._check_current(now)

        used: list[_KeyUsed] = []

        def lookup(kid: bytes) -> VerificationKey | None:
            key = self.keys.lookup(kid)
            if key is None:
                missed.append(kid)
            else:
                used.append((kid, key))
            return key

        is_jwt = token.startswith(_JWT_PREFIX)
        if is_jwt:
            claims = verify_jwt(token, lookup)
        else:
            start = token[: len(_MACED_CWT_PREFIX)]
            if start == _MACED_CWT_PREFIX:
                claims = self._verify_maced(token, used)
            elif start == _ENCRYPTED_CWT_PREFIX:
                claims = self._decrypt(token, used)
            else:
                claims = verify_cwt(token, lookup)
        self._validate(claims, now)
        # RFC 9770 §4: the hash of the access_token bytes, exactly as the AS hashed them (the
        # token codecs accept only the one canonical form, so this hash names this token).
        th = token_hash(token)
        if self.revocations is not None and self.revocations.is_revoked(th):
            raise TokenRevoked("token revoked")
        # scope_set(scope) <= claims.scopes, without a set of the usual one-string request.
        if scope is not None and not (
            claims.scopes.issuperset(scope.split())
            if type(scope) is str
            else scope_set(scope) <= claims.scopes
        ):
            raise InsufficientScope("token scope does not cover the request")
        kid, key = used[-1]
        return _verified(claims, th, "jwt" if is_jwt else "cwt", kid, key)

    def _verify_maced(self, token: bytes, used: list[_KeyUsed]) -> Claims:
        # docs/protocol.md: 61(17(...)), COSE_Mac0 with HMAC 256/64, for a symmetric audience.
        kid = decode_cose(token).kid
        key = self._shared_keys.get(kid) if isinstance(kid, bytes) else None
        if key is None:
            raise InvalidSignature("unknown key id")
        claims = verify_maced_cwt(token, key)
        used.append((kid, key))
        return claims

    def _decrypt(self, token: bytes, used: list[_KeyUsed]) -> Claims:
        # RFC 9203 §3.2, design "Profiles": 61(16(...)), AES-CCM-16-64-128 under the
        # audience's own key; a wrong key or altered bytes are InvalidSignature.
        def lookup(kid: bytes) -> bytes | None:
            key = self._encryption_keys.get(kid)
            if key is not None:
                used.append((kid, key))
            return key

        try:
            return decrypt_cwt(token, lookup)
        except MalformedToken as error:
            if not used or not _decrypts(token, used[-1][1]):
                raise
            # It decrypted (the CCM tag verified): its claims are what did not decode.
            raise UnusableClaims(error.description) from None

    def _validate(self, claims: Claims, now: int) -> None:
        # RFC 9200 §5.10.1.1 order: issuer and time (4.01) before the audience (4.03).
        claims.validate(now=now, issuer=self.issuer, leeway=self.leeway)
        if claims.aud != self.audience:
            raise WrongAudience("token for another audience")
        if claims.iat > now + self.leeway:
            # Else exp - iat could be short while exp is years away.
            raise InvalidClaims("token issued in the future")
        if claims.exp - claims.iat > self.max_lifetime:
            # A stolen key could sign a token for years; the AS never issues one that long.
            raise InvalidClaims("token lifetime longer than this verifier accepts")

    def _check_current(self, now: int) -> None:
        """Fail closed: refuse everything while keys or TRL are not confirmed recently."""
        if self.max_staleness is None:
            return
        for what, source in (("key set", self.keys), ("revocation list", self.revocations)):
            if source is None or isinstance(source, _FIXED_SOURCES):
                continue  # fixed by the caller, taken as current
            confirmed_at = getattr(source, "confirmed_at", None)
            if confirmed_at is None or now - confirmed_at > self.max_staleness:
                raise StaleState(f"{what} not confirmed by the AS recently; try again later")

    def still_valid(self, verified: VerifiedToken) -> None:
        """Re-check what can change after verification, without the signature: the staleness
        bound, time, the TRL, and that the key it verified with is still published under its
        kid (a withdrawn key takes its tokens with it). For tokens an RS keeps between
        requests (RFC 9200 §5.10.3). Raises StaleState or a TokenError."""
        now = self.clock.now()
        self._check_current(now)
        self._validate(verified.claims, now)
        if not self._still_published(verified):
            raise InvalidSignature("signing key withdrawn")
        if self.revocations is not None and self.revocations.is_revoked(verified.token_hash):
            raise TokenRevoked("token revoked")

    def _still_published(self, verified: VerifiedToken) -> bool:
        if isinstance(verified.key, bytes):
            # The HMAC or the AES key it verified with, still listed under its kid.
            return verified.key in (
                self._shared_keys.get(verified.kid),
                self._encryption_keys.get(verified.kid),
            )
        current = self.keys.lookup(verified.kid)
        return current is not None and (verified.key is None or current == verified.key)
