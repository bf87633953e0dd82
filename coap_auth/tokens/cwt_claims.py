"""The claims of a CWT as the AS writes them, straight between `Claims` and their bytes.

`read_claims` is the verifier's fast path: what `Claims.from_cwt_map(deterministic.loads(p))`
gives, in one pass, or None for those two to decode (or refuse) as before. `write_claims` is
the minter's: the bytes of `deterministic.dumps(claims.to_cwt_map())`, without the map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coap_auth.tokens import deterministic
from coap_auth.tokens.claims import Claims
from coap_auth.wire import CnfMethod, CwtClaim

# Plain ints: compared with every label byte read.
_ISS, _SUB, _AUD, _EXP, _NBF = (
    int(CwtClaim.ISS),
    int(CwtClaim.SUB),
    int(CwtClaim.AUD),
    int(CwtClaim.EXP),
    int(CwtClaim.NBF),
)
_IAT, _CTI, _CNF, _SCOPE = (
    int(CwtClaim.IAT),
    int(CwtClaim.CTI),
    int(CwtClaim.CNF),
    int(CwtClaim.SCOPE),
)
_COSE_KEY = int(CnfMethod.COSE_KEY)
# A map of 6 to 9 entries: the six claims `Claims` requires, and nbf, cnf, scope if present.
_MAP_HEAD = 0xA0
_FEWEST, _MOST = 6, 9
# Heads (RFC 8949 §3) with the length or value in the initial byte: 0 to 23.
_BYTES_0, _TEXT_0, _INLINE = 0x40, 0x60, 24
_UINT_8 = 0x1B  # the longest unsigned integer head: an 8-byte argument
# RFC 8949 §3: a 1-, 2-, 4- or 8-byte argument is shortest only from these values on.
_SHORTEST_FROM = {1: 24, 2: 2**8, 4: 2**16, 8: 2**32}
_UINT, _BYTES, _TEXT = 0, 2, 3  # major types
_UINT_LIMIT = 2**64
_CNF_COSE_KEY = bytes((_CNF, _MAP_HEAD + 1, _COSE_KEY))


class _NotPlain(Exception):
    """Not the form `read_claims` reads: the general path decides."""


def read_claims(payload: bytes) -> Claims | None:
    """The claims of `payload` when it is a deterministic map of the labels `Claims` has, in
    order, each holding what `Claims` takes (exp, nbf and iat unsigned, cnf a COSE_Key), the
    six required ones present; else None. Raises nothing: every check of the general path
    that could fail has made this None first, so it alone gives the error, at its moment."""
    size = len(payload)
    count = payload[0] - _MAP_HEAD if size else 0
    if not _FEWEST <= count <= _MOST:
        return None
    p = payload
    nbf = cnf_key = scope = None
    entries = _FEWEST
    try:
        # Labels in ascending order, each once (RFC 8949 §4.2.1 sorts keys bytewise; one
        # byte each here). A read past the end raises IndexError, or leaves `at` beyond it.
        if p[1] != _ISS:
            return None
        iss, at = _text(p, 2)
        if p[at] != _SUB:
            return None
        sub, at = _text(p, at + 1)
        if p[at] != _AUD:
            return None
        aud, at = _text(p, at + 1)
        if p[at] != _EXP:
            return None
        exp, at = _uint(p, at + 1)
        if p[at] == _NBF:
            nbf, at = _uint(p, at + 1)
            entries += 1
        if p[at] != _IAT:
            return None
        iat, at = _uint(p, at + 1)
        if p[at] != _CTI:
            return None
        cti, at = _bytes(p, at + 1)
        if at < size and p[at] == _CNF:
            cnf_key, at = _cose_key(p, at + 1)
            entries += 1
        if at < size and p[at] == _SCOPE:
            scope, at = _text(p, at + 1)
            entries += 1
    except (IndexError, UnicodeDecodeError, _NotPlain):
        return None
    if at != size or entries != count:
        return None
    return _new_claims(iss, sub, aud, exp, iat, cti, scope, nbf, cnf_key)


class _ClaimFields:
    """Claims' own slots, writable: what `_new_claims` fills and then turns into a Claims."""

    __slots__ = Claims.__slots__
    iss: str
    sub: str
    aud: str
    exp: int
    iat: int
    cti: bytes
    scope: str | None
    nbf: int | None
    cnf_key: Mapping[int, Any] | None
    cnf_osc: Mapping[int, Any] | None


def _new_claims(
    iss: str,
    sub: str,
    aud: str,
    exp: int,
    iat: int,
    cti: bytes,
    scope: str | None,
    nbf: int | None,
    cnf_key: Mapping[int, Any] | None,
) -> Claims:
    """`Claims(iss, sub, aud, exp, iat, cti, scope, nbf, cnf_key)`: the same frozen Claims,
    in a third of the time. A frozen dataclass's __init__ sets
    each field through object.__setattr__ (~1.5k machine instructions a field, 16k a token);
    a plain object with the same slots is filled by plain stores, then given its class
    (allowed between classes of one layout). A field added to Claims must be set here too:
    tests/tokens/test_fast_verification.py compares what this builds with Claims(...)."""
    fields = _ClaimFields()
    fields.iss = iss
    fields.sub = sub
    fields.aud = aud
    fields.exp = exp
    fields.iat = iat
    fields.cti = cti
    fields.scope = scope
    fields.nbf = nbf
    fields.cnf_key = cnf_key
    fields.cnf_osc = None
    fields.__class__ = Claims  # type: ignore[assignment]
    return fields  # type: ignore[return-value]


def _text(p: bytes, at: int) -> tuple[str, int]:
    head = p[at]
    if _TEXT_0 <= head < _TEXT_0 + _INLINE:
        end = at + 1 + head - _TEXT_0
        return p[at + 1 : end].decode("utf-8"), end
    start, end = _long_string(p, at, head - _TEXT_0)
    return p[start:end].decode("utf-8"), end


def _bytes(p: bytes, at: int) -> tuple[bytes, int]:
    head = p[at]
    if _BYTES_0 <= head < _BYTES_0 + _INLINE:
        end = at + 1 + head - _BYTES_0
        return p[at + 1 : end], end
    start, end = _long_string(p, at, head - _BYTES_0)
    return p[start:end], end


def _long_string(p: bytes, at: int, argument: int) -> tuple[int, int]:
    """Where the string whose head at `at` has this (24 to 27) argument starts and ends."""
    if not _INLINE <= argument <= _INLINE + 3:
        raise _NotPlain
    length, start = _argument(p, at, argument)
    return start, start + length


def _uint(p: bytes, at: int) -> tuple[int, int]:
    head = p[at]
    if head < _INLINE:
        return head, at + 1
    if not _INLINE <= head <= _UINT_8:
        raise _NotPlain
    return _argument(p, at, head)


def _argument(p: bytes, at: int, argument: int) -> tuple[int, int]:
    """The 1-, 2-, 4- or 8-byte argument (24 to 27) of the head at `at`, if shortest, and
    where it ends."""
    width = 1 << (argument - _INLINE)
    end = at + 1 + width
    value = int.from_bytes(p[at + 1 : end], "big")
    if value < _SHORTEST_FROM[width]:
        raise _NotPlain
    return value, end


def _cose_key(p: bytes, at: int) -> tuple[dict[Any, Any], int]:
    """cnf {1: COSE_Key} (RFC 8747 §3.1), read as `deterministic.loads` reads it inside the
    claims map; any other confirmation method takes the general path and its checks."""
    read = deterministic.read_item(p, at, 1)
    if read is None:
        raise _NotPlain
    cnf, end = read
    key = cnf.get(_COSE_KEY) if type(cnf) is dict and len(cnf) == 1 else None
    if type(key) is not dict:
        raise _NotPlain
    return key, end


def write_claims(claims: Claims) -> bytes:
    """`deterministic.dumps(claims.to_cwt_map())`, byte for byte: written field by field in
    label order when each has the type `Claims` declares (exact str, bytes, and int in 0 to
    2**64 - 1) and there is no OSCORE cnf; otherwise by that call. Raises what it raises."""
    iss, sub, aud, exp, iat, cti = (
        claims.iss,
        claims.sub,
        claims.aud,
        claims.exp,
        claims.iat,
        claims.cti,
    )
    scope, nbf, cnf_key = claims.scope, claims.nbf, claims.cnf_key
    if not (
        type(iss) is str
        and type(sub) is str
        and type(aud) is str
        and type(exp) is int
        and 0 <= exp < _UINT_LIMIT
        and type(iat) is int
        and 0 <= iat < _UINT_LIMIT
        and type(cti) is bytes
        and (scope is None or type(scope) is str)
        and (nbf is None or (type(nbf) is int and 0 <= nbf < _UINT_LIMIT))
        and claims.cnf_osc is None
    ):
        return deterministic.dumps(claims.to_cwt_map())
    try:
        out = bytearray(
            (
                _MAP_HEAD
                + _FEWEST
                + (nbf is not None)
                + (cnf_key is not None)
                + (scope is not None),
                _ISS,
            )
        )
        _put_text(out, iss)
        out.append(_SUB)
        _put_text(out, sub)
        out.append(_AUD)
        _put_text(out, aud)
        out.append(_EXP)
        out += deterministic.head(_UINT, exp)
        if nbf is not None:
            out.append(_NBF)
            out += deterministic.head(_UINT, nbf)
        out.append(_IAT)
        out += deterministic.head(_UINT, iat)
        out.append(_CTI)
        out += deterministic.head(_BYTES, len(cti))
        out += cti
        if cnf_key is not None:
            # RFC 8747 §3.1: cnf {1: COSE_Key}, a map of one: nothing to sort.
            out += _CNF_COSE_KEY
            out += deterministic.dumps(dict(cnf_key))
        if scope is not None:
            out.append(_SCOPE)
            _put_text(out, scope)
    except UnicodeEncodeError:  # a lone surrogate: the general encoder raises it, in its order
        return deterministic.dumps(claims.to_cwt_map())
    return bytes(out)


def _put_text(out: bytearray, text: str) -> None:
    data = text.encode("utf-8")
    out += deterministic.head(_TEXT, len(data))
    out += data
