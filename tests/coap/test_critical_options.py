"""Issue 13: a request with a critical option the AS does not process gets 4.02 Bad Option
(RFC 7252 §5.4.1); an unknown elective option is ignored. Over real UDP, as raw datagrams.
"""

from __future__ import annotations

import aiocoap
import cbor2
import pytest
from aiocoap.optiontypes import BlockOption, OpaqueOption

from coap_auth.wire import AceParam, ContentFormat, ProblemDetail
from tests.conftest import Coap
from tests.raw_coap import exchange


def get_keys(*options: OpaqueOption) -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.GET, uri_path=("keys",))
    for option in options:
        request.opt.add_option(option)
    return request


@pytest.mark.parametrize("number", [65001, 1, 19, 35])
@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON], ids=["CON", "NON"])
async def test_an_unprocessed_critical_option_gets_bad_option(
    coap: Coap, number: int, mtype: aiocoap.Type
) -> None:
    # 65001 unassigned, 1 If-Match, 19 Q-Block1, 35 Proxy-Uri: all critical (odd), none
    # processed by the AS. (9, OSCORE, is processed: tests/secure/test_bad_input.py.)
    answer = await exchange(coap.server.port, get_keys(OpaqueOption(number, b"")), mtype)  # type: ignore[arg-type]
    assert answer.code == aiocoap.BAD_OPTION
    assert answer.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR
    # The request is small: the answer stays within 3x its size (RFC 9175 §2.4), no text.
    assert cbor2.loads(answer.payload) in (
        {},
        {
            ProblemDetail.TITLE: "Bad Option",
            ProblemDetail.DETAIL: f"critical option {number} not processed",
        },
    )


async def test_bad_option_on_a_post_and_on_an_unknown_path(coap: Coap) -> None:
    body = cbor2.dumps({AceParam.CLIENT_ID: "nobody", AceParam.CLIENT_SECRET: "x" * 16})
    token = aiocoap.Message(code=aiocoap.POST, uri_path=("token",), payload=body)
    token.opt.content_format = ContentFormat.ACE_CBOR
    token.opt.add_option(OpaqueOption(65001, b"\x01"))
    answer = await exchange(coap.server.port, token, aiocoap.CON)  # type: ignore[arg-type]
    assert answer.code == aiocoap.BAD_OPTION
    problem = cbor2.loads(answer.payload)
    assert problem[ProblemDetail.TITLE] == "Bad Option"
    assert problem[ProblemDetail.DETAIL] == "critical option 65001 not processed"

    nowhere = aiocoap.Message(code=aiocoap.GET, uri_path=("nowhere",))
    nowhere.opt.add_option(OpaqueOption(9, b""))
    answer = await exchange(coap.server.port, nowhere, aiocoap.CON)  # type: ignore[arg-type]
    assert answer.code == aiocoap.BAD_OPTION


async def test_unknown_elective_options_and_processed_critical_ones_are_fine(
    coap: Coap,
) -> None:
    answer = await exchange(
        coap.server.port,  # type: ignore[arg-type]
        get_keys(OpaqueOption(65000, b"x"), OpaqueOption(2048, b"")),
        aiocoap.CON,
    )
    assert answer.code == aiocoap.CONTENT
    # Uri-Path, Uri-Query, Accept and Block2 are critical and processed.
    response = await coap.request(
        aiocoap.GET, "/revoke/trl?diff=1", accept=ContentFormat.ACE_TRL_CBOR
    )
    assert response.code != aiocoap.BAD_OPTION
    first_block = get_keys()
    first_block.opt.accept = ContentFormat.COSE_KEY_SET
    first_block.opt.block2 = BlockOption.BlockwiseTuple(0, False, 1)  # 32-byte blocks
    answer = await exchange(coap.server.port, first_block, aiocoap.CON)  # type: ignore[arg-type]
    assert answer.code == aiocoap.CONTENT and answer.opt.block2.more
