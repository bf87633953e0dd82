"""Core deterministic CBOR encoding (RFC 8949 §4.2.1), and the check that bytes are in it.

Owns the one byte form of every CBOR item inside a token (protected header, claims).
cbor2's `canonical=True` is not this: it sorts map keys length-first (RFC 7049 §3.9), so
24 (0x18 0x18) lands after -1 (0x20), and it writes 65504.0 in four bytes, not two.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import cbor2

from coap_auth.errors import MalformedToken

_UINT, _NINT, _BYTES, _TEXT, _ARRAY, _MAP, _TAG = 0, 1, 2, 3, 4, 5, 6
_FALSE, _TRUE, _NULL = b"\xf4", b"\xf5", b"\xf6"
_SMALL_UINTS = tuple(bytes([n]) for n in range(24))
_FLOAT16, _FLOAT32, _FLOAT64 = 0xF9, 0xFA, 0xFB
# RFC 8949 §4.2.2: a NaN is written as the half-precision quiet NaN.
_NAN = b"\xf9\x7e\x00"


def dumps(value: Any) -> bytes:
    """`value` in core deterministic encoding: shortest heads and floats, definite lengths,
    map keys sorted bytewise by their encoding. TypeError for what a token never holds."""
    out = bytearray()
    _encode(value, out)
    return bytes(out)


def loads(data: bytes, what: str) -> Any:
    """Decode `data`, refusing (MalformedToken, naming `what`) any other form than `dumps`'s.

    Decoding and re-encoding gives the one deterministic form; anything else differs from it:
    long heads, indefinite lengths, unsorted or duplicate keys, trailing bytes, tags cbor2
    turns into other types (bignums that fit an integer, dates, sets)."""
    try:
        item = cbor2.loads(data)
        rebuilt = dumps(item)
    except Exception:  # cbor2's decode errors, TypeError from dumps, RecursionError
        raise MalformedToken(f"{what} is not well-formed CBOR of the kinds a token holds") from None
    if rebuilt != data:
        raise MalformedToken(f"{what} is not in deterministic CBOR encoding")
    return item


def _encode(value: Any, out: bytearray) -> None:
    # Written out rather than through cbor2.dumps (~8 us a call): this runs on every token a
    # device verifies. Exact types first; IntEnum keys and the rest take the longer way.
    kind = type(value)
    if kind is int and 0 <= value < 24:
        out.append(value)
    elif kind is str:
        _text(value, out)
    elif kind is bytes:
        out += head(_BYTES, len(value))
        out += value
    elif kind is dict:
        _map(value, out)
    else:
        _encode_other(value, out)


def _encode_other(value: Any, out: bytearray) -> None:
    if value is None:
        out += _NULL
    elif isinstance(value, bool):  # before int: True is an int to Python, not to CBOR
        out += _TRUE if value else _FALSE
    elif isinstance(value, int):
        if 0 <= value < 2**64:
            out += head(_UINT, value)
        elif -(2**64) <= value < 0:
            out += head(_NINT, -1 - value)
        else:
            # RFC 8949 §3.4.3: bignums, without leading zero bytes (cbor2 writes them so).
            out += cbor2.dumps(value)
    elif isinstance(value, str):
        _text(value, out)
    elif isinstance(value, bytes):
        out += head(_BYTES, len(value))
        out += value
    elif isinstance(value, dict):
        _map(value, out)
    elif isinstance(value, float):
        out += _float(value)
    elif isinstance(value, list | tuple) and not isinstance(value, cbor2.CBORSimpleValue):
        # A tuple is how cbor2 decodes an array used as a map key.
        out += head(_ARRAY, len(value))
        for item in value:
            _encode(item, out)
    elif isinstance(value, cbor2.CBORTag):
        out += head(_TAG, value.tag)
        _encode(value.value, out)
    else:
        raise TypeError(f"no deterministic CBOR form for {type(value).__name__}")


def _text(value: str, out: bytearray) -> None:
    data = value.encode("utf-8")
    out += head(_TEXT, len(data))
    out += data


def _map(value: dict[Any, Any], out: bytearray) -> None:
    out += head(_MAP, len(value))
    entries = sorted(((_key(key), item) for key, item in value.items()), key=_first)
    for key_bytes, item in entries:
        out += key_bytes
        _encode(item, out)


def _key(key: Any) -> bytes:
    # Claims and header labels are mostly small integers: their encoding is one byte.
    if type(key) is int and 0 <= key < 24:
        return _SMALL_UINTS[key]
    return dumps(key)


def _first(entry: tuple[bytes, Any]) -> bytes:
    return entry[0]


def head(major: int, argument: int) -> bytes:
    """RFC 8949 §3: the shortest head for this major type (0-7) and argument."""
    top = major << 5
    if argument < 24:
        return bytes([top | argument])
    if argument < 2**8:
        return bytes([top | 24, argument])
    if argument < 2**16:
        return bytes([top | 25]) + argument.to_bytes(2, "big")
    if argument < 2**32:
        return bytes([top | 26]) + argument.to_bytes(4, "big")
    return bytes([top | 27]) + argument.to_bytes(8, "big")


def _float(value: float) -> bytes:
    """RFC 8949 §4.2.1: the shortest of half, single and double that keeps the value."""
    if math.isnan(value):
        return _NAN
    for fmt, initial in ((">e", _FLOAT16), (">f", _FLOAT32)):
        try:
            packed = struct.pack(fmt, value)
        except OverflowError:
            continue
        if struct.unpack(fmt, packed)[0] == value:
            return bytes([initial]) + packed
    return bytes([_FLOAT64]) + struct.pack(">d", value)
