"""Just enough CoAP (RFC 7252 §3) for the load generator: build requests, take responses apart.

Hand-rolled so that the load generator costs a few microseconds a message, not the
aiocoap client's few hundred: the server, not the client, must be the bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
CON, NON, ACK, RST = 0, 1, 2, 3
PAYLOAD_MARKER = 0xFF

GET = 1
POST = 2
CREATED = 0x41  # 2.01
CHANGED = 0x44  # 2.04
CONTENT = 0x45  # 2.05

UNAUTHORIZED = 0x81  # 4.01

ETAG = 4
OBSERVE = 6
OSCORE = 9
URI_PATH = 11
CONTENT_FORMAT = 12
URI_QUERY = 15
ACCEPT = 17
BLOCK2 = 23
ECHO = 252  # RFC 9175 §2.2.1

TOKEN_LENGTH = 8


def _ext(value: int) -> tuple[int, bytes]:
    """Option delta/length nibble and its extended bytes (RFC 7252 §3.1)."""
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, (value - 269).to_bytes(2, "big")


def _extended(nibble: int, data: bytes, position: int) -> tuple[int, int]:
    """The value an option nibble stands for, and the position after its extended bytes."""
    if nibble == 13:
        return data[position] + 13, position + 1
    if nibble == 14:
        return int.from_bytes(data[position : position + 2], "big") + 269, position + 2
    return nibble, position


def _uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    previous = 0
    for number, value in sorted(options, key=lambda option: option[0]):
        delta, delta_ext = _ext(number - previous)
        length, length_ext = _ext(len(value))
        out.append(delta << 4 | length)
        out += delta_ext + length_ext + value
        previous = number
    return bytes(out)


def request_options(
    path: str,
    content_format: int | None = None,
    observe: bool = False,
    *,
    query: tuple[str, ...] = (),
    accept: int | None = None,
    echo: bytes | None = None,
    block2: int | None = None,
) -> bytes:
    """Options of a request to `path` (a query string part per Uri-Query option; `block2`
    is the option's encoded value, see block2_value)."""
    segments = [segment for segment in path.strip("/").split("/") if segment]  # "/": none
    options = [(URI_PATH, segment.encode()) for segment in segments]
    options += [(URI_QUERY, part.encode()) for part in query]
    if content_format is not None:
        options.append((CONTENT_FORMAT, _uint(content_format)))
    if observe:
        options.append((OBSERVE, b""))
    if accept is not None:
        options.append((ACCEPT, _uint(accept)))
    if echo is not None:
        options.append((ECHO, echo))
    if block2 is not None:
        options.append((BLOCK2, _uint(block2)))
    return encode_options(options)


def block2_value(num: int, more: bool, size: int) -> int:
    """A Block2 option value (RFC 7959 §2.2): NUM, M and SZX (size = 2 ** (SZX + 4))."""
    return num << 4 | int(more) << 3 | (size.bit_length() - 5)


def parse_block(value: bytes) -> tuple[int, bool, int]:
    """(NUM, M, block size) of a Block1/Block2 option value."""
    number = int.from_bytes(value, "big")
    return number >> 4, bool(number & 0x08), 2 ** ((number & 0x07) + 4)


def encode(mtype: int, code: int, mid: int, token: bytes, options: bytes, payload: bytes) -> bytes:
    header = bytes([VERSION << 6 | mtype << 4 | len(token), code]) + mid.to_bytes(2, "big")
    return header + token + options + (bytes([PAYLOAD_MARKER]) + payload if payload else b"")


def empty_ack(mid: int) -> bytes:
    return bytes([VERSION << 6 | ACK << 4, 0]) + mid.to_bytes(2, "big")


@dataclass(slots=True)
class Response:
    mtype: int
    code: int
    mid: int
    token: bytes
    options: dict[int, bytes]
    payload: bytes
    size: int
    data: bytes  # the whole datagram (an OSCORE response is unprotected from it)


def decode(data: bytes) -> Response:
    """Take a datagram apart; raises ValueError on anything malformed."""
    if len(data) < 4 or data[0] >> 6 != VERSION:
        raise ValueError("not CoAP")
    tkl = data[0] & 0x0F
    position = 4 + tkl
    options: dict[int, bytes] = {}
    number = 0
    while position < len(data) and data[position] != PAYLOAD_MARKER:
        delta, length = data[position] >> 4, data[position] & 0x0F
        delta, position = _extended(delta, data, position + 1)
        length, position = _extended(length, data, position)
        number += delta
        options[number] = data[position : position + length]
        position += length
    payload = data[position + 1 :] if position < len(data) else b""
    return Response(
        mtype=(data[0] >> 4) & 0x03,
        code=data[1],
        mid=int.from_bytes(data[2:4], "big"),
        token=data[4 : 4 + tkl],
        options=options,
        payload=payload,
        size=len(data),
        data=data,
    )


def code_text(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"
