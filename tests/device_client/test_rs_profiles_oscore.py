"""The OSCORE profile of ACE (RFC 9203) at a real resource server over real UDP: the
/authz-info exchange, the derived context, access decided per context, and every bad input of
issue 15 refused with the code RFC 9200 §5.10.1.1 / RFC 9203 §4.2 name, storing nothing.
Tokens are minted in the test (tests/device_client/rs_site.py Minter); the end-to-end with the
real AS is elsewhere."""

from __future__ import annotations

import base64
import secrets
import socket
from collections.abc import AsyncIterator

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.tokens import token_hash
from device_client import DeviceKey, KeySet, ResourceServer, RevocationList, TokenVerifier
from tests.device_client.rs_site import AUDIENCE, CF_ACE, ISSUER, ProfileRs, profile_rs
from tests.raw_coap import forged_request, local_port, raw_socket

CF_PROBLEM = 257


@pytest.fixture
async def rs(clock: SettableClock) -> AsyncIterator[ProfileRs]:
    async with profile_rs(clock) as running:
        yield running


def _detail(response: aiocoap.Message) -> str:
    assert response.opt.content_format == CF_PROBLEM
    return str(cbor2.loads(response.payload).get(-2, ""))


def _stored_nothing(rs: ProfileRs) -> None:
    server = rs.resource_server
    assert len(server.contexts) == 0 and len(server.nonces) == 0 and not server._tokens


async def test_read_and_write_within_scope_and_403_outside(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token(scope="temp:read")
    response, context = await rs.authz_info(rs.victim, token, material, id1=b"\x01")
    assert response.code == aiocoap.CREATED
    assert response.opt.content_format == CF_ACE
    answer = cbor2.loads(response.payload)
    assert set(answer) == {42, 44} and len(answer[42]) == 8 and answer[44] != b"\x01"
    assert context is not None

    reading, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert protected and reading.code == aiocoap.CONTENT and reading.payload == b"21.5"
    refused, protected = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"30")
    assert protected and refused.code == aiocoap.FORBIDDEN
    assert rs.temperature.value == b"21.5"

    wider, wider_material = rs.minter.oscore_token(scope="temp:read temp:write")
    _, context = await rs.authz_info(rs.victim, wider, wider_material, id1=b"")
    assert context is not None
    changed, protected = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"19.0")
    assert protected and changed.code == aiocoap.CHANGED and rs.temperature.value == b"19.0"


async def test_token_for_names_the_token_of_the_context(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token()
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    answer, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/whoami")
    assert protected and answer.payload == b"dev-1 coap_oscore"
    plain = rs.victim.request(aiocoap.Message(code=aiocoap.GET, uri=rs.base + "/whoami"))
    assert (await plain.response).payload == b"-"  # unprotected: no token (no bearer here)
    held = rs.resource_server.contexts.contexts()[0].access_token
    assert held.material_id == material[0]
    assert material[2].hex() not in repr(held) and str(material[2]) not in repr(held)


async def test_unprotected_request_gets_401_with_creation_hints(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token()
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    # The same endpoint that holds a context, without OSCORE: no access.
    request = aiocoap.Message(code=aiocoap.GET, uri=rs.base + "/temp")
    response = await rs.victim.request(request).response
    assert response.code == aiocoap.UNAUTHORIZED
    assert response.opt.content_format == CF_ACE
    assert cbor2.loads(response.payload) == {1: ISSUER, 5: AUDIENCE, 9: "temp:read"}


async def test_a_stolen_token_is_useless_from_another_device(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token(scope="temp:read temp:write")
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    assert (await rs.protected(rs.victim, context, aiocoap.GET, "/temp"))[0].code == (
        aiocoap.CONTENT
    )

    # The thief replays the token (it was sent in the clear) with nonces of its own; the RS
    # cannot tell and answers 2.01, but the master secret is in the token, encrypted for the
    # RS: the thief derives with a guess, and every request it sends fails to decrypt.
    guessed = {**material, 2: secrets.token_bytes(16)}
    for _ in range(3):
        response, stolen = await rs.authz_info(rs.thief, token, guessed, id1=b"\x07")
        assert response.code == aiocoap.CREATED and stolen is not None
        answer, protected = await rs.protected(rs.thief, stolen, aiocoap.PUT, "/temp", b"99")
        assert not protected and answer.code in (aiocoap.BAD_REQUEST, aiocoap.UNAUTHORIZED)
    assert rs.temperature.value == b"21.5"

    # The reposts did not push out the victim's context (one unconfirmed context per
    # material: RFC 9203 §6 replaces a context once the new one is in use).
    answer, protected = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"20")
    assert protected and answer.code == aiocoap.CHANGED
    assert len(rs.resource_server.contexts) == 2  # the victim's, and the thief's last


async def test_a_spoofed_datagram_from_the_victims_address_is_refused(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token(scope="temp:read temp:write")
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    assert (await rs.protected(rs.victim, context, aiocoap.GET, "/temp"))[0].code == (
        aiocoap.CONTENT
    )
    victim_port = local_port(rs.victim)

    # A raw socket forges a UDP datagram with the victim's source address and port: an
    # unprotected PUT, as an attacker on the path could. Before the profiles it was applied.
    # The same raw socket sees the RS's answer go to the victim's port: it was refused.
    put = aiocoap.Message(code=aiocoap.PUT, uri=rs.base + "/temp", payload=b"99")
    raw = raw_socket()
    if raw is None:
        pytest.skip("no CAP_NET_RAW for a raw socket here")
    with raw:
        answer = await forged_request(raw, rs.port, victim_port, put)
    assert answer.code == aiocoap.UNAUTHORIZED
    assert cbor2.loads(answer.payload) == {1: ISSUER, 5: AUDIENCE, 9: "temp:write"}
    assert rs.temperature.value == b"21.5"
    reading, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert protected and reading.payload == b"21.5"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({40: b"n" * 8, 43: b"\x01"}, "access_token"),
        ({"token": b"x", 40: b"n" * 8, 43: b"\x01"}, "access_token"),
        ({40: None, 43: b"\x01"}, "nonce1"),
        ({43: b"\x01"}, "nonce1"),
        ({40: b"n" * 7, 43: b"\x01"}, "nonce1"),
        ({40: b"n" * 33, 43: b"\x01"}, "nonce1"),
        ({40: "nnnnnnnn", 43: b"\x01"}, "nonce1"),
        ({40: b"n" * 8}, "ace_client_recipientid"),
        ({40: b"n" * 8, 43: b"\x01" * 8}, "ace_client_recipientid"),
        ({40: b"n" * 8, 43: 1}, "ace_client_recipientid"),
    ],
)
async def test_missing_or_malformed_parameters_get_400(
    rs: ProfileRs, body: dict[object, object], reason: str
) -> None:
    token, _ = rs.minter.oscore_token()
    payload = {1: token, **body} if "access_token" != reason else body
    if 40 in payload and payload[40] is None:
        del payload[40]
    response = await rs.post(rs.victim, "/authz-info", cbor2.dumps(payload), CF_ACE)
    assert response.code == aiocoap.BAD_REQUEST
    assert reason in _detail(response)
    assert token.hex() not in response.payload.hex()
    _stored_nothing(rs)


async def test_bodies_that_are_no_ace_map_get_400(rs: ProfileRs) -> None:
    for payload in (b"\xff\x00", cbor2.dumps([1, 2]), cbor2.dumps({1: b""}), b""):
        response = await rs.post(rs.victim, "/authz-info", payload, CF_ACE)
        assert response.code == aiocoap.BAD_REQUEST, payload
    # A token of another profile in the RFC 9203 map: valid, but not one to derive from.
    holder_token = rs.minter.bearer_token()
    body = cbor2.dumps({1: holder_token, 40: b"n" * 8, 43: b"\x01"})
    response = await rs.post(rs.victim, "/authz-info", body, CF_ACE)
    assert response.code == aiocoap.BAD_REQUEST and "OSCORE profile" in _detail(response)
    # An OSCORE-profile token posted raw (application/cwt): 4.00, it belongs in the map.
    token, _ = rs.minter.oscore_token()
    response = await rs.post(rs.victim, "/authz-info", token, 61)
    assert response.code == aiocoap.BAD_REQUEST
    # Another content format: 4.15.
    response = await rs.post(rs.victim, "/authz-info", token, 50)
    assert response.code == aiocoap.UNSUPPORTED_CONTENT_FORMAT
    _stored_nothing(rs)


async def test_unknown_oscore_input_parameter_gets_400(rs: ProfileRs) -> None:
    """RFC 9203 §4.2: unrecognized parameters in the osc field -> 4.00."""
    material = {0: b"id-7", 2: secrets.token_bytes(16), 99: b"?"}
    token, _ = rs.minter.oscore_token(material=material)
    body = cbor2.dumps({1: token, 40: b"n" * 8, 43: b"\x01"})
    response = await rs.post(rs.victim, "/authz-info", body, CF_ACE)
    assert response.code == aiocoap.BAD_REQUEST and "unknown parameter" in _detail(response)
    _stored_nothing(rs)


async def test_a_reused_nonce1_gets_401(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token()
    nonce1 = secrets.token_bytes(8)
    response, context = await rs.authz_info(rs.victim, token, material, nonce1=nonce1)
    assert response.code == aiocoap.CREATED and context is not None
    # A replay of that request (same token, same N1) derives nothing.
    again, _ = await rs.authz_info(rs.thief, token, material, nonce1=nonce1)
    assert again.code == aiocoap.UNAUTHORIZED and "nonce1" in _detail(again)
    assert len(rs.resource_server.contexts) == 1
    # The same N1 with another token (other material) is fine: memory is per material id.
    other, other_material = rs.minter.oscore_token()
    fresh, _ = await rs.authz_info(rs.victim, other, other_material, nonce1=nonce1)
    assert fresh.code == aiocoap.CREATED


async def test_the_nonce_memory_is_bounded(clock: SettableClock) -> None:
    async with profile_rs(clock, max_nonces=2) as rs:
        token, material = rs.minter.oscore_token()
        nonces = [secrets.token_bytes(8) for _ in range(3)]
        for nonce in nonces:
            response, _ = await rs.authz_info(rs.victim, token, material, nonce1=nonce)
            assert response.code == aiocoap.CREATED
        assert len(rs.resource_server.nonces) == 2
        assert not rs.resource_server.nonces.seen(material[0], nonces[0])


async def test_encrypt0_under_a_wrong_key_gets_401(rs: ProfileRs) -> None:
    wrong, material = rs.minter.oscore_token(key=secrets.token_bytes(16))
    body = cbor2.dumps({1: wrong, 40: b"n" * 8, 43: b"\x01"})
    response = await rs.post(rs.victim, "/authz-info", body, CF_ACE)
    assert response.code == aiocoap.UNAUTHORIZED and "decrypt" in _detail(response)
    # Tampered ciphertext, and an unknown kid.
    good, _ = rs.minter.oscore_token()
    tampered = bytearray(good)
    tampered[-1] ^= 1
    unknown_kid = good.replace(b"aes-1", b"aes-2")
    for token in (bytes(tampered), unknown_kid):
        body = cbor2.dumps({1: token, 40: b"n" * 8, 43: b"\x01"})
        response = await rs.post(rs.victim, "/authz-info", body, CF_ACE)
        assert response.code == aiocoap.UNAUTHORIZED
        assert material[2].hex() not in response.payload.hex()
    _stored_nothing(rs)


async def test_a_token_for_another_audience_gets_403(rs: ProfileRs) -> None:
    token, _ = rs.minter.oscore_token(aud="dashboard")
    body = cbor2.dumps({1: token, 40: b"n" * 8, 43: b"\x01"})
    response = await rs.post(rs.victim, "/authz-info", body, CF_ACE)
    assert response.code == aiocoap.FORBIDDEN and "another audience" in _detail(response)
    _stored_nothing(rs)


async def test_server_recipient_ids_never_collide(rs: ProfileRs) -> None:
    """RFC 9203 §4.2: ID2 differs from ID1 and from every recipient id the RS uses."""
    ids = set()
    for id1 in (b"", b"\x00", b"\x01\x02", b"\x01\x02", b"\xff" * 7):
        token, material = rs.minter.oscore_token(sub=f"dev-{len(ids)}")
        response, context = await rs.authz_info(rs.victim, token, material, id1=id1)
        assert response.code == aiocoap.CREATED and context is not None
        id2 = context.sender_id
        assert id2 != id1 and id2 not in ids
        ids.add(id2)
    assert ids == set(rs.resource_server.contexts._by_id)


async def test_expiry_ends_the_context(rs: ProfileRs, clock: SettableClock) -> None:
    token, material = rs.minter.oscore_token(lifetime=60)
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    clock.advance(59)
    assert (await rs.protected(rs.victim, context, aiocoap.GET, "/temp"))[0].code == (
        aiocoap.CONTENT
    )
    clock.advance(1)
    # RFC 9203 §4.3: an unprotected 4.01 for a context whose token expired; it is gone.
    answer, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED
    assert len(rs.resource_server.contexts) == 0
    answer, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED


async def test_revocation_ends_the_context_on_purge(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token()
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    rs.resource_server.verifier.revocations = RevocationList(frozenset({token_hash(token)}))
    dropped = rs.resource_server.purge()
    assert [(key.startswith("oscore:"), v.claims.sub) for key, v in dropped] == [(True, "dev-1")]
    answer, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED
    # Reposting the revoked token derives nothing.
    response, _ = await rs.authz_info(rs.victim, token, material)
    assert response.code == aiocoap.UNAUTHORIZED and "revoked" in _detail(response)


async def test_key_withdrawal_ends_the_context(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token()
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    rs.resource_server.verifier.set_encryption_keys({})  # the family re-exported without it
    answer, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED
    assert len(rs.resource_server.contexts) == 0


async def test_update_of_access_rights_over_the_context(rs: ProfileRs) -> None:
    token, material = rs.minter.oscore_token(scope="temp:read")
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    # RFC 9203 §4.1: protected POST, ace+cbor map with only access_token; same material id.
    wider, _ = rs.minter.oscore_token(scope="temp:read temp:write", material=material)
    body = cbor2.dumps({1: wider})
    answer, protected = await rs.protected(
        rs.victim, context, aiocoap.POST, "/authz-info", body, content_format=CF_ACE
    )
    assert protected and answer.code == aiocoap.CREATED and answer.payload == b""
    changed, _ = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"18")
    assert changed.code == aiocoap.CHANGED

    # A token of other material cannot be attached to this context: 4.01, nothing changes.
    other, _ = rs.minter.oscore_token(scope="temp:read temp:write admin")
    answer, protected = await rs.protected(
        rs.victim,
        context,
        aiocoap.POST,
        "/authz-info",
        cbor2.dumps({1: other}),
        content_format=CF_ACE,
    )
    assert protected and answer.code == aiocoap.UNAUTHORIZED
    bound = rs.resource_server.contexts.contexts()[0].access_token
    assert bound.claims.scope == "temp:read temp:write"


def test_the_exported_key_set_reads_aes_keys_only_when_usable() -> None:
    aes = secrets.token_bytes(16)
    entries = [
        {1: 4, 2: b"a", 3: 10, -1: aes},
        {1: 4, 2: b"short", 3: 10, -1: aes[:15]},  # not a 128-bit key: skipped
        {1: 4, 2: b"mac", 3: 4, -1: secrets.token_bytes(32)},
    ]
    text = base64.urlsafe_b64encode(cbor2.dumps(entries)).decode().rstrip("=")
    keys = KeySet.from_export(f"  {text}\n")
    assert dict(keys.encryption) == {b"a": aes} and set(keys.shared) == {b"mac"}
    assert keys.encryption_key(b"a") == aes and aes.hex() not in repr(keys)
    for bad in ("not base64 !", base64.urlsafe_b64encode(b"\x01").decode(), "é"):
        with pytest.raises(ValueError) as raised:
            KeySet.from_export(bad)
        assert bad not in str(raised.value)


async def test_the_rs_identity_must_name_its_audience(clock: SettableClock) -> None:
    verifier = TokenVerifier(KeySet(), issuer=ISSUER, audience=AUDIENCE, clock=clock)
    with pytest.raises(ValueError, match="audience"):
        ResourceServer(verifier, identity=DeviceKey.generate("another-rs"))
    server = ResourceServer(verifier, identity=DeviceKey.generate(AUDIENCE))
    assert server.edhoc is not None and not server.allow_bearer


async def test_reposted_tokens_of_a_subject_never_evict_its_context_in_use(
    rs: ProfileRs,
) -> None:
    """An eavesdropper who copied several still-valid tokens of the victim off the air (each
    grant and refresh sends one in the clear) reposts them all: each makes an unused context
    under the victim's subject, and none may push out the context the victim is using
    (outsider round on issue 15, finding F5)."""
    token, material = rs.minter.oscore_token(scope="temp:read temp:write")
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None
    assert (await rs.protected(rs.victim, context, aiocoap.GET, "/temp"))[1]
    copied = [rs.minter.oscore_token() for _ in range(rs.resource_server.contexts.per_peer + 2)]
    for other, other_material in copied:
        guessed = {**other_material, 2: secrets.token_bytes(16)}
        response, _ = await rs.authz_info(rs.thief, other, guessed)
        assert response.code == aiocoap.CREATED
    answer, protected = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"20")
    assert protected and answer.code == aiocoap.CHANGED
    assert len(rs.resource_server.contexts) == 2  # the victim's, and one unused


async def test_closing_the_rs_stops_serving_and_forgets_every_context(rs: ProfileRs) -> None:
    """ResourceServer is an async context manager: its exit (close) shuts down what `serve`
    made and drops every security context and token with it."""
    token, material = rs.minter.oscore_token()
    _, context = await rs.authz_info(rs.victim, token, material)
    assert context is not None and len(rs.resource_server.contexts) == 1
    async with rs.resource_server:
        pass
    assert len(rs.resource_server.contexts) == 0 and not rs.resource_server._tokens
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", rs.port))  # the RS's port is free again
