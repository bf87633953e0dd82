"""The device side's errors, as branches of coap-auth's one exception tree.

    CoapAuthError                       coap_auth.errors
    ├── TokenError                      a token did not verify (4.01 at an RS)
    │   ├── MalformedToken              coap_auth.errors
    │   ├── InvalidSignature            coap_auth.errors (also: unknown kid)
    │   ├── InvalidClaims               coap_auth.errors (expired, wrong issuer or audience)
    │   └── TokenRevoked                its hash is on the TRL (RFC 9770)
    ├── ServiceUnavailable              coap_auth.errors (5.03 with Max-Age)
    │   └── StaleState                  an RS's keys or TRL are older than its bound
    └── DeviceClientError               base of what only the device side raises
        ├── TokenRequestRefused         the AS answered /token with an RFC 9200 error (names
        │   │                           the host)
        │   └── ChannelRefused          EDHOC with the AS failed, or the AS keeps refusing the
        │                               OSCORE context it made (names the host)
        ├── ChannelUnavailable          this device cannot run the protected channel (an Ed25519
        │                               key, no lakers-python, an unusable AS credential)
        ├── ServiceUnreachable          no usable answer from the AS (names the host);
        │                               `retry_at` says when to try
        ├── ResourceRefused             a resource server refused our token or security context
        │                               (names the host; `coap_code` its answer)
        ├── ResourceUnreachable         no answer from a resource server (names the host)
        ├── InsufficientScope           a valid token whose scope does not cover the request
        └── StateFileError              the state file cannot be read or written

Messages are one line and never carry a token, a refresh token, a secret or key material.
"""

from __future__ import annotations

from coap_auth.errors import (
    CoapAuthError,
    InvalidClaims,
    InvalidSignature,
    MalformedToken,
    ServiceUnavailable,
    TokenError,
)

__all__ = [
    "ChannelRefused",
    "ChannelUnavailable",
    "CoapAuthError",
    "DeviceClientError",
    "InsufficientScope",
    "InvalidClaims",
    "InvalidSignature",
    "MalformedToken",
    "ResourceRefused",
    "ResourceUnreachable",
    "ServiceUnreachable",
    "StaleState",
    "StateFileError",
    "TokenError",
    "TokenRequestRefused",
    "TokenRevoked",
]


class TokenRevoked(TokenError):
    """The token's hash is on the token revocation list (RFC 9770 §4)."""


class StaleState(ServiceUnavailable):
    """The verifier's key set or revocation list was last confirmed by the AS longer ago than
    its staleness bound: every token is refused (5.03 with Max-Age) until it is current again,
    since a token revoked meanwhile could not be told from a good one."""


class DeviceClientError(CoapAuthError):
    """Base of the errors only the device side raises."""


class TokenRequestRefused(DeviceClientError):
    """The AS at `host` refused a /token (or /revoke) request with an RFC 9200 §5.8.3 error.

    `ace_code` is the error code (wire.AceErrorCode, or None when the body had none) and
    `coap_code` the CoAP response code, e.g. 4.01 with ace_code 2 for invalid_client.
    """

    def __init__(
        self, description: str, *, ace_code: int | None, coap_code: int, host: str
    ) -> None:
        super().__init__(description)
        self.ace_code = ace_code
        self.coap_code = coap_code
        self.host = host


class ChannelRefused(TokenRequestRefused):
    """The protected channel to the AS at `host` could not be made: the AS refused our EDHOC
    credential (not registered, or registered with another key), its own did not verify against
    the provisioned AS credential, or it refused a request under an OSCORE context EDHOC had
    just made. A configuration problem, like a refused /token request; `ace_code` is None and
    `coap_code` 0 (the refusal is EDHOC's, not an answer of /token). `at_message_3`: the
    server had authenticated itself and refused our message_3."""

    def __init__(self, description: str, *, host: str, at_message_3: bool = False) -> None:
        super().__init__(description, ace_code=None, coap_code=0, host=host)
        self.at_message_3 = at_message_3


class ChannelUnavailable(DeviceClientError):
    """The protected channel (EDHOC + OSCORE, docs/protocol.md "Protected channels") cannot run on
    this device as set up: the device key is Ed25519 (cipher suite 2 needs P-256), the AS
    credential does not parse, lakers-python is missing (it has no wheel for 32-bit ARM), or
    the aiocoap context has no OSCORE transport."""


class ServiceUnreachable(DeviceClientError):
    """No usable answer from the AS at `host`: timeout, network error, a 5.xx, or still
    backing off.

    `retry_at` is the clock time before which the client will not try again.
    """

    def __init__(self, description: str, *, retry_at: int, host: str) -> None:
        super().__init__(description)
        self.retry_at = retry_at
        self.host = host


class ResourceRefused(DeviceClientError):
    """A resource server at `host` refused to set up or keep the security context of an ACE
    OSCORE profile: /authz-info refused the token (`coap_code`, e.g. 4.01 or 4.03), EDHOC
    failed (`coap_code` 0: the refusal is EDHOC's), its answer broke the profile (a bad
    nonce2, ace_server_recipientid equal to ours), or it answered unprotected under the
    context just made. `at_message_3`: EDHOC failed on our message_3, after the server had
    authenticated itself."""

    def __init__(
        self, description: str, *, host: str, coap_code: int = 0, at_message_3: bool = False
    ) -> None:
        super().__init__(description)
        self.host = host
        self.coap_code = coap_code
        self.at_message_3 = at_message_3


class ResourceUnreachable(DeviceClientError):
    """No answer from the resource server at `host` within the time allowed, or a network
    error on the way there."""

    def __init__(self, description: str, *, host: str) -> None:
        super().__init__(description)
        self.host = host


class InsufficientScope(DeviceClientError):
    """A valid token whose scope does not cover the request (RFC 9200 §5.10.2: 4.03)."""


class StateFileError(DeviceClientError):
    """The state file is unreadable, malformed, or cannot be written."""
