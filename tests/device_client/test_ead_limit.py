"""How long a token ResourceClient may put in EAD_3 (MAX_EAD_TOKEN_BYTES), measured with lakers
and coap_auth's EDHOC responder, the one device_client's RS runs.

lakers-python 0.6 reads a CIPHERTEXT_3 of at most 255 bytes (one more and it panics; the
responder refuses such a message_3 before lakers sees it). With ID_CRED_I by reference under
the longest kid a credential has (MAX_KID_BYTES, 16), MAC_3 and the item's label and length,
that leaves 218 bytes of EAD value: 218 goes through, 219 does not. ResourceClient keeps a
margin below that, and the responder takes what it sends.
"""

from __future__ import annotations

from typing import Any

import lakers
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.secure.contexts import ContextTable
from coap_auth.secure.credentials import MAX_KID_BYTES, device_credential
from coap_auth.secure.edhoc import (
    EdhocFailure,
    Message3Binding,
    Responder,
    encode_connection_id,
)
from coap_auth.wire import EAD_ACCESS_TOKEN
from device_client.resource_client import MAX_EAD_TOKEN_BYTES

LONGEST_KID = "sixteen-byte-id!"
LAKERS_MAX_EAD_VALUE = 218  # measured: with a 16-byte kid, 219 bytes panic lakers 0.6


async def _handshake(value: bytes) -> tuple[list[Any], Any]:
    """EDHOC (lakers initiator, coap_auth Responder) with `value` as a critical EAD_3 item
    (label 24, the access token's): the items the responder's hook saw, and the context."""
    assert len(LONGEST_KID.encode()) == MAX_KID_BYTES
    device = device_credential(LONGEST_KID, ec.generate_private_key(ec.SECP256R1()))
    assert device.credential.by_reference
    rs = device_credential("door", ec.generate_private_key(ec.SECP256R1()))
    device_key = device.private_key.public_key()
    seen: list[Any] = []

    async def resolve(subject: str) -> list[Any]:
        return [device_key] if subject == LONGEST_KID else []

    async def hook(items: list[Any]) -> Message3Binding:
        seen.extend(items)
        return Message3Binding(resolve, lambda context: None)

    table = ContextTable(lambda: 0, max_contexts=4, idle_timeout=60)
    responder = Responder(rs, table, resolve, lambda: 0, ead_3=hook)
    initiator = lakers.EdhocInitiator()
    message_1 = bytes(initiator.prepare_message_1(c_i=b"\x01", ead_1=None))
    message_2 = responder.message_1(message_1, "127.0.0.1")
    c_r, id_cred_r, _ = initiator.parse_message_2(message_2)
    checked = lakers.credential_check_or_fetch(id_cred_r, rs.credential.ccs)
    initiator.verify_message_2(device.private_scalar, device.credential.ccs, checked)
    message_3, _ = initiator.prepare_message_3(
        lakers.CredentialTransfer.ByReference, [lakers.EADItem(EAD_ACCESS_TOKEN, True, value)]
    )
    context = await responder.message_3(encode_connection_id(bytes(c_r)) + bytes(message_3))
    return seen, context


@pytest.mark.parametrize("length", [MAX_EAD_TOKEN_BYTES, LAKERS_MAX_EAD_VALUE])
async def test_a_token_up_to_the_limit_goes_through(length: int) -> None:
    value = bytes(range(256))[:length]
    seen, context = await _handshake(value)
    assert seen == [(EAD_ACCESS_TOKEN, True, value)]
    assert context.peer.id == LONGEST_KID


async def test_one_byte_more_is_refused_before_lakers() -> None:
    with pytest.raises(EdhocFailure, match="message_3 malformed"):
        await _handshake(bytes(LAKERS_MAX_EAD_VALUE + 1))


def test_the_limit_keeps_a_margin() -> None:
    assert 200 < MAX_EAD_TOKEN_BYTES <= LAKERS_MAX_EAD_VALUE - 8
