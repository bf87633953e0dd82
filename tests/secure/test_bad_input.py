"""Issue 14, bad input: every malformed or hostile EDHOC or OSCORE message gets the RFC's
error (an EDHOC error message, 4.00, 4.01 or 4.02), changes nothing, and never gets 5.00.
Raw datagrams over real UDP."""

from __future__ import annotations

import io
import re
from unittest import mock

import aiocoap
import cbor2
import lakers
import pytest
from aiocoap.optiontypes import OpaqueOption

from coap_auth.secure.edhoc import encode_connection_id
from coap_auth.wire import AceParam, ContentFormat
from tests.raw_coap import exchange
from tests.secure.conftest import Protected


def edhoc_post(payload: bytes) -> aiocoap.Message:
    return aiocoap.Message(
        code=aiocoap.POST,
        uri_path=(".well-known", "edhoc"),
        payload=payload,
        content_format=ContentFormat.CID_EDHOC_CBOR_SEQ,
    )


def edhoc_error(answer: aiocoap.Message) -> tuple[int, object]:
    assert answer.code == aiocoap.BAD_REQUEST, answer
    assert answer.opt.content_format == ContentFormat.EDHOC_CBOR_SEQ
    decoder = cbor2.CBORDecoder(io.BytesIO(answer.payload))
    return decoder.decode(), decoder.decode()


def message_1(suites: object = 2, method: int = 3) -> bytes:
    """A well-formed message_1 from lakers, or one re-encoded with other method/suites."""
    real = bytes(lakers.EdhocInitiator().prepare_message_1(c_i=b"\x01\x02", ead_1=None))
    decoder = cbor2.CBORDecoder(io.BytesIO(real))
    _method, _suites, g_x, c_i = (decoder.decode() for _ in range(4))
    return b"".join(cbor2.dumps(item) for item in (method, suites, g_x, c_i))


def state(protected: Protected) -> tuple[int, int]:
    return protected.server.edhoc.pending, len(protected.server.contexts)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xf5", 1),  # true and nothing
        (b"\xf5\xff\x00garbage", 1),
        (b"\xf5" + message_1(method=0), 1),  # method 0 (signatures)
        (b"\xf5" + message_1(suites=[0, 1]), 2),  # suites we do not offer
        (b"\xf5" + message_1(suites=[2, 0]), 2),  # ours offered, another selected
        (b"\xf5" + message_1(suites=2)[:-5], 1),  # truncated
        (b"\x42\x99\x99" + b"\x00" * 20, 1),  # message_3 for no handshake
        (b"\xff", 1),  # not even a connection identifier
        (b"", 1),
    ],
    # Named, not by value: message_1 carries a fresh ephemeral key, and ids made from it
    # would differ between pytest-xdist's workers, which must all collect the same tests.
    ids=[
        "true-only",
        "true-garbage",
        "method-0",
        "suites-not-ours",
        "ours-offered-other-selected",
        "truncated",
        "message-3-no-handshake",
        "no-connection-id",
        "empty",
    ],
)
async def test_garbage_edhoc_gets_an_edhoc_error(
    protected: Protected, payload: bytes, code: int
) -> None:
    before = state(protected)
    err_code, err_info = edhoc_error(await exchange(protected.server.port, edhoc_post(payload)))
    assert err_code == code
    if code == 2:
        assert err_info == 2  # SUITES_R: the suite we support (RFC 9528 §6.3)
    else:
        # Text, left empty when it would make the answer over 3x a tiny request.
        assert isinstance(err_info, str)
    assert state(protected) == before


async def test_wrong_method_and_content_format(protected: Protected) -> None:
    port = protected.server.port
    get = aiocoap.Message(code=aiocoap.GET, uri_path=(".well-known", "edhoc"))
    assert (await exchange(port, get)).code == aiocoap.METHOD_NOT_ALLOWED
    wrong = edhoc_post(b"\xf5" + message_1())
    wrong.opt.content_format = ContentFormat.ACE_CBOR
    assert (await exchange(port, wrong)).code == aiocoap.UNSUPPORTED_CONTENT_FORMAT
    assert state(protected) == (0, 0)


async def _to_message_3(port: int) -> tuple[lakers.EdhocInitiator, bytes, bytes]:
    """A real message_1 sent and message_2 read: the initiator, C_R and ID_CRED_R."""
    initiator = lakers.EdhocInitiator()
    answer = await exchange(
        port, edhoc_post(b"\xf5" + bytes(initiator.prepare_message_1(c_i=b"\x07", ead_1=None)))
    )
    assert answer.code == aiocoap.CHANGED
    c_r, id_cred_r, _ = initiator.parse_message_2(answer.payload)
    return initiator, bytes(c_r), bytes(id_cred_r)


async def test_a_replayed_message_3_finds_no_handshake(protected: Protected) -> None:
    device = await protected.device("sensor-1")
    identity = device.identity
    as_credential = protected.service.edhoc_identity.credential
    port = protected.server.port
    initiator, c_r, id_cred_r = await _to_message_3(port)
    checked = lakers.credential_check_or_fetch(id_cred_r, as_credential.ccs)
    initiator.verify_message_2(identity.private_scalar, identity.credential.ccs, checked)
    message_3, _ = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    request = encode_connection_id(bytes(c_r)) + bytes(message_3)
    assert (await exchange(port, edhoc_post(request))).code == aiocoap.CHANGED
    assert state(protected) == (0, 1)
    # The same message_3 again (a new message id, so not the message layer's duplicate).
    err_code, _ = edhoc_error(await exchange(port, edhoc_post(request)))
    assert err_code == 1
    assert state(protected) == (0, 1)


def oscore_post(option: bytes, payload: bytes = b"\x00" * 16) -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.POST, uri_path=("token",), payload=payload)
    request.opt.add_option(OpaqueOption(9, option))
    return request


@pytest.mark.parametrize(
    ("option", "code"),
    [
        (b"\x0a\x01", aiocoap.BAD_OPTION),  # a 2-byte PIV announced, 1 byte there
        (b"\x0f", aiocoap.BAD_OPTION),  # reserved PIV length 7
        (b"\x01\x00", aiocoap.BAD_OPTION),  # a PIV but no kid
        (b"\x09\x00\x99\x99", aiocoap.UNAUTHORIZED),  # a kid no context has
        (b"\x19\x00\x04ctx!\x99\x99", aiocoap.UNAUTHORIZED),  # a kid context we never use
    ],
)
async def test_bad_oscore_requests(protected: Protected, option: bytes, code: int) -> None:
    before = state(protected)
    answer = await exchange(protected.server.port, oscore_post(option))
    assert answer.code == code, answer
    assert state(protected) == before


async def test_oscore_under_a_real_context_but_tampered(protected: Protected) -> None:
    device = await protected.device("sensor-1")
    context = await device.handshake()
    request = aiocoap.Message(
        code=aiocoap.POST,
        uri_path=("token",),
        payload=cbor2.dumps({AceParam.AUDIENCE: "thermostat"}),
        content_format=ContentFormat.ACE_CBOR,
    )
    protected_request, _ = context.protect(request)
    tampered = protected_request.copy(payload=protected_request.payload[:-1] + b"\x00")
    answer = await exchange(protected.server.port, tampered)
    assert answer.code == aiocoap.BAD_REQUEST  # decryption failed
    # A wrong kid context on an otherwise valid kid: no such context.
    option = protected_request.opt.oscore
    flags, rest = option[0], option[1:]
    piv_len = flags & 0x07
    with_context = bytes([flags | 0x10]) + rest[:piv_len] + b"\x02zz" + rest[piv_len:]
    answer = await exchange(
        protected.server.port, oscore_post(with_context, protected_request.payload)
    )
    assert answer.code == aiocoap.UNAUTHORIZED
    # The untampered request is still fresh and works; sent twice, the second is a replay.
    first = await exchange(protected.server.port, protected_request.copy())
    assert first.code == aiocoap.CHANGED  # the outer code of a protected 2.01
    again = await exchange(protected.server.port, protected_request.copy())
    assert again.code == aiocoap.UNAUTHORIZED


async def test_a_non_with_a_bad_oscore_option_gets_no_answer(protected: Protected) -> None:
    with pytest.raises(TimeoutError):
        await exchange(
            protected.server.port, oscore_post(b"\x09\x00\x99\x99"), aiocoap.NON, timeout=0.5
        )


async def test_a_tagged_message_1_is_refused_before_cbor2_decodes_its_tags(
    protected: Protected,
) -> None:
    """Attack (issue 17, round 4): message_1 was decoded with cbor2's tag decoders before any
    check (a regex compiled per tag 35, ~5 ms per 2 KB datagram). Refused unread now: an
    EDHOC error, and no regular expression compiled."""
    payload = b"\xf5\x03\x02" + b"\xd8\x23\x65(a|b)" * 40  # regexes after the suite
    before = state(protected)
    with mock.patch.object(re, "compile", wraps=re.compile) as compiled:
        answer = await exchange(protected.server.port, edhoc_post(payload))
    assert compiled.call_count == 0
    assert edhoc_error(answer)[0] == 1
    assert state(protected) == before


async def test_a_tagged_message_3_is_refused_before_cbor2_decodes_its_tags(
    protected: Protected,
) -> None:
    """Review (round 5): after a real message_1 and message_2, anyone holding the C_R sent a
    message_3 that cbor2 decoded, tags and all, before finding it is no byte string (only C_R
    was scanned). Refused unread now."""
    port = protected.server.port
    _, c_r, _ = await _to_message_3(port)
    tagged = b"\x98\x28" + b"\xd8\x23\x65(a|b)" * 40  # an array of 40 regexes
    with mock.patch.object(re, "compile", wraps=re.compile) as compiled:
        answer = await exchange(port, edhoc_post(encode_connection_id(bytes(c_r)) + tagged))
    assert compiled.call_count == 0
    assert edhoc_error(answer)[0] == 1
