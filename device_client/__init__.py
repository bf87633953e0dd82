"""coap-auth's device side: get and keep tokens, follow keys and revocations, verify offline.

Imports only the pure parts of coap_auth (wire, errors, tokens, secure.credentials) plus
aiocoap, cbor2, cryptography and PyJWT, so it runs on a Raspberry Pi without the service's
storage; the protected channel (EDHOC, OSCORE) also needs lakers-python, imported only when a
channel is made. Everything public is listed in `__all__`; the modules behind it are
implementation.
"""

from coap_auth.secure.credentials import EdhocCredential
from coap_auth.udp import create_client_context, create_server_context
from device_client.client import RefreshPolicy, TokenClient
from device_client.clock import Clock, SystemClock
from device_client.credentials import Credentials, DeviceKey, SecretCredentials
from device_client.errors import (
    ChannelRefused,
    ChannelUnavailable,
    CoapAuthError,
    DeviceClientError,
    InsufficientScope,
    InvalidClaims,
    InvalidSignature,
    MalformedToken,
    ResourceRefused,
    ResourceUnreachable,
    ServiceUnreachable,
    StaleState,
    StateFileError,
    TokenError,
    TokenRequestRefused,
    TokenRevoked,
)
from device_client.keyset import KeySet
from device_client.observe import WatchPolicy
from device_client.resource_client import ResourceClient
from device_client.rs import AuthzInfoResource, ResourceServer, require_scope
from device_client.secure_channel import SecureChannel, load_as_credential
from device_client.state import AccessToken, DeviceState, StateFile
from device_client.trl import (
    DiffSet,
    FullSet,
    RevocationList,
    TrlDiff,
    decode_diff_set,
    decode_full_set,
)
from device_client.verify import (
    KeySource,
    RevocationSource,
    TokenVerifier,
    VerifiedToken,
)
from device_client.watch import KeySetWatcher, TrlWatcher

__all__ = [
    "AccessToken",
    "AuthzInfoResource",
    "ChannelRefused",
    "ChannelUnavailable",
    "Clock",
    "CoapAuthError",
    "Credentials",
    "DeviceClientError",
    "DeviceKey",
    "DeviceState",
    "DiffSet",
    "EdhocCredential",
    "FullSet",
    "InsufficientScope",
    "InvalidClaims",
    "InvalidSignature",
    "KeySet",
    "KeySetWatcher",
    "KeySource",
    "MalformedToken",
    "RefreshPolicy",
    "ResourceClient",
    "ResourceRefused",
    "ResourceServer",
    "ResourceUnreachable",
    "RevocationList",
    "RevocationSource",
    "SecretCredentials",
    "SecureChannel",
    "ServiceUnreachable",
    "StaleState",
    "StateFile",
    "StateFileError",
    "SystemClock",
    "TokenClient",
    "TokenError",
    "TokenRequestRefused",
    "TokenRevoked",
    "TokenVerifier",
    "TrlDiff",
    "TrlWatcher",
    "VerifiedToken",
    "WatchPolicy",
    "create_client_context",
    "create_server_context",
    "decode_diff_set",
    "decode_full_set",
    "load_as_credential",
    "require_scope",
]
