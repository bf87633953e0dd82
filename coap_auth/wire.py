"""Protocol numbers of coap-auth's wire contract (docs/protocol.md), as IntEnums.

Every integer that crosses the wire is named here once; the registries are cited per enum.
"""

from enum import IntEnum


class ContentFormat(IntEnum):
    """CoAP Content-Formats registry (RFC 7252 §12.3) entries aiocoap does not name."""

    JSON = 50
    ACE_CBOR = 19  # RFC 9200 §8.16
    CWT = 61  # RFC 8392 §9.4
    COSE_KEY_SET = 102  # RFC 9052 §11.2
    PROBLEM_DETAILS_CBOR = 257  # RFC 9290 §6.3
    ACE_TRL_CBOR = 262  # RFC 9770 §13
    EDHOC_CBOR_SEQ = 64  # RFC 9528 §10.9: message_2, message_4 and error messages
    CID_EDHOC_CBOR_SEQ = 65  # RFC 9528 §10.9: requests, a connection identifier first


class CoapCode(IntEnum):
    """CoAP response codes used by coap-auth (RFC 7252 §12.1.2), as class * 32 + detail."""

    CREATED = 65  # 2.01
    CONTENT = 69  # 2.05
    VALID = 67  # 2.03
    BAD_REQUEST = 128  # 4.00
    UNAUTHORIZED = 129  # 4.01
    BAD_OPTION = 130  # 4.02 (RFC 7252 §5.4.1: a critical option not processed)
    NOT_FOUND = 132  # 4.04
    METHOD_NOT_ALLOWED = 133  # 4.05
    NOT_ACCEPTABLE = 134  # 4.06
    REQUEST_ENTITY_INCOMPLETE = 136  # 4.08 (RFC 7959 §2.9.2)
    REQUEST_ENTITY_TOO_LARGE = 141  # 4.13
    UNSUPPORTED_CONTENT_FORMAT = 143  # 4.15
    TOO_MANY_REQUESTS = 157  # 4.29 (RFC 8516)
    INTERNAL_SERVER_ERROR = 160  # 5.00
    SERVICE_UNAVAILABLE = 163  # 5.03


class AceParam(IntEnum):
    """OAuth Parameters CBOR Mappings (RFC 9200 §8.10, Table 5) and introspection (§8.12)."""

    ACCESS_TOKEN = 1
    EXPIRES_IN = 2
    REQ_CNF = 4
    AUDIENCE = 5
    CNF = 8
    SCOPE = 9
    ACTIVE = 10  # introspection response (RFC 9200 §5.9.2)
    TOKEN = 11  # introspection / revocation request (RFC 9200 §5.9.1)
    CLIENT_ID = 24
    CLIENT_SECRET = 25
    ERROR = 30
    ERROR_DESCRIPTION = 31
    GRANT_TYPE = 33
    TOKEN_TYPE = 34
    REFRESH_TOKEN = 37
    ACE_PROFILE = 38
    NONCE1 = 40  # RFC 9203 §9.2
    RS_CNF = 41  # RFC 9201 §6: the RS's authentication credential, for the client
    NONCE2 = 42  # RFC 9203 §9.2
    ACE_CLIENT_RECIPIENTID = 43  # RFC 9203 §9.2
    ACE_SERVER_RECIPIENTID = 44  # RFC 9203 §9.2


# The longest access-token lifetime (s) the AS issues; verifiers refuse a token whose exp - iat
# is longer (device_client's default `max_lifetime`), so a stolen key cannot mint one for years.
MAX_TOKEN_LIFETIME = 24 * 3600

# RFC 9200 allows unregistered parameters under text keys; these are ours (docs/protocol.md).
CLIENT_ASSERTION = "client_assertion"
TOKEN_FORMAT = "token_format"


class AceProfile(IntEnum):
    """ACE Profiles registry (RFC 9200 §8.8): the value of ace_profile (38)."""

    COAP_DTLS = 1  # RFC 9202
    COAP_OSCORE = 2  # RFC 9203 §9.1
    # draft-ietf-ace-edhoc-oscore-profile-11: value TBD; 4 is its Appendix C example value.
    # PROVISIONAL until IANA assigns one.
    COAP_EDHOC_OSCORE = 4


# draft-ietf-ace-edhoc-oscore-profile-11 §4.1, EAD item "ACE-OAuth Access Token": label TBD
# (24-255), 24 in its examples; PROVISIONAL. The item is critical: -24 on the wire.
EAD_ACCESS_TOKEN = 24


class GrantType(IntEnum):
    """OAuth Grant Type CBOR Mappings (RFC 9200 §8.11, Table 6)."""

    PASSWORD = 0
    AUTHORIZATION_CODE = 1
    CLIENT_CREDENTIALS = 2
    REFRESH_TOKEN = 3


class TokenType(IntEnum):
    """OAuth Token Type CBOR Mappings (RFC 9200 §8.8, Table 7)."""

    BEARER = 1
    POP = 2


class AceErrorCode(IntEnum):
    """OAuth Error Code CBOR Mappings (RFC 9200 §8.4, Table 10)."""

    INVALID_REQUEST = 1
    INVALID_CLIENT = 2
    INVALID_GRANT = 3
    UNAUTHORIZED_CLIENT = 4
    UNSUPPORTED_GRANT_TYPE = 5
    INVALID_SCOPE = 6
    UNSUPPORTED_POP_KEY = 7


class ProblemDetail(IntEnum):
    """Concise problem details keys (RFC 9290 §2; custom key ace-trl-error RFC 9770 §15.3)."""

    TITLE = -1
    DETAIL = -2
    ACE_TRL_ERROR = 1


class TrlParam(IntEnum):
    """TRL response parameters (RFC 9770 §12, Table 1)."""

    FULL_SET = 0
    DIFF_SET = 1
    CURSOR = 2
    MORE = 3


class TrlErrorId(IntEnum):
    """ace-trl-error identifiers (RFC 9770 §13, Table 2); inner map {0: id, 1: cursor}."""

    INVALID_PARAMETER_VALUE = 0
    INVALID_SET_OF_PARAMETERS = 1
    OUT_OF_BOUND_CURSOR_VALUE = 2


class CwtClaim(IntEnum):
    """CBOR Web Token Claims registry (RFC 8392 §9.1; cnf RFC 8747 §3.1; scope RFC 9200 §8.14)."""

    ISS = 1
    SUB = 2
    AUD = 3
    EXP = 4
    NBF = 5
    IAT = 6
    CTI = 7
    CNF = 8
    SCOPE = 9


class CnfMethod(IntEnum):
    """CWT Confirmation Methods (RFC 8747 §3.1)."""

    COSE_KEY = 1
    ENCRYPTED_COSE_KEY = 2
    KID = 3
    OSC = 4  # RFC 9203 §9.6: OSCORE_Input_Material


class OscoreInput(IntEnum):
    """OSCORE Security Context Parameters (RFC 9203 §9.4, Table 1): OSCORE_Input_Material."""

    ID = 0
    VERSION = 1
    MS = 2
    HKDF = 3
    ALG = 4
    SALT = 5
    CONTEXT_ID = 6


class CoseTag(IntEnum):
    """CBOR tags of COSE and CWT (RFC 9052 §2, RFC 8392 §6)."""

    ENCRYPT0 = 16
    MAC0 = 17
    SIGN1 = 18
    CWT = 61


class CoseHeader(IntEnum):
    """COSE Header Parameters (RFC 9052 §3.1)."""

    ALG = 1
    KID = 4
    IV = 5


class CoseAlg(IntEnum):
    """COSE Algorithms (RFC 9053 §2, §3.1)."""

    ES256 = -7
    EDDSA = -8
    HMAC_256_64 = 4
    AES_CCM_16_64_128 = 10  # RFC 9053 §4.2: 128-bit key, 64-bit tag, 13-byte nonce


class CoseKeyParam(IntEnum):
    """COSE Key Common and Type Parameters (RFC 9052 §7.1, RFC 9053 §7)."""

    KTY = 1
    KID = 2
    ALG = 3
    KEY_OPS = 4
    CRV = -1
    X = -2
    Y = -3
    D = -4
    K = -1  # symmetric key value (kty 4)


class CoseKty(IntEnum):
    """COSE Key Types (RFC 9053 §7)."""

    OKP = 1
    EC2 = 2
    SYMMETRIC = 4


class CoseCurve(IntEnum):
    """COSE Elliptic Curves (RFC 9053 §7.1)."""

    P256 = 1
    ED25519 = 6


class CoseKeyOp(IntEnum):
    """COSE Key Operation Values (RFC 9052 §7.1, Table 5)."""

    SIGN = 1
    VERIFY = 2
