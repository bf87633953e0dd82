"""The protected channel from a device to the AS: EDHOC (RFC 9528) on first use, then OSCORE
(RFC 8613) for /token, /revoke and /revoke/trl (docs/protocol.md "Protected channels").

`SecureChannel` holds one OSCORE context with one AS, for one identity (a device's key, or a
resource server's). It runs EDHOC when it holds none, one handshake at a time, and sends each
request it is given protected under that context. The AS keeps contexts in memory only: after
it restarts, or evicts an idle context, it answers a protected request unprotected (4.01,
Max-Age 0). The channel then runs EDHOC again and sends the request once more; the AS did not
process the refused one. That answer is unprotected and can be forged (RFC 8613 Appendix
D.5.3): an attacker on the path can make the device resend a request the AS did process,
which costs at most one more grant (another refresh family), a refresh answered again inside
the grace window, or a second revocation (no effect), and one EDHOC run. `load_as_credential`
reads the AS's credential as `coap-auth edhoc-credential --json` prints it.

Requests are protected one by one (their remote names the context), not through the aiocoap
context's `client_credentials`: a resource server and a device may then share one aiocoap
context with different identities, and `/keys` and `/.well-known/core` stay plain CoAP.
lakers-python is imported only when a channel is made: it has no wheel for 32-bit ARM, and
the rest of device_client stays importable there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiocoap
from aiocoap.numbers.constants import TransportTuning
from cryptography.hazmat.primitives import serialization

from coap_auth.secure.credentials import (
    CredentialError,
    EdhocCredential,
    EdhocIdentity,
    parse_credential,
)
from device_client._transport import reliable_within
from device_client.credentials import DeviceKey
from device_client.errors import ChannelRefused, ChannelUnavailable

log = logging.getLogger("device_client.secure_channel")

__all__ = ["ProtectedPeer", "SecureChannel", "edhoc_handshake", "load_as_credential"]

DEFAULT_TIMEOUT = 10.0  # real seconds for one exchange

Build = Callable[[], aiocoap.Message]


def load_as_credential(text: str | bytes) -> EdhocCredential:
    """The AS's EDHOC credential, from what `coap-auth edhoc-credential --json` printed (the
    other fields, when present, must agree with its CCS) or from the CCS alone, in hex.
    Raises ChannelUnavailable when it is neither, or not a P-256 credential."""
    try:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
    except UnicodeDecodeError:
        raise ChannelUnavailable("AS credential: neither JSON nor hex") from None
    stripped = text.strip()
    if not stripped:
        raise ChannelUnavailable("AS credential: empty")
    document: dict[str, Any] = {}
    if stripped.startswith("{"):
        try:
            loaded = json.loads(stripped)
        except ValueError:
            raise ChannelUnavailable("AS credential: not valid JSON") from None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("ccs"), str):
            raise ChannelUnavailable("AS credential: no `ccs` in the JSON")
        document = loaded
        stripped = loaded["ccs"]
    try:
        credential = parse_credential(bytes.fromhex(stripped))
    except ValueError as exc:  # bad hex, or CredentialError
        detail = str(exc) if isinstance(exc, CredentialError) else "the CCS is not hex"
        raise ChannelUnavailable(f"AS credential: {detail}") from None
    _check_agrees(credential, document)
    return credential


def _check_agrees(credential: EdhocCredential, document: dict[str, Any]) -> None:
    """The JSON's descriptive fields say what its CCS says (a copy-paste mix-up shows here)."""
    expected = credential.document()
    for name in ("subject", "kid", "method", "cipher_suite"):
        if name in document and document[name] != expected[name]:
            raise ChannelUnavailable(f"AS credential: `{name}` does not match its CCS")
    pem = document.get("public_key_pem")
    if pem is not None:
        try:
            key = serialization.load_pem_public_key(str(pem).encode("ascii"))
        except (ValueError, TypeError, UnicodeEncodeError):
            raise ChannelUnavailable("AS credential: `public_key_pem` is not a PEM key") from None
        if not credential.same_key(key):
            raise ChannelUnavailable("AS credential: `public_key_pem` does not match its CCS")


class ProtectedPeer:
    """One OSCORE context with one server, made by `_handshake` (a subclass's) when none is
    held, one handshake at a time; requests go out protected under it, and an unprotected
    answer (the server no longer holds the context) makes a new handshake and one resend.

    Implementation shared by `SecureChannel` (EDHOC with the AS) and
    `device_client.ResourceClient`'s channel (an ACE profile with a resource server).
    `establish` and `request` raise what the subclass's handshake raises, `request` also the
    subclass's refusal when the server answers unprotected under a new context, TimeoutError
    and aiocoap's errors; a caller's cancellation always propagates. Raises
    ChannelUnavailable at once when the aiocoap context has no OSCORE transport.
    """

    def __init__(self, context: aiocoap.Context, uri: str, *, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        _check_oscore_transport(context)
        self._context = context
        self.uri = uri.rstrip("/")
        self.host = self.uri.split("://", 1)[-1]
        self.timeout = timeout
        self._tuning = reliable_within(timeout)
        self._oscore: Any = None  # coap_auth.secure.contexts.OscoreContext
        self._lock = asyncio.Lock()
        self.handshakes = 0  # handshakes completed

    @property
    def established(self) -> bool:
        """Whether an OSCORE context is held (the server may have forgotten it meanwhile)."""
        return self._oscore is not None

    def forget(self) -> None:
        """Drop the context: the next request makes a new one first. Raises nothing."""
        self._oscore = None

    async def establish(self) -> Any:
        """The OSCORE context, after a handshake if none is held (or the held one is stale).
        Raises what the handshake raises (SecureChannel: ChannelRefused, ChannelUnavailable,
        TimeoutError, aiocoap's errors); a caller's cancellation propagates."""
        async with self._lock:
            if self._oscore is None or self._stale(self._oscore):
                self._oscore = None
                self._oscore = await self._handshake()
                self.handshakes += 1
            return self._oscore

    async def request(
        self, build: Build, *, timeout: float | None = None
    ) -> tuple[aiocoap.protocol.Request, aiocoap.Message]:
        """Send `build()` under the OSCORE context; when the server answers unprotected (it no
        longer holds the context), make a new one and send a fresh `build()` once more.
        Raises what `establish` raises, the refusal of a server that answers unprotected under
        the new context too (SecureChannel: ChannelRefused), TimeoutError (no answer within
        `timeout`) and aiocoap's errors."""
        from aiocoap.oscore import NotAProtectedMessage

        timeout = self.timeout if timeout is None else timeout
        oscore = await self.establish()
        request = self._send(build, oscore)
        try:
            return request, await _answer(request, timeout)
        except NotAProtectedMessage as exc:
            refused = exc.plain_message.code
        log.info(
            "%s answered %s unprotected: it no longer holds our OSCORE context; making a new one",
            self.host,
            refused,
        )
        oscore = await self._renew(oscore)
        request = self._send(build, oscore)
        try:
            return request, await _answer(request, timeout)
        except NotAProtectedMessage as exc:
            refused = exc.plain_message.code
        if self._oscore is oscore:
            self._oscore = None
        raise self._refused_again(refused)

    # -- what a subclass says -----------------------------------------------------------------

    async def _handshake(self) -> Any:
        """Make a new OSCORE context with the server."""
        raise NotImplementedError

    def _stale(self, oscore: Any) -> bool:
        """Whether the held context must be replaced before the next request."""
        return False

    def _refused_again(self, code: aiocoap.numbers.codes.Code) -> Exception:
        return ChannelRefused(
            f"{self.host} answered {code} unprotected under the OSCORE context just made",
            host=self.host,
        )

    # -- shared -------------------------------------------------------------------------------

    async def _renew(self, stale: Any) -> Any:
        async with self._lock:
            if self._oscore is None or self._oscore is stale:
                self._oscore = None
                self._oscore = await self._handshake()
                self.handshakes += 1
            # else: a concurrent request already made a new one; use it.
            return self._oscore

    def _tuned(self) -> _TunedContext:
        return _TunedContext(self._context, self._tuning)

    def _send(self, build: Build, oscore: Any) -> aiocoap.protocol.Request:
        from aiocoap.transports.oscore import OSCOREAddress

        message = build()
        # What aiocoap's OSCORE transport does for a URI in client_credentials, for this
        # message only.
        message.remote = OSCOREAddress(oscore, message.remote)
        return self._context.request(message)


class SecureChannel(ProtectedPeer):
    """EDHOC + OSCORE with the AS at `as_uri`, as `identity` (a P-256 DeviceKey, or an
    EdhocIdentity), authenticating the AS by its provisioned `as_credential`.

    `request(build)` sends `build()` protected and returns the aiocoap request (for an
    observation) and its first answer. It raises ChannelRefused, TimeoutError (no answer
    within `timeout` real seconds per exchange) or aiocoap's errors; a caller's cancellation
    always propagates. Raises ChannelUnavailable at once when the channel cannot run here
    (an Ed25519 key, no OSCORE transport, no lakers-python), TypeError for an `as_credential`
    that is no EdhocCredential, ValueError for a `timeout` that is not positive.
    """

    def __init__(
        self,
        context: aiocoap.Context,
        as_uri: str,
        identity: DeviceKey | EdhocIdentity,
        as_credential: EdhocCredential,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not isinstance(as_credential, EdhocCredential):
            raise TypeError("as_credential: an EdhocCredential (see load_as_credential)")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._identity = identity.edhoc_identity() if isinstance(identity, DeviceKey) else identity
        super().__init__(context, as_uri, timeout=timeout)
        self.as_uri = self.uri
        self.as_credential = as_credential

    def __repr__(self) -> str:
        return f"<SecureChannel {self.subject} -> {self.host}>"

    @property
    def subject(self) -> str:
        """Who we are to the AS: the id our EDHOC credential names."""
        return self._identity.credential.subject

    async def _handshake(self) -> Any:
        oscore = await edhoc_handshake(
            self._tuned(), self.uri, self._identity, self.as_credential, timeout=self.timeout
        )
        log.info("EDHOC with %s done: OSCORE context as %s", self.host, self.subject)
        return oscore

    def _refused_again(self, code: aiocoap.numbers.codes.Code) -> Exception:
        return ChannelRefused(
            f"{self.host} answered {code} unprotected under the OSCORE context EDHOC had just made",
            host=self.host,
        )


async def edhoc_handshake(
    context: Any,
    uri: str,
    identity: EdhocIdentity,
    peer: EdhocCredential,
    *,
    timeout: float,
    ead_3: list[tuple[int, bool, bytes]] | None = None,
) -> Any:
    """EDHOC as initiator with the server at `uri`, within 2 * `timeout` (two exchanges):
    the OSCORE context. Raises ChannelRefused (naming the host), ChannelUnavailable (no
    lakers-python), TimeoutError or aiocoap's network errors."""
    host = uri.split("://", 1)[-1]
    try:
        from coap_auth.secure.edhoc import EdhocRefused, establish
    except ImportError:
        raise ChannelUnavailable(_NO_LAKERS) from None
    try:
        # Two exchanges: message_1 -> message_2, message_3 -> 2.04.
        return await asyncio.wait_for(
            establish(context, uri, identity, peer, ead_3=ead_3), 2 * timeout
        )
    except EdhocRefused as exc:
        raise ChannelRefused(str(exc), host=host, at_message_3=exc.at_message_3) from None
    except ImportError:
        raise ChannelUnavailable(_NO_LAKERS) from None


_NO_LAKERS = (
    "EDHOC needs lakers-python, which is not installed (it has no wheel for 32-bit ARM): "
    "this device can use only plain CoAP, with an AS whose require_oscore is off"
)


async def _answer(request: aiocoap.protocol.Request, timeout: float) -> aiocoap.Message:
    try:
        return await asyncio.wait_for(request.response, timeout)
    except BaseException:
        # Not swallowed: only the observation (if any) is let go before it propagates.
        abandon(request)
        raise


def abandon(request: aiocoap.protocol.Request) -> None:
    """Let go of a request's observation, if it has one that is still running."""
    observation = request.observation
    if observation is not None and not observation.cancelled:
        observation.cancel()


def _check_oscore_transport(context: aiocoap.Context) -> None:
    try:
        import lakers  # noqa: F401  (what aiocoap's OSCORE transport and our EDHOC need)
        from aiocoap.transports.oscore import TransportOSCORE
    except ImportError:
        raise ChannelUnavailable(_NO_LAKERS) from None
    if not any(isinstance(i, TransportOSCORE) for i in context.request_interfaces):
        raise ChannelUnavailable(
            "this aiocoap context has no OSCORE transport: make it with"
            " device_client.create_client_context()"
        )


class _TunedContext:
    """The aiocoap context as `establish` uses it (`request`), with our transport tuning on
    each EDHOC message: an exchange given up on ends by itself instead of holding the next one
    back for 93 s (RFC 7252 §4.7 NSTART; device_client._transport)."""

    def __init__(self, context: aiocoap.Context, tuning: TransportTuning) -> None:
        self._context = context
        self._tuning = tuning

    def request(self, message: aiocoap.Message, **kwargs: Any) -> aiocoap.protocol.Request:
        message.transport_tuning = self._tuning
        return self._context.request(message, **kwargs)
