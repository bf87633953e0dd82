"""Bytes anyone may send are read without cbor2's tag decoders (coap_auth.untagged):
an unsigned token, an ACE body or a COSE header holding tag 35 (a regular expression cbor2
compiles) or 36 (a MIME message it parses) is refused before anything is decoded, not after
10-20 ms of that work (attack on issue 17's verification fast path)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from coap_auth import untagged
from coap_auth.errors import MalformedToken
from coap_auth.tokens import VerificationKey, cose, verify_cwt
from coap_auth.wire import CoseAlg, CoseTag

KEY = ec.generate_private_key(ec.SECP256R1())
KID = b"k1"
ENVELOPE = frozenset(map(int, CoseTag))


@contextmanager
def nothing_compiled() -> Iterator[mock.MagicMock]:
    """Fails the test if anything compiles a regular expression meanwhile (cbor2 does so for
    tag 35 as it decodes)."""
    with mock.patch.object(re, "compile", wraps=re.compile) as compiled:
        yield compiled
    assert compiled.call_count == 0, "a regular expression was compiled from the input"


def regex_tag(n: int) -> cbor2.CBORTag:
    return cbor2.CBORTag(35, f"(a{n}|b)+c")


def cwt(payload: bytes, unprotected: dict[Any, Any] | None = None) -> bytes:
    message = cose.sign1(payload, KEY, CoseAlg.ES256, KID)
    if unprotected is not None:
        message.value[1] = unprotected
    return cbor2.dumps(cbor2.CBORTag(CoseTag.CWT, message))


def lookup() -> Any:
    keys = {KID: VerificationKey(KID, CoseAlg.ES256, KEY.public_key())}
    return keys.get


def test_a_regex_tag_in_the_claims_is_refused_before_it_is_compiled() -> None:
    token = cwt(cbor2.dumps({1: "as", 2: "meter-7", 99: [regex_tag(n) for n in range(50)]}))
    with pytest.raises(MalformedToken) as refused, nothing_compiled():
        verify_cwt(token, lookup())
    assert "not well-formed CBOR" in str(refused.value)


def test_a_regex_tag_in_the_unprotected_header_is_refused_before_it_is_compiled() -> None:
    token = cwt(cbor2.dumps({1: "as"}), unprotected={4: regex_tag(1)})
    with pytest.raises(MalformedToken) as refused, nothing_compiled():
        verify_cwt(token, lookup())
    assert "not well-formed CBOR" in str(refused.value)


def test_the_envelope_tags_are_taken() -> None:
    token = cwt(cbor2.dumps({1: "as"}))
    assert not untagged.refused(token, ENVELOPE)
    assert untagged.refused(token)  # tag 61 itself, when no tag is taken


@pytest.mark.parametrize(
    ("item", "foreign"),
    [
        (cbor2.CBORTag(35, "x"), True),
        ([2**64, -(2**70)], False),  # bignums (tags 2 and 3) are taken everywhere
        ([1, {2: [3, cbor2.CBORTag(36, "m")]}], True),
        ({cbor2.CBORTag(4, (1, 2)): 1}, True),  # a tag as a map key
        (cbor2.CBORTag(18, [b"", {}, b"", b""]), False),  # taken
        (cbor2.CBORTag(18, [cbor2.CBORTag(5, [1, 2])]), True),  # inside a taken tag
        (cbor2.dumps(cbor2.CBORTag(35, "x")), False),  # inside a byte string: not read
        ([1.5, None, True, "text", b"bytes", -(2**64)], False),
        ({"a": [[[[[]]]]], 1: {}}, False),
    ],
)
def test_tags_are_found_wherever_they_nest(item: Any, foreign: bool) -> None:
    assert untagged.refused(cbor2.dumps(item), frozenset({18})) is foreign


def test_tags_in_indefinite_lengths_are_found() -> None:
    # [_ "a", {_ 1: 35("x")}]: an indefinite array holding an indefinite map.
    data = b"\x9f\x61a\xbf\x01\xd8\x23\x61x\xff\xff"
    assert untagged.refused(data)
    assert not untagged.refused(b"\x9f\x61a\xbf\x01\x02\xff\xff")
    # Chunked strings are skipped chunk by chunk: (_ h'01', h'0203').
    assert not untagged.refused(b"\x5f\x41\x01\x42\x02\x03\xff")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x1c",  # a reserved head
        b"\x9f\x01",  # an indefinite array without its break
        b"\x5a\xff\xff\xff\xff",  # a byte string longer than the data
        b"\x85\x01",  # an array short of items
        b"\xd8",  # a truncated tag head
        b"\xff",  # a stray break: cbor2 decodes it as a value
        b"\x82\xff\xd8\x23\x61x",  # ... and goes on to decode the tags after it
        b"\xa1\x01\xff",  # a break as a map value
        b"\xbf\x01\xff\xd8\x23\x61a\x01\xff",  # ... of an indefinite map (review, round 5)
    ],
)
def test_malformed_input_is_refused_unread(data: bytes) -> None:
    """Attack (round 4): the scanner once let malformed input through for cbor2 to refuse,
    but cbor2 reads a stray break (0xff) inside a definite array as a value and decodes every
    tag after it: 430 regexes behind `84 ff` cost 15 ms per unsigned token again."""
    assert untagged.refused(data)
    with pytest.raises(untagged.ForeignTag), nothing_compiled():
        untagged.loads(data)


def test_what_follows_one_item_is_not_read() -> None:
    # cbor2.loads decodes the first item and ignores the rest.
    assert not untagged.refused(b"\x01\xd8\x23\x61x")


def test_a_sequence_is_read_item_by_item() -> None:
    """EDHOC messages are CBOR sequences (RFC 9528 §3.1): every item is scanned."""
    assert not untagged.refused(b"\x03\x02\x58\x01\x00\x37", sequence=True)
    assert untagged.refused(b"\x03\x02\xd8\x23\x61x", sequence=True)
    assert untagged.refused(b"\x03\xff", sequence=True)  # a break at the top
    assert untagged.refused(b"\x03\x82\x01", sequence=True)  # the last item cut short
    assert not untagged.refused(b"", sequence=True)


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.integers() | st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(PLAIN, st.integers(min_value=0, max_value=2**64 - 1).filter(lambda tag: tag not in (2, 3)))
def test_untagged_items_decode_as_cbor2_decodes_them_and_a_tag_anywhere_is_found(
    value: Any, tag: int
) -> None:
    data = cbor2.dumps(value)
    assert not untagged.refused(data)
    assert cbor2.dumps(untagged.loads(data)) == cbor2.dumps(cbor2.loads(data))
    tagged = cbor2.dumps([value, cbor2.CBORTag(tag, value)])
    assert untagged.refused(tagged)
    assert not untagged.refused(tagged, frozenset({tag}))


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([*range(256), 0xFF, 0xBF, 0x9F, 0xD8, 0x23]), max_size=24))
def test_nothing_the_scanner_lets_through_makes_cbor2_compile(raw: list[int]) -> None:
    """Random bytes, biased to breaks, indefinite heads and tag 35: whatever `refused` lets
    through, cbor2 decodes without compiling a regular expression."""
    data = bytes(raw) + b"\x61a"
    if untagged.refused(data):
        return
    with nothing_compiled(), contextlib.suppress(Exception):
        cbor2.loads(data)
