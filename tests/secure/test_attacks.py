"""Issue 14: what an outsider's attack on the protected channel found, each shown by the
attack itself over real UDP (they failed before the fixes and pass after)."""

from __future__ import annotations

import logging

import aiocoap
import cbor2
import lakers
import pytest
from aiocoap.optiontypes import OpaqueOption
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.secure.credentials import device_credential
from coap_auth.secure.edhoc import encode_connection_id
from coap_auth.wire import AceParam
from tests.raw_coap import exchange
from tests.secure.conftest import Device, Protected
from tests.secure.test_bad_input import edhoc_error, edhoc_post, message_1, oscore_post
from tests.secure.test_bounded_state import Handshake


@pytest.mark.parametrize(
    "payload",
    [
        b"\xf5\xc4\x82\x3b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",  # method: 4([-huge, 1])
        b"\xf5\x03\xc5\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",  # suites: 5([huge, 1])
        b"\xd8\x64\x00" + b"\x00" * 20,  # C_R: tag 100
    ],
)
async def test_odd_cbor_tags_get_an_edhoc_error(protected: Protected, payload: bytes) -> None:
    err_code, _ = edhoc_error(await exchange(protected.server.port, edhoc_post(payload)))
    assert err_code == 1


async def test_a_c_i_too_long_for_oscore_is_refused(protected: Protected) -> None:
    # C_I becomes the AS's OSCORE sender id, at most 7 bytes: an 8-byte one broke nonces.
    long_c_i = bytes(lakers.EdhocInitiator().prepare_message_1(c_i=bytes(8), ead_1=None))
    err_code, info = edhoc_error(
        await exchange(protected.server.port, edhoc_post(b"\xf5" + long_c_i))
    )
    assert err_code == 1 and "C_I" in str(info)
    assert protected.server.edhoc.pending == 0


async def refused_handshake(protected: Protected, subject: str) -> object:
    """EDHOC with a key nobody registered, naming `subject` by reference: the error."""
    stranger = Device(
        device_credential(subject, ec.generate_private_key(ec.SECP256R1())),
        None,  # type: ignore[arg-type]
        protected.base,
        protected.server,
    )
    handshake = Handshake(stranger, protected)
    await handshake.send_message_1()
    return edhoc_error(await handshake.send_message_3())


async def test_edhoc_does_not_tell_which_ids_exist(protected: Protected) -> None:
    await protected.device("sensor-1")
    registered = await refused_handshake(protected, "sensor-1")
    unknown = await refused_handshake(protected, "nobody")
    with_nul = await refused_handshake(protected, "sensor-1\x00")  # PostgreSQL refused NUL: 5.00
    assert registered == unknown == with_nul == (1, "message_3 not accepted")
    assert len(protected.server.contexts) == 0


async def test_reserved_partial_iv_lengths_get_bad_option(protected: Protected) -> None:
    device = await protected.device("sensor-1")
    context = await device.handshake()
    kid = context.sender_id  # seen on the wire in every request of the device
    for piv_length in (6, 7):
        option = bytes([0x08 | piv_length]) + bytes(piv_length) + kid
        answer = await exchange(protected.server.port, oscore_post(option))
        assert answer.code == aiocoap.BAD_OPTION


async def test_malformed_inner_options_get_a_bad_request_and_no_log(
    protected: Protected, caplog: pytest.LogCaptureFixture
) -> None:
    device = await protected.device("sensor-1")
    context = await device.handshake()
    inner = aiocoap.Message(code=aiocoap.GET, uri_path=("revoke", "trl"))
    inner.opt.add_option(OpaqueOption(15, b"diff=\xff\xfesecret"))
    protected_request, _ = context.protect(inner)
    with caplog.at_level(logging.DEBUG, logger="coap_auth"):
        answer = await exchange(protected.server.port, protected_request)
    # aiocoap cannot decode the plaintext into a message: 4.00, and nothing of it logged
    # (it was an unprotected 5.00 and a traceback quoting the decrypted bytes).
    assert answer.code == aiocoap.BAD_REQUEST, answer
    assert "secret" not in caplog.text and "Traceback" not in caplog.text
    # (An inner code that is no method: tests/secure/test_fuzz_secure.py.)


async def test_garbage_under_a_kid_does_not_keep_its_context_alive(
    protected: Protected, clock: object
) -> None:
    device = await protected.device("sensor-1")
    context = await device.handshake()
    idle = protected.service.settings.oscore_idle_timeout
    # Garbage every half idle period, from anyone who saw the kid: it does not decrypt, and
    # the context expires all the same.
    expected = (aiocoap.BAD_REQUEST, aiocoap.BAD_REQUEST, aiocoap.UNAUTHORIZED)
    for code in expected:
        clock.advance(idle // 2)  # type: ignore[attr-defined]
        garbage = oscore_post(b"\x09\x63" + context.sender_id, b"\x00" * 16)
        assert (await exchange(protected.server.port, garbage)).code == code
    assert context.sender_id not in protected.server.contexts


async def test_a_disabled_device_no_longer_reads_its_list(protected: Protected) -> None:
    device = await protected.device("sensor-1")
    await device.handshake()
    assert (await device.request(aiocoap.GET, "/revoke/trl")).code == aiocoap.CONTENT
    await protected.service.store.disable_client(
        "sensor-1", protected.service.clock.now(), "operator"
    )
    assert (await device.request(aiocoap.GET, "/revoke/trl")).code == aiocoap.UNAUTHORIZED


async def test_one_device_holds_at_most_its_limit_of_observations(protected: Protected) -> None:
    device = await protected.device("sensor-1")
    await device.handshake()
    limit = protected.service.settings.observers_per_source
    observations = []
    for _ in range(limit + 2):
        request = aiocoap.Message(code=aiocoap.GET, uri=f"{device.base}/revoke/trl", observe=0)
        observation = device.context.request(request)
        assert (await observation.response).code == aiocoap.CONTENT
        observations.append(observation)
    trl = protected.server.trl_resource
    mine = [o for o in protected.server.observers.of(trl) if o.source == "peer:sensor-1"]
    assert len(mine) == limit
    response, _ = await device.post_ace("/token", {AceParam.AUDIENCE: "thermostat"})
    assert response.code == aiocoap.CREATED


async def test_a_credential_lakers_reads_differently_is_refused(
    protected: Protected, capfd: pytest.CaptureFixture[str]
) -> None:
    """Second round, critical: a CCS with the victim's key where cbor2 looks and the
    attacker's x under label 254 (0x18 0xFE), which lakers-python 0.6 reads as -2. cbor2
    matched the victim's registered key, lakers verified the attacker's MAC: anyone knowing a
    device's public key was that device."""
    victim = await protected.device("sensor-1")
    victim_key = victim.identity.credential
    attacker = ec.generate_private_key(ec.SECP256R1())
    attacker_x = attacker.public_key().public_numbers().x.to_bytes(32, "big")
    cose_key = (
        b"\xa6\x01\x02\x02" + cbor2.dumps(victim_key.kid) + b"\x20\x01"
        + b"\x21" + cbor2.dumps(victim_key.x) + b"\x22" + cbor2.dumps(victim_key.y)
        + b"\x18\xfe" + cbor2.dumps(attacker_x)
    )  # fmt: skip
    crafted = b"\xa2\x02" + cbor2.dumps("sensor-1") + b"\x08\xa1\x01" + cose_key
    port = protected.server.port
    initiator = lakers.EdhocInitiator()
    message_1 = initiator.prepare_message_1(c_i=b"\x09", ead_1=None)
    answer = await exchange(port, edhoc_post(b"\xf5" + bytes(message_1)))
    c_r, id_cred_r, _ = initiator.parse_message_2(answer.payload)
    as_ccs = protected.service.edhoc_identity.credential.ccs
    checked = lakers.credential_check_or_fetch(id_cred_r, as_ccs)
    scalar = attacker.private_numbers().private_value.to_bytes(32, "big")
    initiator.verify_message_2(scalar, crafted, checked)
    message_3, _ = initiator.prepare_message_3(lakers.CredentialTransfer.ByValue, None)
    answer = await exchange(port, edhoc_post(encode_connection_id(bytes(c_r)) + bytes(message_3)))
    assert edhoc_error(answer) == (1, "message_3 not accepted")
    assert len(protected.server.contexts) == 0
    assert "panicked" not in capfd.readouterr().err


async def test_inputs_lakers_misreads_are_refused_before_it(
    protected: Protected, capfd: pytest.CaptureFixture[str]
) -> None:
    port = protected.server.port
    # A message_3 of 256 bytes or more: lakers 0.6 reads its 2-byte length as 1 byte, panics.
    handshake = Handshake(await protected.device("sensor-1"), protected)
    await handshake.send_message_1()
    long_message_3 = encode_connection_id(bytes(handshake.c_r)) + cbor2.dumps(bytes(300))
    assert edhoc_error(await exchange(port, edhoc_post(long_message_3)))[0] == 1
    # A critical EAD item after four others: lakers 0.6 parses four and ignores the rest.
    with_ead = message_1() + b"".join(cbor2.dumps(label) for label in (1, 1, 1, 1, -5))
    assert edhoc_error(await exchange(port, edhoc_post(b"\xf5" + with_ead)))[0] == 1
    assert "panicked" not in capfd.readouterr().err
