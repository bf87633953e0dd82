"""TokenClient: a device's access token, fetched, cached, refreshed ahead of expiry, persisted.

RFC 9200 §5.8 client_credentials grants and refreshes (docs/protocol.md "Refresh tokens"), with
exponential back-off and jitter on failure, over the protected channel when the AS's EDHOC
credential is given (the channel then authenticates the device: no client authentication in
the requests). Tokens and secrets never reach logs.

An answer for an audience with an ACE OSCORE profile also carries ace_profile (38), cnf (8)
and rs_cnf (41): kept on the AccessToken (`profile`, `cnf_osc`, `cnf_key`, `rs_cnf`) for
`ResourceClient`, which sets up the security context with the resource server from them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiocoap
import cbor2

from coap_auth import untagged
from coap_auth.echo import request_answering_echo
from coap_auth.errors import CoapAuthError
from coap_auth.secure.credentials import EdhocCredential
from coap_auth.tokens import PublicKey, cose_key_from_public
from coap_auth.tokens.claims import check_oscore_input
from coap_auth.wire import (
    AceErrorCode,
    AceParam,
    AceProfile,
    CnfMethod,
    ContentFormat,
    GrantType,
    TokenType,
)
from device_client._transport import backoff_delay, reliable_within, retry_hint
from device_client.ace import parse_error, parse_token_response
from device_client.clock import Clock, SystemClock
from device_client.credentials import Credentials, DeviceKey
from device_client.errors import (
    ChannelRefused,
    ChannelUnavailable,
    ServiceUnreachable,
    StateFileError,
    TokenRequestRefused,
)
from device_client.secure_channel import SecureChannel
from device_client.state import AccessToken, DeviceState, StateFile

log = logging.getLogger("device_client.client")


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When to refresh and how to back off. Times in seconds. Raises ValueError for a
    fraction or jitter out of range, backoff_initial not in (0, backoff_max], or a
    non-positive request_timeout."""

    # Refresh once this fraction of the lifetime has passed...
    refresh_fraction: float = 0.75
    # ...less up to this fraction of that, drawn at random, so a fleet does not refresh in step.
    refresh_jitter: float = 0.1
    # After a failure wait backoff_initial * 2**(n-1), at most backoff_max, with the delay drawn
    # from [d * (1 - backoff_jitter), d] ("equal jitter" for 0.5).
    backoff_initial: float = 2.0
    backoff_max: float = 300.0
    backoff_jitter: float = 0.5
    # Real seconds to wait for one /token answer (CoAP retransmissions happen inside it); over
    # the protected channel, also for each EDHOC message.
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.refresh_fraction <= 1:
            raise ValueError("refresh_fraction must be in (0, 1]")
        if not 0 <= self.refresh_jitter < 1 or not 0 <= self.backoff_jitter <= 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")

    def refresh_delay(self, lifetime: int, rng: random.Random) -> int:
        """Seconds after issue to refresh a token of `lifetime` s: refresh_fraction of it,
        less up to refresh_jitter of that; at least 1, at most `lifetime`. Raises nothing."""
        ahead = lifetime * self.refresh_fraction * (1 - self.refresh_jitter * rng.random())
        return max(1, min(lifetime, int(ahead)))

    def backoff_delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after `failures` failures in a row: exponential from
        backoff_initial up to backoff_max, less up to backoff_jitter of it. Raises nothing."""
        return backoff_delay(
            failures,
            initial=self.backoff_initial,
            maximum=self.backoff_max,
            jitter=self.backoff_jitter,
            rng=rng,
        )


class TokenClient:
    """Keeps one access token for one audience fresh.

    `await token()` returns a valid token: the cached one until its refresh time, then a
    refresh (RFC 9200 §5.8.1, rotating the refresh token), or a new grant when there is no
    refresh token or its family is dead. Every change is saved to the state file first.

    With `as_credential` (the AS's EDHOC credential, `load_as_credential`) and a P-256
    `DeviceKey`, /token and /revoke go over the protected channel (EDHOC, then OSCORE) and
    carry no client authentication; without it, plain CoAP with an assertion or a secret
    (an AS with require_oscore off).

    The constructor sends nothing. It raises StateFileError when `state_file` exists but
    cannot be read (a failed save is only logged, here and later), ValueError for a `pop_key`
    that is not P-256 or Ed25519, and, with `as_credential`, ChannelUnavailable (a client
    secret or an Ed25519 key, or an aiocoap context without OSCORE transport) or TypeError
    (an `as_credential` that is no EdhocCredential).
    """

    def __init__(
        self,
        context: aiocoap.Context,
        as_uri: str,
        credentials: Credentials,
        *,
        audience: str | None = None,
        scope: str | None = None,
        token_format: str | None = None,
        issuer: str = "coap-auth",
        pop_key: PublicKey | None = None,
        state_file: StateFile | None = None,
        clock: Clock | None = None,
        policy: RefreshPolicy | None = None,
        rng: random.Random | None = None,
        on_token: Callable[[str, AccessToken], None] | None = None,
        as_credential: EdhocCredential | None = None,
    ) -> None:
        self._context = context
        # Told of every new token: ("grant" | "refresh", token). For logs and for uploading
        # the new token to resource servers.
        self.on_token = on_token
        self._clock = clock if clock is not None else SystemClock()
        self._policy = policy if policy is not None else RefreshPolicy()
        self._rng = rng if rng is not None else random.Random()
        self._state_file = state_file
        self._tuning = reliable_within(self._policy.request_timeout)
        self._channel: SecureChannel | None = None
        if as_credential is not None:
            if not isinstance(credentials, DeviceKey):
                raise ChannelUnavailable(
                    f"{credentials.client_id}: the protected channel needs a device key"
                    " (EDHOC authenticates with it), not a client secret"
                )
            self._channel = SecureChannel(
                context,
                as_uri,
                credentials,
                as_credential,
                timeout=self._policy.request_timeout,
            )
        # RFC 9200 §5.8.1 / RFC 8747 §3.1: req_cnf {1: COSE_Key} asks for a PoP token.
        self._req_cnf = (
            {CnfMethod.COSE_KEY: cose_key_from_public(pop_key)} if pop_key is not None else None
        )
        state = DeviceState(
            as_uri=as_uri.rstrip("/"),
            credentials=credentials,
            issuer=issuer,
            audience=audience,
            scope=scope,
            token_format=token_format,
            as_credential=as_credential,
        )
        saved = state_file.load() if state_file is not None else None
        if saved is not None and _same_grant(saved, state):
            # A reboot: resume the cached token and the refresh family.
            state = replace(
                state, access_token=saved.access_token, refresh_token=saved.refresh_token
            )
            log.info("resumed state of %s from %s", credentials.client_id, state_file)
        elif saved is not None:
            log.warning("%s held another grant (client, AS or audience); starting anew", state_file)
        self._state = state
        self._lock = asyncio.Lock()
        self._failures = 0
        self._retry_at: int | None = None
        if state_file is not None and saved != state:
            self._save()

    @classmethod
    def from_state_file(
        cls,
        context: aiocoap.Context,
        state_file: StateFile,
        *,
        clock: Clock | None = None,
        policy: RefreshPolicy | None = None,
        rng: random.Random | None = None,
        on_token: Callable[[str, AccessToken], None] | None = None,
    ) -> TokenClient:
        """Resume a provisioned device: AS, credentials and tokens all come from the file.
        Raises StateFileError when there is no file or it cannot be read, and what the
        constructor raises."""
        saved = state_file.load()
        if saved is None:
            raise StateFileError(f"no state file at {state_file.path}: provision the device first")
        return cls(
            context,
            saved.as_uri,
            saved.credentials,
            audience=saved.audience,
            scope=saved.scope,
            token_format=saved.token_format,
            issuer=saved.issuer,
            state_file=state_file,
            clock=clock,
            policy=policy,
            rng=rng,
            on_token=on_token,
            as_credential=saved.as_credential,
        )

    def __repr__(self) -> str:
        over = " over OSCORE" if self._channel is not None else ""
        return (
            f"<TokenClient {self._state.credentials.client_id} -> {self._state.as_uri}{over}"
            f" audience={self._state.audience!r}>"
        )

    # -- what the device asks -----------------------------------------------------------------

    @property
    def client_id(self) -> str:
        """Our client id at the AS."""
        return self._state.credentials.client_id

    @property
    def channel(self) -> SecureChannel | None:
        """The protected channel to the AS, when the AS's credential was given."""
        return self._channel

    @property
    def cached(self) -> AccessToken | None:
        """The token held now, without any I/O (it may be due for refresh, or expired)."""
        return self._state.access_token

    @property
    def context(self) -> aiocoap.Context:
        """The aiocoap context requests to the AS go out on."""
        return self._context

    @property
    def clock(self) -> Clock:
        """The clock token times (`expires_at`, `refresh_at`) are read on."""
        return self._clock

    @property
    def audience(self) -> str | None:
        """The audience tokens are asked for (None: the AS's default)."""
        return self._state.audience

    @property
    def credentials(self) -> Credentials:
        """How this client authenticates to the AS (a DeviceKey is also its EDHOC key)."""
        return self._state.credentials

    @property
    def retry_at(self) -> int | None:
        """While backing off: the clock time before which no request is sent."""
        return self._retry_at

    def next_renewal(self) -> int:
        """When `token()` will next talk to the AS: the refresh time, or the end of back-off.
        Raises nothing."""
        token = self._state.access_token
        due = token.refresh_at if token is not None else self._clock.now()
        return max(due, self._retry_at or due)

    async def token(self) -> AccessToken:
        """A valid access token, from cache or from the AS.

        Raises ServiceUnreachable (no answer, or backing off) when there is no valid token to
        fall back on, TokenRequestRefused when the AS refuses the credentials (ChannelRefused
        when it refuses the protected channel), and ChannelUnavailable when the protected
        channel cannot run here (no lakers-python).
        """
        async with self._lock:
            now = self._clock.now()
            current = self._state.access_token
            if current is not None and now < current.refresh_at:
                return current
            if self._retry_at is not None and now < self._retry_at:
                if current is not None and current.valid_at(now):
                    return current
                raise ServiceUnreachable(
                    f"{self._as_host}: backing off after a failed request",
                    retry_at=self._retry_at,
                    host=self._as_host,
                )
            try:
                return await self._renew()
            except ServiceUnreachable:
                if current is not None and current.valid_at(self._clock.now()):
                    # Refreshing ahead of expiry leaves room for exactly this.
                    log.warning("refresh failed; the current token stays valid, retrying later")
                    return current
                raise

    async def refresh_now(self) -> AccessToken:
        """A new access token from the AS now, whatever the cached one's refresh time and any
        back-off: a refresh (or a new grant when the refresh family is dead). For a device
        that knows its token is no longer good (say its key set or scope changed).

        Raises ServiceUnreachable (no answer; the cached token, if any, is kept),
        TokenRequestRefused, or ChannelRefused (the protected channel to the AS failed).
        """
        async with self._lock:
            return await self._renew()

    def discard_access_token(self) -> None:
        """Forget the cached access token (say a resource server refused it); the next
        `token()` refreshes. The refresh token is kept. Raises nothing (a failed save of
        the state file is logged)."""
        if self._state.access_token is not None:
            self._state = replace(self._state, access_token=None)
            self._retry_at = None
            self._save()

    async def revoke(self) -> None:
        """Give the grant back (RFC 7009 semantics at `/revoke`): the refresh token's family
        dies with its access tokens, and the device forgets both. Raises ServiceUnreachable
        or TokenRequestRefused when the AS did not confirm; the state is then kept."""
        async with self._lock:
            token = self._state.refresh_token
            if token is None and self._state.access_token is not None:
                token = self._state.access_token.value
            if token is None:
                return
            try:
                response = await self._post(
                    "revoke", {AceParam.TOKEN: token, **self._auth_params()}
                )
            except (TimeoutError, aiocoap.error.Error):
                raise ServiceUnreachable(
                    f"{self._as_host}: revoke: no answer from the AS",
                    retry_at=self._clock.now(),
                    host=self._as_host,
                ) from None
            if response.code != aiocoap.CHANGED:
                ace_code, description = parse_error(response.payload)
                raise TokenRequestRefused(
                    f"{self._as_host}: revoke refused with {response.code}: {description}",
                    ace_code=ace_code,
                    coap_code=int(response.code),
                    host=self._as_host,
                )
            self._state = replace(self._state, access_token=None, refresh_token=None)
            self._save()
            log.info("grant of %s revoked", self.client_id)

    # -- talking to /token --------------------------------------------------------------------

    async def _renew(self) -> AccessToken:
        if self._state.refresh_token is not None:
            try:
                return await self._request(self._refresh_params(), "refresh")
            except TokenRequestRefused as refused:
                if refused.ace_code != AceErrorCode.INVALID_GRANT:
                    raise
                # RFC 9700 §4.14: a dead family (reuse detected, revoked, expired) takes its
                # access tokens with it; only a new grant helps.
                log.warning("refresh refused (%s); making a new grant", refused.description)
                self._state = replace(self._state, access_token=None, refresh_token=None)
                self._save()
        return await self._request(self._grant_params(), "grant")

    def _auth_params(self) -> dict[Any, Any]:
        if self._channel is not None:
            return {}  # the OSCORE context says who we are
        return self._state.credentials.request_params(
            issuer=self._state.issuer, now=self._clock.now()
        )

    def _grant_params(self) -> dict[Any, Any]:
        params = {AceParam.GRANT_TYPE: GrantType.CLIENT_CREDENTIALS, **self._auth_params()}
        if self._state.audience is not None:
            params[AceParam.AUDIENCE] = self._state.audience
        if self._state.scope is not None:
            params[AceParam.SCOPE] = self._state.scope
        if self._state.token_format is not None:
            params["token_format"] = self._state.token_format
        if self._req_cnf is not None:
            params[AceParam.REQ_CNF] = self._req_cnf
        return params

    def _refresh_params(self) -> dict[Any, Any]:
        # RFC 9200 §5.8.1: the same client authentication as the grant; audience, scope and
        # key stay those of the family.
        return {
            AceParam.GRANT_TYPE: GrantType.REFRESH_TOKEN,
            AceParam.REFRESH_TOKEN: self._state.refresh_token,
            **self._auth_params(),
        }

    async def _post(self, path: str, params: Mapping[Any, Any]) -> aiocoap.Message:
        payload = cbor2.dumps(dict(params))

        def build() -> aiocoap.Message:
            return aiocoap.Message(
                code=aiocoap.POST,
                uri=f"{self._state.as_uri}/{path}",
                payload=payload,
                content_format=ContentFormat.ACE_CBOR,
                transport_tuning=self._tuning,
            )

        if self._channel is not None:
            _, response = await self._channel.request(build, timeout=self._policy.request_timeout)
            return response
        # Plain CoAP (an AS in lab mode): from an address it has not verified, the AS answers
        # a POST to /token or /revoke with an Echo challenge first (RFC 9175 §2.4).
        _, response = await request_answering_echo(
            self._context, build, timeout=self._policy.request_timeout
        )
        return response

    async def _request(self, params: Mapping[Any, Any], kind: str) -> AccessToken:
        try:
            response = await self._post("token", params)
        except ChannelRefused as refused:
            # Configuration (an unregistered key, the wrong AS credential): do not hammer.
            self._failed(refused.description)
            raise
        except (TimeoutError, aiocoap.error.ConRetransmitsExceeded):
            raise self._failed(f"{kind}: no answer from the AS") from None
        except aiocoap.error.Error as exc:
            raise self._failed(f"{kind}: {type(exc).__name__}") from None
        if response.code == aiocoap.CREATED:
            return self._accept(response.payload, kind)
        if response.code.class_ == 5 or response.code == aiocoap.Code.TOO_MANY_REQUESTS:
            # Busy or failing, not refusing: back off, at least as long as Max-Age says.
            raise self._failed(f"{kind}: AS answered {response.code}", retry_hint(response))
        ace_code, description = parse_error(response.payload)
        refusal = TokenRequestRefused(
            f"{self._as_host}: {kind} refused with {response.code}: {description}",
            ace_code=ace_code,
            coap_code=int(response.code),
            host=self._as_host,
        )
        if ace_code != AceErrorCode.INVALID_GRANT:
            # Wrong credentials or configuration will not fix themselves: do not hammer.
            self._failed(refusal.description)
        raise refusal

    def _failed(self, reason: str, hint: int | None = None) -> ServiceUnreachable:
        self._failures += 1
        delay = self._policy.backoff_delay(self._failures, self._rng)
        if hint is not None:
            delay = max(delay, hint)
        self._retry_at = self._clock.now() + math.ceil(delay)
        log.warning(
            "%s; attempt %d failed, next try in %d s", reason, self._failures, math.ceil(delay)
        )
        return ServiceUnreachable(
            f"{self._as_host}: {reason}", retry_at=self._retry_at, host=self._as_host
        )

    @property
    def _as_host(self) -> str:
        """The AS's host[:port], as errors name it."""
        return self._state.as_uri.split("://", 1)[-1]

    def _accept(self, payload: bytes, kind: str) -> AccessToken:
        default_type = TokenType.POP if self._req_cnf is not None else TokenType.BEARER
        try:
            answer = parse_token_response(payload, default_type)
            profile = _parse_profile(payload)
        except ValueError as exc:
            raise self._failed(f"{kind}: {exc}") from None
        now = self._clock.now()
        token = AccessToken(
            value=answer.access_token,
            token_type=answer.token_type,
            expires_at=now + answer.expires_in,
            refresh_at=now + self._policy.refresh_delay(answer.expires_in, self._rng),
            received_at=now,
            audience=self._state.audience,
            scope=answer.scope if answer.scope is not None else self._state.scope,
            profile=profile.profile,
            cnf_osc=profile.cnf_osc,
            cnf_key=profile.cnf_key,
            rs_cnf=profile.rs_cnf,
        )
        self._state = replace(
            self._state,
            access_token=token,
            # Rotation (docs/protocol.md): the one sent is spent; keep only the newest.
            refresh_token=answer.refresh_token,
        )
        self._failures = 0
        self._retry_at = None
        self._save()
        log.info(
            "%s: token %s for %s, expires in %d s, refresh in %d s",
            kind,
            token.token_hash[1:5].hex(),
            self._state.audience or "default audience",
            answer.expires_in,
            token.refresh_at - now,
        )
        if self.on_token is not None:
            self.on_token(kind, token)
        return token

    def _save(self) -> None:
        if self._state_file is None:
            return
        try:
            self._state_file.save(self._state)
        except StateFileError as exc:
            # Keep working: after a reboot the older refresh token still recovers through the
            # grace window, or a new grant does.
            log.error("%s", exc.description)


@dataclass(frozen=True, slots=True)
class _Profile:
    profile: int | None = None
    cnf_osc: dict[int, Any] | None = field(default=None, repr=False)
    cnf_key: dict[Any, Any] | None = field(default=None, repr=False)
    rs_cnf: dict[Any, Any] | None = field(default=None, repr=False)


def _parse_profile(payload: bytes) -> _Profile:
    """The ACE profile fields of a /token answer (already read as a map by
    parse_token_response): ace_profile (38, RFC 9200 §5.8.4.3), cnf (8: {4: OSCORE input
    material} of RFC 9203 §3.2, or {1: COSE_Key} of RFC 9201 §5) and rs_cnf (41: {1: COSE_Key},
    RFC 9201 §5). Raises ValueError for an ill-typed one, naming it but never its value."""
    body = untagged.loads(payload)
    profile = body.get(AceParam.ACE_PROFILE)
    if profile is not None and (isinstance(profile, bool) or not isinstance(profile, int)):
        raise ValueError("/token answer has a non-integer ace_profile")
    cnf_osc = cnf_key = None
    cnf = body.get(AceParam.CNF)
    if cnf is not None:
        if not isinstance(cnf, dict) or len(cnf) != 1:
            raise ValueError("/token answer has a cnf that is not a one-entry map")
        if CnfMethod.OSC in cnf:
            try:
                cnf_osc = check_oscore_input(cnf[CnfMethod.OSC])
            except CoapAuthError as exc:
                raise ValueError(f"/token answer cnf: {exc}") from None
        elif CnfMethod.COSE_KEY in cnf and isinstance(cnf[CnfMethod.COSE_KEY], dict):
            cnf_key = cnf[CnfMethod.COSE_KEY]
        else:
            raise ValueError("/token answer has a cnf of an unsupported method")
    rs_cnf = body.get(AceParam.RS_CNF)
    if rs_cnf is not None:
        key = rs_cnf.get(CnfMethod.COSE_KEY) if isinstance(rs_cnf, dict) else None
        if not isinstance(key, dict) or len(rs_cnf) != 1:
            raise ValueError("/token answer has an rs_cnf that is not {1: COSE_Key}")
        rs_cnf = key
    if profile == AceProfile.COAP_OSCORE and cnf_osc is None:
        raise ValueError("/token answer for coap_oscore has no OSCORE input material")
    return _Profile(profile, cnf_osc, cnf_key, rs_cnf)


def _same_grant(saved: DeviceState, wanted: DeviceState) -> bool:
    """Whether saved tokens belong to the client, AS and audience asked for now."""
    return (
        saved.credentials.client_id == wanted.credentials.client_id
        and saved.as_uri == wanted.as_uri
        and saved.audience == wanted.audience
        and saved.scope == wanted.scope
        and saved.token_format == wanted.token_format
    )
