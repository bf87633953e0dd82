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
# An indefinite-length map's state on the scanner's stack (counts are >= 0).
_KEY, _VALUE = -1, -2
# Taken everywhere: cbor2 reads them as the integers they are (RFC 8949 §3.4.3), at no cost
# beyond their length; what reads them then refuses the integers it does not take.
_BIGNUMS = frozenset({2, 3})


class ForeignTag(ValueError):
    """The CBOR holds a tag its reader does not take."""


def loads(data: bytes, allowed: frozenset[int] = _NO_TAGS) -> Any:
    """`cbor2.loads(data)`, unless `refused(data, allowed)` (ForeignTag, before anything is
    decoded). cbor2's own errors otherwise, as before."""
    if refused(data, allowed):
        raise ForeignTag("a CBOR tag that is not taken here, or malformed CBOR")
    return cbor2.loads(data)


def refused(data: bytes, allowed: frozenset[int] = _NO_TAGS, *, sequence: bool = False) -> bool:
    """Whether to refuse `data` unread: the CBOR item it starts with (`sequence`: every item of
    the CBOR sequence it is) holds a tag outside `allowed` and the bignum tags, or is not
    well-formed as far as its heads tell (a break where none may be, a reserved head, a
    truncated one). The contents of byte and text strings are not read. What follows a single
    item is not read either (cbor2.loads ignores it)."""
    at, end = 0, len(data)
    # Items still to read at each level of nesting; None: until a break (an indefinite array
    # or string, or, at the bottom of a sequence, until the end of the data); _KEY and _VALUE:
    # an indefinite map, before a key (a break may end it) or before that key's value (cbor2
    # would read a break there as the value, and go on).
    pending: list[int | None] = [None] if sequence else [1]
    while at < end:
        if not pending:
            return False  # one item read whole; the rest is not decoded
        left = pending[-1]
        if left == 0:
            pending.pop()
            continue
        initial = data[at]
        at += 1
        if initial == _BREAK:
            if left not in (None, _KEY) or len(pending) == 1:
                return True  # cbor2 reads a stray break as a value and goes on
            pending.pop()
            continue
        if left == _KEY:
            pending[-1] = _VALUE
        elif left == _VALUE:
            pending[-1] = _KEY
        elif left is not None:
            pending[-1] = left - 1
        major, info = initial >> 5, initial & 0x1F
        argument: int | None
        if info < 24:
            argument = info
        elif info in _ARGUMENT_BYTES:
            size = _ARGUMENT_BYTES[info]
            if at + size > end:
                return True  # truncated
            argument = int.from_bytes(data[at : at + size], "big")
            at += size
        elif info == _INDEFINITE and 2 <= major <= 5:
            argument = None
        else:
            return True  # reserved
        if major in (2, 3):  # byte and text strings: skipped, or their chunks read
            if argument is None:
                pending.append(None)
            else:
                at += argument
        elif major == 4:
            pending.append(argument)
        elif major == 5:
            pending.append(_KEY if argument is None else 2 * argument)
        elif major == _TAG:
            if argument not in allowed and argument not in _BIGNUMS:
                return True
            pending.append(1)
    while pending and pending[-1] == 0:
        pending.pop()
    # Read to the end: whole only if nothing is left half read (a sequence's own level aside).
    return at > end or pending != ([None] if sequence else [])
