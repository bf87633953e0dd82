"""Block-wise answers (RFC 7959 Block2), cut statelessly from a whole representation: the
first block of a notification or registration answer (§2.6), and the block a GET asks for."""

from __future__ import annotations

import aiocoap

from coap_auth.errors import BadOption


def first_block(message: aiocoap.Message, szx: int) -> aiocoap.Message:
    """Block 0 of `message` with Block2 (M set) when its payload is larger than a block of
    2^(szx+4) bytes (RFC 7959 §2.6: a notification carries the first block; the client asks
    for the rest), else `message` itself."""
    if len(message.payload) <= 1 << (szx + 4):
        return message
    return message._extract_block(0, szx, 1024)  # noqa: SLF001 (aiocoap's own slicing)


def block_of(message: aiocoap.Message, request: aiocoap.Message, max_szx: int) -> aiocoap.Message:
    """The part of the whole answer `message` that `request` asks for (RFC 7959 §2.4): the
    block its Block2 names, never larger than it asked nor than max_szx; the first block when
    it asked for none and the answer is larger than a block. Stateless: a later block comes
    from the current representation, and its ETag tells the client whether it still matches
    the first (RFC 7959 §2.4).

    Raises BadOption for a block past the end of the representation."""
    block2 = request.opt.block2
    if block2 is None:
        return first_block(message, max_szx)
    szx = min(block2.size_exponent, max_szx)
    size = 1 << (szx + 4)
    if block2.block_number == 0 and len(message.payload) <= size:
        return message
    # A block number counts blocks of the size asked; smaller blocks start at the same byte.
    number = block2.start // size
    if number * size >= len(message.payload):
        raise BadOption("Block2 asks for a block past the end of the representation")
    return message._extract_block(number, szx, 1024)  # noqa: SLF001
