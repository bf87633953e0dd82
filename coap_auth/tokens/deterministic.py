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

from coap_auth import untagged
from coap_auth.errors import MalformedToken

_UINT, _NINT, _BYTES, _TEXT, _ARRAY, _MAP, _TAG = 0, 1, 2, 3, 4, 5, 6
_FALSE, _TRUE, _NULL = b"\xf4", b"\xf5", b"\xf6"
_FLOAT16, _FLOAT32, _FLOAT64 = 0xF9, 0xFA, 0xFB
# RFC 8949 §4.2.2: a NaN is written as the half-precision quiet NaN.
_NAN = b"\xf9\x7e\x00"
# Claims nest three deep at most (cnf, COSE_Key, its members); deeper takes the long way.
_PLAIN_DEPTH = 8
# RFC 8949 §3: a 1-, 2-, 4- or 8-byte argument is shortest only from these values on.
_SHORTEST_FROM = {1: 24, 2: 2**8, 4: 2**16, 8: 2**32}
_KEY_TYPES = (int, str, bytes)
# The one-byte encodings of -24 to 23 (RFC 8949 §3.1: major types 1 and 0).
_SMALL_INT_KEYS = {n: bytes([n if n >= 0 else 0x20 | (-1 - n)]) for n in range(-24, 24)}


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
    # The usual case, read straight from the bytes: what `_read` takes is in deterministic
    # form by construction (~2x faster than decoding with cbor2 and encoding again).
    read = _read(data, 0, 0) if data else None
    if read is not None and read[1] == len(data):
        return read[0]
    try:
        item = untagged.loads(data)
        rebuilt = dumps(item)
    except Exception:  # cbor2's decode errors, TypeError from dumps, RecursionError
        raise MalformedToken(f"{what} is not well-formed CBOR of the kinds a token holds") from None
    if rebuilt != data:
        raise MalformedToken(f"{what} is not in deterministic CBOR encoding")
    return item


def read_item(data: bytes, at: int, depth: int) -> tuple[Any, int] | None:
    """The item at `at` of an item being read by `loads` (`depth` maps and arrays deep) and
    where it ends, when `loads`' fast reader takes it; else None. Raises nothing."""
    return _read(data, at, depth)


def _read(data: bytes, at: int, depth: int) -> tuple[Any, int] | None:
    """The item at `at` and where it ends, as cbor2 decodes it, if it is in deterministic
    form and of the kinds claims and headers hold: integers, byte and text strings, arrays,
    and maps with integer or string keys. None for anything else (other kinds, long heads,
    unsorted or repeated keys, bad UTF-8, truncation), which `loads` leaves to cbor2."""
    size = len(data)
    if at >= size:
        return None
    initial = data[at]
    if initial < 24:  # 0 to 23, the whole item in one byte
        return initial, at + 1
    major, argument = initial >> 5, initial & 0x1F
    at += 1
    if argument >= 24:
        if argument > 27:  # reserved, or an indefinite length
            return None
        width = 1 << (argument - 24)
        end = at + width
        if end > size:
            return None
        argument = int.from_bytes(data[at:end], "big")
        if argument < _SHORTEST_FROM[width]:
            return None
        at = end
    if major == _UINT:
        return argument, at
    if major == _NINT:
        return -1 - argument, at
    if major == _BYTES or major == _TEXT:
        end = at + argument
        if end > size:
            return None
        if major == _BYTES:
            return data[at:end], end
        try:
            return data[at:end].decode("utf-8"), end
        except UnicodeDecodeError:
            return None
    if depth >= _PLAIN_DEPTH:
        return None
    if major == _ARRAY:
        items = []
        for _ in range(argument):
            read = _read(data, at, depth + 1)
            if read is None:
                return None
            items.append(read[0])
            at = read[1]
        return items, at
    if major == _MAP:
        return _read_map(data, at, argument, depth)
    return None  # tags, simple values, floats


def _read_map(data: bytes, at: int, count: int, depth: int) -> tuple[Any, int] | None:
    """`_read` of a map's `count` entries from `at`. The items claims and headers hold most,
    small labels, integers, short strings, are read here without a call each."""
    size = len(data)
    out: dict[Any, Any] = {}
    # Where the previous key's encoding starts and ends (none yet: empty, below any key).
    previous_start = previous_end = 0
    for _ in range(count):
        if at >= size:
            return None
        key: Any = data[at]
        # RFC 8949 §4.2.1: keys sorted bytewise by their encodings, none twice.
        if key < 24:  # a small label: its encoding is the one byte `key`
            if previous_end and key <= data[previous_start]:
                return None
            key_end = at + 1
        else:
            key_read = _read(data, at, depth + 1)
            if key_read is None or type(key_read[0]) not in _KEY_TYPES:
                return None
            key, key_end = key_read
            if data[at:key_end] <= data[previous_start:previous_end]:
                return None
        previous_start, previous_end = at, key_end
        at = key_end
        if at >= size:
            return None
        initial = data[at]
        if initial < 0x18:  # unsigned 0 to 23
            out[key] = initial
            at += 1
        elif initial < 0x1C:  # unsigned, a 1-, 2-, 4- or 8-byte argument (dates)
            width = 1 << (initial - 0x18)
            end = at + 1 + width
            value = int.from_bytes(data[at + 1 : end], "big")
            if end > size or value < _SHORTEST_FROM[width]:
                return None
            out[key] = value
            at = end
        elif 0x20 <= initial < 0x38:  # negative -1 to -24
            out[key] = 0x1F - initial
            at += 1
        elif 0x40 <= initial < 0x58 or 0x60 <= initial < 0x78:  # bytes, text: 0-23 long
            end = at + 1 + (initial & 0x1F)
            if end > size:
                return None
            if initial < 0x58:
                out[key] = data[at + 1 : end]
            else:
                try:
                    out[key] = data[at + 1 : end].decode("utf-8")
                except UnicodeDecodeError:
                    return None
            at = end
        else:
            value_read = _read(data, at, depth + 1)
            if value_read is None:
                return None
            out[key] = value_read[0]
            at = value_read[1]
    return out, at


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
    # Claims, header and COSE_Key labels are mostly small integers, often IntEnum members:
    # their encoding is one byte (bool is an int to Python, not to CBOR).
    if isinstance(key, int) and type(key) is not bool:
        encoded = _SMALL_INT_KEYS.get(int(key))
        if encoded is not None:
            return encoded
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
