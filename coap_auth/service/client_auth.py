"""Caller authentication for /token, /revoke and /introspect: signed assertion or secret.

Devices authenticate as clients; resource servers authenticate to /introspect as their
audience, with the same two methods. Every failure is the same invalid_client, and an unknown
id costs the same work as a known one (a keyed digest and two constant-time compares, with the
current and the previous secret of a rotation; a COSE_Key parsed and a signature checked with
the algorithm the assertion names), so neither the answer nor its timing tells whether an id
exists, nor which of a client's two secrets matched.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.clock import Clock
from coap_auth.config import Settings
from coap_auth.errors import InvalidClient, MalformedToken, TokenError, UnsupportedPopKey
from coap_auth.secure.credentials import PeerCredential
from coap_auth.store import Audience, Client, MasterKey, Store
from coap_auth.text import has_control_character
from coap_auth.tokens import alg_for_key, cose_key_from_public, decode_cose, public_key_from_cose
from coap_auth.tokens.cose import verify_sign1
from coap_auth.tokens.cwt import decode_claims
from coap_auth.wire import CoseAlg

CWT_TAG_PREFIX = b"\xd8\x3d"  # tag 61, shortest encoding

R = TypeVar("R")


def secret_digest(master_key: MasterKey, secret: str) -> bytes:
    """What is stored of a client's (or audience's) secret: a digest keyed by the master key."""
    return master_key.digest(secret.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Credentials(Generic[R]):
    """What a caller may authenticate with, and the record it stands for."""

    record: R
    principal: str
    secret_digest: bytes | None = field(repr=False)
    public_key: dict[Any, Any] | None
    disabled: bool = False
    # The secret before a rotation, while its overlap lasts (None otherwise).
    previous_secret_digest: bytes | None = field(default=None, repr=False)


Lookup = Callable[[str], Awaitable[Credentials[R] | None]]


class Authenticator:
    def __init__(
        self, store: Store, master_key: MasterKey, settings: Settings, clock: Clock
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._master_key = master_key
        # Stand-ins for an unknown id (or one that cannot use this method), so timing does not
        # tell: a digest to compare with, and a COSE_Key per assertion algorithm to parse and
        # verify with, as a registered caller's would be.
        self._dummy_digest = master_key.digest(secrets.token_bytes(32))
        self._dummy_keys: dict[int, dict[int, Any]] = {
            CoseAlg.ES256: cose_key_from_public(
                ec.generate_private_key(ec.SECP256R1()).public_key()
            ),
            CoseAlg.EDDSA: cose_key_from_public(ed25519.Ed25519PrivateKey.generate().public_key()),
        }

    def secret_digest(self, secret: str) -> bytes:
        return secret_digest(self._master_key, secret)

    async def authenticate(
        self,
        lookup: Lookup[R],
        caller_id: str | None,
        secret: str | None,
        assertion: bytes | None,
        *,
        replay_namespace: str = "",
    ) -> R:
        if assertion is not None:
            return await self._by_assertion(lookup, assertion, caller_id, replay_namespace)
        if caller_id is None or secret is None:
            raise InvalidClient("client authentication required")
        found = await lookup(caller_id)
        expected = found.secret_digest if found and found.secret_digest else self._dummy_digest
        previous = (
            found.previous_secret_digest
            if found and found.previous_secret_digest
            else self._dummy_digest
        )
        presented = self.secret_digest(secret)
        # Both compares always run, and `|` does not short-circuit: the same work whichever
        # secret matched, and for a caller with no previous secret or no such caller.
        matched = hmac.compare_digest(presented, expected) | hmac.compare_digest(
            presented, previous
        )
        if not matched or found is None or found.disabled:
            raise InvalidClient("client authentication failed")
        return found.record

    async def authenticate_peer(
        self,
        lookup: Lookup[R],
        peer: PeerCredential,
        caller_id: str | None,
        secret: str | None,
        assertion: bytes | None,
        *,
        replay_namespace: str = "",
    ) -> R:
        """The caller the protected channel authenticated (EDHOC, then OSCORE): still
        registered under that id with that very key, and not disabled (checked on every
        request, so a disabled or re-keyed caller loses its open context too). A client_id,
        secret or assertion sent as well must name the same caller (RFC 9200 §5.8.1 leaves
        client authentication to the profile; they are optional here)."""
        found = await lookup(peer.id)
        # An operator-provisioned context (no credential) names its peer by id alone.
        key_matches = peer.credential is None or (
            found is not None and peer.credential.same_key(found.public_key)
        )
        # A provisioned context answers for the registration it was made for, not for a
        # client added again under its id (another instance may still hold it).
        same_registration = peer.registered_at is None or (
            found is not None and getattr(found.record, "created_at", None) == peer.registered_at
        )
        if found is None or found.disabled or not key_matches or not same_registration:
            raise InvalidClient("client authentication failed")
        if caller_id is not None and caller_id != peer.id:
            raise InvalidClient("client_id is not the peer of the protected channel")
        if secret is not None or assertion is not None:
            also = await self.authenticate(
                lookup, caller_id or peer.id, secret, assertion, replay_namespace=replay_namespace
            )
            if also != found.record:
                raise InvalidClient("credentials are not the peer of the protected channel")
        return found.record

    async def _by_assertion(
        self, lookup: Lookup[R], assertion: bytes, caller_id: str | None, namespace: str
    ) -> R:
        failed = InvalidClient("client authentication failed")
        try:
            # docs/protocol.md: the assertion is a tagged CWT, 61(18(...)).
            if not assertion.startswith(CWT_TAG_PREFIX):
                raise MalformedToken("client assertion must be a tagged CWT")
            message = decode_cose(assertion, low_s=False)
            claims = decode_claims(message.payload)
        except TokenError:
            raise failed from None
        # Refused like any malformed assertion, before the store sees the id (PostgreSQL fails
        # on NUL) and before any lookup, so the answer says nothing about who exists.
        if has_control_character(claims.iss) or has_control_character(claims.sub):
            raise failed
        found = await lookup(claims.iss)
        usable = found is not None and found.public_key is not None and not found.disabled
        # An unknown caller costs a key parse and a signature check too, with the algorithm the
        # assertion names (an unknown algorithm fails the check at once either way).
        cose_key = (
            found.public_key if usable and found is not None else self._dummy_key(message.alg)
        )
        try:
            public_key = public_key_from_cose(cose_key)
            verify_sign1(message, public_key, alg_for_key(public_key), low_s=False)
        except (TokenError, UnsupportedPopKey):
            raise failed from None
        if not usable or found is None:
            raise failed
        now = self.clock.now()
        skew = self.settings.clock_skew
        if (
            claims.sub != claims.iss
            or (caller_id is not None and caller_id != claims.iss)
            or claims.aud != self.settings.issuer
            or claims.exp <= now
            or claims.exp > now + self.settings.assertion_max_lifetime
            or claims.iat > now + skew
            or (claims.nbf is not None and claims.nbf > now + skew)
        ):
            raise failed
        # Only a verified assertion reaches the replay cache, so forgeries cannot fill it.
        replay_key = namespace + found.principal
        if not await self.store.remember_assertion(replay_key, claims.cti, claims.exp, now):
            raise InvalidClient("client assertion replayed")
        return found.record

    def _dummy_key(self, alg: Any) -> dict[int, Any]:
        """The stand-in key for the algorithm an assertion names (a header value may be any
        CBOR item: only an int can name one)."""
        named = alg if isinstance(alg, int) and not isinstance(alg, bool) else CoseAlg.ES256
        return self._dummy_keys.get(named, self._dummy_keys[CoseAlg.ES256])


def client_credentials(client: Client | None, now: int) -> Credentials[Client] | None:
    """What authenticates a client: its secret (and, while its overlap lasts, the one before
    the last `clients rotate-secret`) or its key; disabled or not."""
    if client is None:
        return None
    previous = client.previous_secret_digest if client.previous_secret_valid(now) else None
    return Credentials(
        client,
        client.client_id,
        client.secret_digest,
        client.public_key,
        client.disabled,
        previous,
    )


def audience_credentials(audience: Audience | None) -> Credentials[Audience] | None:
    """What authenticates an audience to /introspect, if it may use it at all."""
    if audience is None or (
        audience.introspect_secret_digest is None and audience.introspect_public_key is None
    ):
        return None
    return Credentials(
        audience,
        audience.audience_id,
        audience.introspect_secret_digest,
        audience.introspect_public_key,
    )
