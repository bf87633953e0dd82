"""The use cases of the authorization server, transport-free: `AuthService` and its requests."""

from coap_auth.service.core import AuthService, IssuedToken, TokenRequest, TokenSubmission
from coap_auth.service.revocation import TrlQuery, parse_trl_query

__all__ = [
    "AuthService",
    "IssuedToken",
    "TokenRequest",
    "TokenSubmission",
    "TrlQuery",
    "parse_trl_query",
]
