"""The use cases of the authorization server, transport-free: `AuthService` and its requests.

The values its callers see (claims, change counters, token formats) are re-exported here, so the
CoAP layer needs no import of the layers below the service.
"""

from coap_auth.service.core import AuthService, TokenSubmission
from coap_auth.service.minting import IssuedToken, TokenRequest
from coap_auth.service.revocation import TrlQuery, parse_trl_query
from coap_auth.store import TOKEN_FORMATS, ChangeCounters
from coap_auth.tokens import Claims

__all__ = [
    "TOKEN_FORMATS",
    "AuthService",
    "ChangeCounters",
    "Claims",
    "IssuedToken",
    "TokenRequest",
    "TokenSubmission",
    "TrlQuery",
    "parse_trl_query",
]
