"""ResourceClient: a device talking to one resource server under an ACE OSCORE profile.

The profile is the token's (`AccessToken.profile`, the /token answer's ace_profile):

- coap_oscore (RFC 9203): POST /authz-info, unprotected, Content-Format application/ace+cbor
  (19), `{1: access_token, 40: nonce1, 43: ace_client_recipientid}` (§4.1); the RS answers
  2.01 `{42: nonce2, 44: ace_server_recipientid}` (§4.2); both derive the OSCORE context from
  the token's OSCORE_Input_Material and the nonces (§4.3), the client sending with ID2 and
  receiving with ID1. An ID2 equal to ID1 aborts (§4.2 forbids it).
- coap_edhoc_oscore (draft-ietf-ace-edhoc-oscore-profile-11, code points PROVISIONAL, see
  coap_auth.wire): EDHOC with the RS as initiator (forward flow, §4.3), authenticated by the
  device key the token is bound to (its cnf) and authenticating the RS by its credential:
  the one provisioned, else `make_credential(audience, rs_cnf)` from the /token answer. The
  token travels in EAD_3 (critical item, label 24, §4.1) when it is at most
  MAX_EAD_TOKEN_BYTES long and the device's credential goes by reference (its kid); a longer
  one, or any with a credential sent by value, is first POSTed unprotected to /authz-info as
  application/cwt (61), a deviation from the draft (-06 ruled that upload out), which
  coap-auth's RS accepts for this reason. The AS sends the token's cnf point compressed
  (RFC 9053 §7.1.1) so that its CWTs fit.

Then each request goes out protected under that context (device_client.secure_channel's
machinery). The context is set up again, and the request sent once more, when the RS answers
unprotected (it no longer holds the context: restart, eviction, the token expired or was
revoked), and before a request once TokenClient holds a newer token (refreshed ahead of
expiry, or `refresh_now`). An /authz-info refusal with 4.01 of a cached token makes one new
token request (the RS knows it is dead: revoked, or its key withdrawn) and one more try. An
EDHOC refusal of message_3 with the token in EAD_3 (an EDHOC error message; not another
answer, such as an Echo challenge repeated after ours was answered, which leaves the token
alone) counts as a refusal of the token (one new token, one more try, in EAD_3 again): a
token that fits EAD_3 is never uploaded in the clear, since an EDHOC error is not
authenticated and anyone on the path could forge one to make a device reveal its token's
claims.

Every unprotected request (the /authz-info upload, EDHOC's messages) answers an Echo
challenge (RFC 9175 §2.4): an RS that has not verified our address yet, and whose answer would
be more than 3x the request, answers 4.01 with an Echo option first; the request is sent once
more carrying it. Protected requests need none (the RS authenticates them).

Nothing here runs in the background: every exchange runs in the caller's task, so a caller's
cancellation ends it and propagates; `close()` (the context manager's exit) only forgets the
context. The token, the OSCORE input material and the keys never reach logs or errors.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import aiocoap
import cbor2

from coap_auth import untagged
from coap_auth.echo import is_echo_challenge
from coap_auth.errors import CoapAuthError
from coap_auth.secure.credentials import (
    CredentialError,
    EdhocCredential,
    EdhocIdentity,
    make_credential,
)
from coap_auth.wire import EAD_ACCESS_TOKEN, AceParam, AceProfile, ContentFormat
from device_client.ace import parse_error
from device_client.client import TokenClient
from device_client.credentials import DeviceKey
from device_client.errors import (
    ChannelRefused,
    ChannelUnavailable,
    ResourceRefused,
    ResourceUnreachable,
)
from device_client.secure_channel import ProtectedPeer, _answer, edhoc_handshake
from device_client.state import AccessToken

log = logging.getLogger("device_client.resource_client")

T = TypeVar("T")

__all__ = ["MAX_EAD_TOKEN_BYTES", "ResourceClient"]

DEFAULT_TIMEOUT = 10.0  # real seconds for one exchange
# The longest token sent in EAD_3. lakers-python 0.6 takes a CIPHERTEXT_3 of at most 255
# bytes (coap_auth.secure.edhoc.MAX_CIPHERTEXT_3_BYTES: it panics past that, and the RS
# refuses it first); with ID_CRED_I by reference (a kid of at most MAX_KID_BYTES = 16), MAC_3
# (8) and the EAD item's label and length that leaves 218 bytes of token (measured with
# lakers: 218 goes through, 219 does not; tests/device_client/test_ead_limit.py). 8 bytes
# spare. A longer token goes to /authz-info before EDHOC.
MAX_EAD_TOKEN_BYTES = 210
# RFC 9203 §4.1: ID1 is ours to choose; two random bytes (responses find their request by
# CoAP token, not by id, so ids of contexts with different servers may repeat).
CLIENT_ID_BYTES = 2
MAX_ANSWER_BYTES = 1024
_UNAUTHORIZED = int(aiocoap.UNAUTHORIZED)


class ResourceClient:
    """An ACE OSCORE profile security context with the resource server at `rs_uri`
    (coap://host:port), for the tokens `tokens` keeps; an async context manager.

    `key` is the device's P-256 key for the EDHOC profile (default: the TokenClient's
    credentials when they are a DeviceKey); `rs_credential` the RS's EDHOC credential when
    provisioned (default: built from the token's rs_cnf and audience). `timeout` is in real
    seconds per exchange.

        async with ResourceClient(context, "coap://rs.example", tokens) as rs:
            answer = await rs.request(aiocoap.GET, "temperature")

    Raises ChannelUnavailable at once when the aiocoap context has no OSCORE transport (make
    it with `create_client_context()`) or lakers-python is missing; TypeError for an
    `rs_credential` that is no EdhocCredential, ValueError for a `timeout` that is not
    positive.
    """

    def __init__(
        self,
        context: aiocoap.Context,
        rs_uri: str,
        tokens: TokenClient,
        *,
        key: DeviceKey | None = None,
        rs_credential: EdhocCredential | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if rs_credential is not None and not isinstance(rs_credential, EdhocCredential):
            raise TypeError("rs_credential: an EdhocCredential")
        if key is None and isinstance(tokens.credentials, DeviceKey):
            key = tokens.credentials
        self._tokens = tokens
        self._key = key
        self._rs_credential = rs_credential
        self._channel = _ProfileChannel(self, context, rs_uri, timeout=timeout)
        self._bound: AccessToken | None = None
        self.uri = self._channel.uri
        self.host = self._channel.host

    def __repr__(self) -> str:
        return f"<ResourceClient {self._tokens.client_id} -> {self.host}>"

    async def __aenter__(self) -> ResourceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Forget the security context (nothing runs in the background to wait for). Raises
        nothing."""
        self._channel.forget()
        self._bound = None

    # -- what the device asks -----------------------------------------------------------------

    @property
    def tokens(self) -> TokenClient:
        """Where the tokens come from (`await rs.tokens.refresh_now()` rotates the token; the
        next request sets up a context for the new one)."""
        return self._tokens

    @property
    def established(self) -> bool:
        """Whether a security context is held (the RS may have forgotten it meanwhile)."""
        return self._channel.established

    @property
    def token(self) -> AccessToken | None:
        """The token the held security context was set up with."""
        return self._bound if self._channel.established else None

    @property
    def handshakes(self) -> int:
        """How many security contexts were set up (/authz-info exchanges or EDHOC runs)."""
        return self._channel.handshakes

    @property
    def timeout(self) -> float:
        """Real seconds allowed for one exchange."""
        return self._channel.timeout

    async def establish(self) -> None:
        """Set up the security context now, unless one is held for the current token.

        Raises ResourceRefused (the RS refused the token or the handshake, or broke the
        profile), ResourceUnreachable (no answer), ChannelUnavailable (the token has no OSCORE
        profile, or what its profile needs is missing: a P-256 device key, the RS's
        credential), and TokenClient's errors (ServiceUnreachable, TokenRequestRefused)."""
        await self._tokens.token()
        await self._checked(self._channel.establish())

    async def request(
        self,
        code: aiocoap.numbers.codes.Code,
        path: str,
        payload: bytes = b"",
        *,
        content_format: int | None = None,
        accept: int | None = None,
        timeout: float | None = None,
    ) -> aiocoap.Message:
        """Send `code path` (relative to `rs_uri`) protected under the security context and
        return the RS's answer (a 4.03 for a request outside the token's scope is an answer,
        not an error). Sets the context up first when none is held or TokenClient holds a
        newer token; once more when the RS answers unprotected (it no longer holds it).

        Raises ResourceRefused (also when the RS answers unprotected under the context just
        set up), ResourceUnreachable (no answer within `timeout`, default the client's),
        ChannelUnavailable and TokenClient's errors as `establish` does. A caller's
        cancellation propagates."""
        uri = f"{self.uri}/{path.lstrip('/')}"
        tuning = self._channel.tuning

        def build() -> aiocoap.Message:
            message = aiocoap.Message(code=code, uri=uri, payload=payload, transport_tuning=tuning)
            if content_format is not None:
                message.opt.content_format = content_format
            if accept is not None:
                message.opt.accept = accept
            return message

        await self._tokens.token()  # a refresh when due: the context follows the new token
        _, answer = await self._checked(self._channel.request(build, timeout=timeout), timeout)
        return answer

    async def update_token(self) -> AccessToken:
        """Post TokenClient's current token to /authz-info over the held security context
        (update of access rights: RFC 9203 §4.1, ace+cbor `{1: token}`; draft-ietf-ace-edhoc-
        oscore-profile-11 §4.6.1, the raw CWT as application/cwt), keeping the context. The RS
        accepts it only for the same OSCORE input material (RFC 9203) or the same client key
        (EDHOC profile). Returns the token now bound.

        Raises ResourceRefused (no context held, a token of another profile, the RS refused
        it, or answered unprotected: the context is then forgotten), ResourceUnreachable, and
        TokenClient's errors."""
        token = await self._tokens.token()
        return await self._checked(self._channel.update(token))

    # -- setting up the context ---------------------------------------------------------------

    async def _checked(self, operation: Awaitable[T], timeout: float | None = None) -> T:
        """Await `operation`, naming the host on a timeout or a network error."""
        try:
            return await operation
        except TimeoutError:
            seconds = self.timeout if timeout is None else timeout
            raise ResourceUnreachable(
                f"{self.host}: no answer within {seconds:g} s", host=self.host
            ) from None
        except aiocoap.error.NetworkError as exc:
            raise ResourceUnreachable(
                f"{self.host}: {type(exc).__name__}", host=self.host
            ) from None

    def _stale(self) -> bool:
        bound, current = self._bound, self._tokens.cached
        return (
            bound is None
            or current is None
            or current.value != bound.value
            or not bound.valid_at(self._tokens.clock.now())
        )

    async def _handshake(self) -> Any:
        """A new security context with the current token (one new token when the RS refuses
        the cached one with 4.01)."""
        self._bound = None
        token = await self._tokens.token()
        try:
            oscore = await self._set_up(token)
        except ResourceRefused as refused:
            if refused.coap_code != _UNAUTHORIZED or self._tokens.cached is not token:
                raise
            log.info("%s refused our token at /authz-info; asking the AS for a new one", self.host)
            self._tokens.discard_access_token()
            token = await self._tokens.token()
            oscore = await self._set_up(token)
        self._bound = token
        log.info(
            "security context with %s set up (%s, token %s)",
            self.host,
            _profile_name(token.profile),
            token.token_hash[1:5].hex(),
        )
        return oscore

    async def _set_up(self, token: AccessToken) -> Any:
        if token.profile == AceProfile.COAP_OSCORE:
            return await self._oscore_profile(token)
        if token.profile == AceProfile.COAP_EDHOC_OSCORE:
            return await self._edhoc_profile(token)
        raise ChannelUnavailable(
            f"{self.host}: the token's ace_profile ({_profile_name(token.profile)}) is neither"
            " coap_oscore nor coap_edhoc_oscore"
        )

    async def _oscore_profile(self, token: AccessToken) -> Any:
        from coap_auth.secure.ace_oscore import (
            check_nonce,
            check_recipient_id,
            derive_context,
            new_nonce,
        )
        from coap_auth.secure.credentials import PeerCredential

        if token.cnf_osc is None:
            raise ChannelUnavailable(f"{self.host}: the token has no OSCORE input material")
        nonce1 = new_nonce()
        id1 = secrets.token_bytes(CLIENT_ID_BYTES)
        body = {
            AceParam.ACCESS_TOKEN: token.value,
            AceParam.NONCE1: nonce1,
            AceParam.ACE_CLIENT_RECIPIENTID: id1,
        }
        answer = await self._authz_info(cbor2.dumps(body), ContentFormat.ACE_CBOR)
        if answer.opt.content_format != ContentFormat.ACE_CBOR:
            raise self._broken(answer, "its /authz-info answer is not application/ace+cbor")
        params = _load_map(answer.payload)
        if params is None:
            raise self._broken(answer, "its /authz-info answer is not a CBOR map")
        try:
            nonce2 = check_nonce(params.get(AceParam.NONCE2), "nonce2")
            id2 = check_recipient_id(
                params.get(AceParam.ACE_SERVER_RECIPIENTID), "ace_server_recipientid"
            )
        except CoapAuthError as exc:
            raise self._broken(answer, str(exc)) from None
        if id2 == id1:
            # RFC 9203 §4.2: "The RS MUST ensure that ID2 is different from" ID1.
            raise self._broken(answer, "its ace_server_recipientid equals our recipient id")
        peer = PeerCredential(token.audience or self.host, None)
        try:
            return derive_context(
                token.cnf_osc, nonce1, nonce2, sender_id=id2, recipient_id=id1, peer=peer
            )
        except CoapAuthError as exc:
            raise ChannelUnavailable(f"{self.host}: {exc}") from None

    async def _edhoc_profile(self, token: AccessToken) -> Any:
        if self._key is None:
            raise ChannelUnavailable(
                f"{self.host}: coap_edhoc_oscore needs the device's P-256 key (`key`)"
            )
        identity = self._key.edhoc_identity()  # ChannelUnavailable for Ed25519
        if token.cnf_key is not None and not identity.credential.same_key(dict(token.cnf_key)):
            raise ChannelUnavailable(
                f"{self.host}: the token is bound to another key than the device key given"
            )
        credential = self._rs_credential or self._credential_from(token)
        # A credential by value (a CCS of up to 160 bytes) leaves no room for a token.
        if identity.credential.by_reference and len(token.value) <= MAX_EAD_TOKEN_BYTES:
            ead_3 = [(EAD_ACCESS_TOKEN, True, token.value)]
            try:
                return await self._edhoc(identity, credential, ead_3)
            except ResourceRefused as refused:
                # EDHOC error 1 does not say whether the RS refused the token (revoked,
                # expired, its key withdrawn) or the handshake, and an error message is not
                # authenticated: anyone on the path can forge one. So the token is never
                # uploaded in the clear instead (the draft keeps it inside EAD_3); a refusal
                # of message_3 is taken as a refusal of the token, which has _handshake ask
                # the AS for a new one, once, and try EAD_3 again.
                if not refused.at_message_3:
                    raise
                raise ResourceRefused(
                    refused.description,
                    host=self.host,
                    coap_code=_UNAUTHORIZED,
                    at_message_3=True,
                ) from None
        await self._authz_info(token.value, ContentFormat.CWT)
        return await self._edhoc(identity, credential, None)

    async def _edhoc(
        self,
        identity: EdhocIdentity,
        credential: EdhocCredential,
        ead_3: list[tuple[int, bool, bytes]] | None,
    ) -> Any:
        try:
            return await edhoc_handshake(
                self._channel.tuned(),
                self.uri,
                identity,
                credential,
                timeout=self.timeout,
                ead_3=ead_3,
            )
        except ChannelRefused as refused:
            raise ResourceRefused(
                refused.description, host=self.host, at_message_3=refused.at_message_3
            ) from None

    def _credential_from(self, token: AccessToken) -> EdhocCredential:
        from coap_auth.tokens import public_key_from_cose

        if token.rs_cnf is None or token.audience is None:
            raise ChannelUnavailable(
                f"{self.host}: no EDHOC credential for the resource server: give"
                " `rs_credential`, or ask for the token with an audience whose key the AS"
                " knows (rs_cnf)"
            )
        try:
            return make_credential(token.audience, public_key_from_cose(token.rs_cnf))  # type: ignore[arg-type]
        except (CoapAuthError, CredentialError) as exc:
            raise ChannelUnavailable(f"{self.host}: rs_cnf is unusable: {exc}") from None

    async def _authz_info(self, payload: bytes, content_format: int) -> aiocoap.Message:
        """POST to /authz-info, unprotected (once more with the Echo value when the RS
        challenges us: RFC 9175 §2.4); the 2.01 answer, or ResourceRefused."""

        def build() -> aiocoap.Message:
            return _authz_info_post(self.uri, payload, content_format, self._channel.tuning)

        answer = await _answer(self._channel.plain_request(build()), self.timeout)
        if is_echo_challenge(answer):
            # The RS did not take the token (a challenge comes before any processing, or
            # instead of an answer that would have left nothing behind): the same upload
            # again, nonce1 included, with the Echo value.
            repeat = build()
            repeat.opt.echo = answer.opt.echo
            answer = await _answer(self._channel.plain_request(repeat), self.timeout)
        if answer.code != aiocoap.CREATED:
            _, description = parse_error(answer.payload)
            raise ResourceRefused(
                f"{self.host} refused the token at /authz-info with {answer.code}: {description}",
                host=self.host,
                coap_code=int(answer.code),
            )
        return answer

    def _broken(self, answer: aiocoap.Message, problem: str) -> ResourceRefused:
        return ResourceRefused(
            f"{self.host} broke the OSCORE profile (RFC 9203): {problem}; aborted",
            host=self.host,
            coap_code=int(answer.code),
        )


class _ProfileChannel(ProtectedPeer):
    """SecureChannel's machinery with the ACE profile's handshake."""

    def __init__(
        self, owner: ResourceClient, context: aiocoap.Context, uri: str, *, timeout: float
    ) -> None:
        super().__init__(context, uri, timeout=timeout)
        self._owner = owner

    @property
    def tuning(self) -> Any:
        return self._tuning

    def tuned(self) -> Any:
        return self._tuned()

    def plain_request(self, message: aiocoap.Message) -> aiocoap.protocol.Request:
        return self._context.request(message)

    async def _handshake(self) -> Any:
        return await self._owner._handshake()

    def _stale(self, oscore: Any) -> bool:
        return self._owner._stale()

    def _refused_again(self, code: aiocoap.numbers.codes.Code) -> Exception:
        return ResourceRefused(
            f"{self.host} answered {code} unprotected under the security context just set up",
            host=self.host,
            coap_code=int(code),
        )

    async def update(self, token: AccessToken) -> AccessToken:
        from aiocoap.oscore import NotAProtectedMessage

        owner = self._owner
        async with self._lock:
            oscore, bound = self._oscore, owner._bound
            if oscore is None or bound is None:
                raise ResourceRefused(f"{self.host}: no security context to update", host=self.host)
            if token.profile != bound.profile:
                raise ResourceRefused(
                    f"{self.host}: the new token is of another profile; set up a new context",
                    host=self.host,
                )
            if token.profile == AceProfile.COAP_OSCORE:
                payload = cbor2.dumps({AceParam.ACCESS_TOKEN: token.value})
                content_format = ContentFormat.ACE_CBOR
            else:
                payload, content_format = token.value, ContentFormat.CWT

            def build() -> aiocoap.Message:
                return _authz_info_post(self.uri, payload, content_format, self._tuning)

            try:
                answer = await _answer(self._send(build, oscore), self.timeout)
            except NotAProtectedMessage as exc:
                self._oscore = None
                raise self._refused_again(exc.plain_message.code) from None
            if answer.code != aiocoap.CREATED:
                raise ResourceRefused(
                    f"{self.host} refused the token update with {answer.code}",
                    host=self.host,
                    coap_code=int(answer.code),
                )
            owner._bound = token
            return token


def _authz_info_post(uri: str, payload: bytes, content_format: int, tuning: Any) -> aiocoap.Message:
    """A POST of a token to the RS's /authz-info (RFC 9200 §5.10.1)."""
    return aiocoap.Message(
        code=aiocoap.POST,
        uri=f"{uri}/authz-info",
        payload=payload,
        content_format=content_format,
        transport_tuning=tuning,
    )


def _profile_name(profile: int | None) -> str:
    try:
        return AceProfile(profile).name.lower() if profile is not None else "none"
    except ValueError:
        return str(profile)


def _load_map(payload: bytes) -> Mapping[Any, Any] | None:
    if not payload or len(payload) > MAX_ANSWER_BYTES:
        return None
    try:
        body = untagged.loads(payload)
    except Exception:  # cbor2 raises more than CBORDecodeError on odd input
        return None
    return body if isinstance(body, dict) else None
