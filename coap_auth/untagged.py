"""cbor2.loads for bytes anyone may have sent, without cbor2's tag decoders.

cbor2 turns tagged items into Python objects as it reads them: tag 35 compiles a regular
expression, tag 36 runs the e-mail parser, tags 4 and 5 build decimals. None of it is in a
token, an ACE body or a COSE header, yet a few kilobytes of such tags cost 10-20 ms before
any check could refuse them (measured on unsigned tokens). `loads` reads the item's heads
first and refuses any tag but the ones the caller expects, so that cbor2 meets none.
"""

from __future__ import annotations

from typing import Any

import cbor2

_TAG = 6
_BREAK = 0xFF
# A head's additional information: 24-27 say the argument follows in 1, 2, 4 or 8 bytes;
# 31 is an indefinite length (strings, arrays, maps).
_ARGUMENT_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}
_INDEFINITE = 31
_NO_TAGS: frozenset[int] = frozenset()
# Taken everywhere: cbor2 reads them as the integers they are (RFC 8949 §3.4.3), at no cost
# beyond their length; what reads them then refuses the integers it does not take.
_BIGNUMS = frozenset({2, 3})


class ForeignTag(ValueError):
    """The CBOR holds a tag its reader does not take."""


def loads(data: bytes, allowed: frozenset[int] = _NO_TAGS) -> Any:
    """`cbor2.loads(data)`, unless `data` holds a tag outside `allowed` and the bignum tags
    (ForeignTag, before anything is decoded). cbor2's own errors otherwise, as before."""
    if foreign_tag(data, allowed):
        raise ForeignTag("a CBOR tag that is not taken here")
    return cbor2.loads(data)


def foreign_tag(data: bytes, allowed: frozenset[int] = _NO_TAGS) -> bool:
    """Whether the CBOR item `data` starts with holds a tag outside `allowed` (the contents of
    byte and text strings are not read). Reads heads only, never deeper than the data is long;
    stops with False at anything malformed, which cbor2 then refuses."""
    at, end = 0, len(data)
    # Items still to read at each level of nesting; None: until a break (indefinite length).
    pending: list[int | None] = [1]
    while pending and at < end:
        left = pending[-1]
        if left == 0:
            pending.pop()
            continue
        initial = data[at]
        at += 1
        if initial == _BREAK:
            if left is not None:
                return False  # a break where none may be
            pending.pop()
            continue
        if left is not None:
            pending[-1] = left - 1
        major, info = initial >> 5, initial & 0x1F
        argument: int | None
        if info < 24:
            argument = info
        elif info in _ARGUMENT_BYTES:
            size = _ARGUMENT_BYTES[info]
            if at + size > end:
                return False  # truncated
            argument = int.from_bytes(data[at : at + size], "big")
            at += size
        elif info == _INDEFINITE and 2 <= major <= 5:
            argument = None
        else:
            return False  # reserved, or a float or simple value's: nothing nested in it
        if major in (2, 3):  # byte and text strings: skipped, or their chunks read
            if argument is None:
                pending.append(None)
            else:
                at += argument
        elif major == 4:
            pending.append(argument)
        elif major == 5:
            pending.append(None if argument is None else 2 * argument)
        elif major == _TAG:
            if argument not in allowed and argument not in _BIGNUMS:
                return True
            pending.append(1)
    return False
