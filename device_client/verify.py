"""Offline verification of access tokens on a resource server: CWT (RFC 8392) and JWT (RFC 9068).

Signature against a published key (the algorithm that key is registered for, never the one
the token names), then iss, aud, exp/nbf with a leeway, then the TRL, then the scope.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    decode_cose,
    token_hash,
    verify_cwt,
    verify_jwt,
    verify_maced_cwt,
)
from coap_auth.wire import CoseTag
from device_client.clock import Clock, SystemClock
from device_client.errors import InsufficientScope, TokenRevoked

# A JWS compact serialization starts with the base64url of '{"' (RFC 7515 §7.1): "ey".
_JWT_PREFIX = b"ey"


class KeySource(Protocol):
    """Where verification keys come from: a `KeySet`, or a `KeySetWatcher` following /keys."""

    def lookup(self, kid: bytes) -> VerificationKey | None: ...

    async def refetch(self) -> bool:
        """Fetch the key set now if allowed (rate-limited); True if it may have changed."""
        ...


class RevocationSource(Protocol):
    """What a `TrlWatcher` offers the verifier: membership of a token hash (RFC 9770 §4)."""

    def is_revoked(self, token_hash: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check, with its claims and its RFC 9770 hash."""

    claims: Claims
    token_hash: bytes
    format: Literal["cwt", "jwt"]
    # The published key it verified with.
    kid: bytes

    @property
    def scopes(self) -> frozenset[str]:
        return self.claims.scopes

    def allows(self, *scopes: str) -> bool:
        return set(scopes) <= self.claims.scopes


def scope_set(scope: str | Iterable[str] | None) -> frozenset[str]:
    if scope is None:
        return frozenset()
    if isinstance(scope, str):
        return frozenset(scope.split())
    return frozenset(s for item in scope for s in item.split())


class TokenVerifier:
    """Verifies tokens for one audience from one issuer, offline.

    `leeway` (s) absorbs clock skew between the AS and this device for exp and nbf.
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
    ) -> None:
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.revocations = revocations
        self.clock = clock if clock is not None else SystemClock()
        self.leeway = leeway
        # kid -> HMAC key, for an audience with its own symmetric keys (KeySet.shared).
        self._shared_keys = dict(shared_keys or {})

    async def verify(
        self, token: bytes, *, scope: str | Iterable[str] | None = None
    ) -> VerifiedToken:
        """Verify; when the kid is unknown, fetch the key set once (rate-limited by the key
        source) before rejecting: the key may have been published a moment ago."""
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
        (MalformedToken, InvalidSignature, InvalidClaims, TokenRevoked) or InsufficientScope."""
        return self._verify(token, scope, [])

    def _verify(
        self, token: bytes, scope: str | Iterable[str] | None, missed: list[bytes]
    ) -> VerifiedToken:
        if not isinstance(token, bytes) or not token:
            raise MalformedToken("token must be a non-empty byte string")

        used: list[bytes] = []

        def lookup(kid: bytes) -> VerificationKey | None:
            key = self.keys.lookup(kid)
            (used if key is not None else missed).append(kid)
            return key

        is_jwt = token.startswith(_JWT_PREFIX)
        if is_jwt:
            claims = verify_jwt(token, lookup)
        elif decode_cose(token).tag == CoseTag.MAC0:
            claims = self._verify_maced(token, used)
        else:
            claims = verify_cwt(token, lookup)
        claims.validate(
            now=self.clock.now(), issuer=self.issuer, audience=self.audience, leeway=self.leeway
        )
        # RFC 9770 §4: the hash of the access_token bytes, exactly as the AS hashed them.
        th = token_hash(token)
        if self.revocations is not None and self.revocations.is_revoked(th):
            raise TokenRevoked("token revoked")
        if not scope_set(scope) <= claims.scopes:
            raise InsufficientScope("token scope does not cover the request")
        return VerifiedToken(claims, th, "jwt" if is_jwt else "cwt", used[-1])

    def _verify_maced(self, token: bytes, used: list[bytes]) -> Claims:
        # PROTOCOL.md: 61(17(...)), COSE_Mac0 with HMAC 256/64, for a symmetric audience.
        kid = decode_cose(token).kid
        key = self._shared_keys.get(kid) if isinstance(kid, bytes) else None
        if key is None:
            raise InvalidSignature("unknown key id")
        claims = verify_maced_cwt(token, key)
        used.append(kid)
        return claims

    def still_valid(self, verified: VerifiedToken) -> None:
        """Re-check what can change after verification, without the signature: time and the
        TRL. For tokens an RS keeps between requests (RFC 9200 §5.10.3)."""
        verified.claims.validate(
            now=self.clock.now(), issuer=self.issuer, audience=self.audience, leeway=self.leeway
        )
        if self.revocations is not None and self.revocations.is_revoked(verified.token_hash):
            raise TokenRevoked("token revoked")
