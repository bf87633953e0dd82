"""The EDHOC + OSCORE profile of ACE (draft-ietf-ace-edhoc-oscore-profile-11, provisional code
points) at a real resource server over real UDP: a token whose cnf is the device's key is
usable only by the EDHOC peer proving that key, carried in EAD_3 (label 24, critical) or
POSTed to /authz-info first; access is decided per OSCORE context."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.secure.edhoc import EdhocRefused, establish
from coap_auth.tokens import token_hash
from coap_auth.wire import EAD_ACCESS_TOKEN
from device_client import DeviceKey, RevocationList
from tests.device_client.rs_site import AUDIENCE, CF_ACE, ISSUER, ProfileRs, profile_rs

CF_CWT, CF_PROBLEM = 61, 257


@pytest.fixture
async def rs(clock: SettableClock) -> AsyncIterator[ProfileRs]:
    async with profile_rs(clock) as running:
        yield running


@pytest.fixture
def device() -> DeviceKey:
    return DeviceKey.generate("dev-1")


def _detail(response: aiocoap.Message) -> str:
    assert response.opt.content_format == CF_PROBLEM
    return str(cbor2.loads(response.payload).get(-2, ""))


async def test_token_in_ead_3_then_read_and_403_outside_scope(
    rs: ProfileRs, device: DeviceKey
) -> None:
    token = rs.minter.pop_token(device, scope="temp:read")
    context = await rs.edhoc(rs.victim, device, token)
    reading, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert protected and reading.code == aiocoap.CONTENT
    refused, protected = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"30")
    assert protected and refused.code == aiocoap.FORBIDDEN
    who, _ = await rs.protected(rs.victim, context, aiocoap.GET, "/whoami")
    assert who.payload == b"dev-1 edhoc_oscore"


async def test_upload_then_edhoc(rs: ProfileRs, device: DeviceKey) -> None:
    token = rs.minter.pop_token(device, scope="temp:read temp:write")
    response = await rs.post(rs.victim, "/authz-info", token, CF_CWT)
    assert response.code == aiocoap.CREATED
    # Held, but no use without EDHOC: an unprotected request from the same endpoint is 4.01.
    plain = await rs.victim.request(
        aiocoap.Message(code=aiocoap.PUT, uri=rs.base + "/temp", payload=b"1")
    ).response
    assert plain.code == aiocoap.UNAUTHORIZED and plain.opt.content_format == CF_ACE
    assert cbor2.loads(plain.payload) == {1: ISSUER, 5: AUDIENCE, 9: "temp:write"}

    context = await rs.edhoc(rs.victim, device)
    changed, protected = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"22")
    assert protected and changed.code == aiocoap.CHANGED and rs.temperature.value == b"22"


async def test_a_stolen_token_is_refused_from_another_device(
    rs: ProfileRs, device: DeviceKey
) -> None:
    token = rs.minter.pop_token(device, scope="temp:read temp:write")
    context = await rs.edhoc(rs.victim, device, token)
    thief_key = DeviceKey.generate("thief")
    same_name = DeviceKey("dev-1", thief_key.private_key)  # the victim's id, the thief's key

    # In EAD_3: its cnf is not the key the thief's ID_CRED_I names (EDHOC error 1).
    for thief in (thief_key, same_name):
        with pytest.raises(EdhocRefused, match="EDHOC error 1"):
            await rs.edhoc(rs.thief, thief, token)
    # Uploaded first (accepted: it is a valid token), then EDHOC with another key: refused.
    assert (await rs.post(rs.thief, "/authz-info", token, CF_CWT)).code == aiocoap.CREATED
    for thief in (thief_key, same_name):
        with pytest.raises(EdhocRefused, match="EDHOC error 1"):
            await rs.edhoc(rs.thief, thief)
    # The thief's own endpoint, unprotected: 4.01.
    plain = await rs.thief.request(
        aiocoap.Message(code=aiocoap.PUT, uri=rs.base + "/temp", payload=b"99")
    ).response
    assert plain.code == aiocoap.UNAUTHORIZED
    assert rs.temperature.value == b"21.5"
    # The victim is unaffected; only its context exists.
    assert len(rs.resource_server.contexts) == 1
    changed, _ = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"20")
    assert changed.code == aiocoap.CHANGED


async def test_bad_tokens_in_ead_3_abort_the_handshake(
    rs: ProfileRs, device: DeviceKey, clock: SettableClock
) -> None:
    good = rs.minter.pop_token(device)
    tampered = bytearray(good)
    tampered[-1] ^= 1
    expired = rs.minter.pop_token(device, lifetime=1)
    clock.advance(1)
    cases = {
        "another audience": rs.minter.pop_token(device, aud="dashboard"),
        "tampered": bytes(tampered),
        "expired": expired,
        "not a token": b"\x01\x02\x03",
        "bearer (no cnf)": rs.minter.bearer_token(),
    }
    credential = rs.rs_credential
    for name, token in cases.items():
        with pytest.raises(EdhocRefused, match="EDHOC error 1"):
            await rs.edhoc(rs.victim, device, token)
        assert len(rs.resource_server.contexts) == 0, name
    # Two access tokens, or one not marked critical: refused too.
    for items in (
        [(EAD_ACCESS_TOKEN, True, good), (EAD_ACCESS_TOKEN, True, good)],
        [(EAD_ACCESS_TOKEN, False, good)],
        [(99, True, b"?")],
    ):
        with pytest.raises(EdhocRefused, match="EDHOC error 1"):
            await establish(rs.victim, rs.base, device.edhoc_identity(), credential, ead_3=items)
    # No token at all (none uploaded either): refused.
    with pytest.raises(EdhocRefused, match="EDHOC error 1"):
        await rs.edhoc(rs.victim, device)
    assert len(rs.resource_server.contexts) == 0
    assert (await rs.edhoc(rs.victim, device, good)) is not None


async def test_uploads_that_are_refused(rs: ProfileRs, device: DeviceKey) -> None:
    # A bearer token: refused unless the RS allows them.
    bearer = rs.minter.bearer_token()
    response = await rs.post(rs.victim, "/authz-info", bearer, CF_CWT)
    assert response.code == aiocoap.UNAUTHORIZED and "bearer" in _detail(response)
    # Another audience: 4.03; a broken token: 4.01; neither leaks the token.
    foreign = rs.minter.pop_token(device, aud="dashboard")
    response = await rs.post(rs.victim, "/authz-info", foreign, CF_CWT)
    assert response.code == aiocoap.FORBIDDEN
    assert foreign.hex() not in response.payload.hex()
    response = await rs.post(rs.victim, "/authz-info", foreign[:-3], CF_CWT)
    assert response.code == aiocoap.UNAUTHORIZED
    assert not rs.resource_server._tokens and len(rs.resource_server.contexts) == 0


async def test_pop_token_over_a_context_whose_peer_key_differs_is_refused(
    rs: ProfileRs, device: DeviceKey
) -> None:
    context = await rs.edhoc(rs.victim, device, rs.minter.pop_token(device, scope="temp:read"))
    other = DeviceKey.generate("dev-1")
    # Update of access rights (draft §4.6.1): a raw CWT, protected; its cnf must be the key
    # EDHOC authenticated.
    foreign_key = rs.minter.pop_token(other, scope="temp:read temp:write")
    answer, protected = await rs.protected(
        rs.victim, context, aiocoap.POST, "/authz-info", foreign_key, content_format=CF_CWT
    )
    assert protected and answer.code == aiocoap.UNAUTHORIZED
    refused, _ = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"1")
    assert refused.code == aiocoap.FORBIDDEN

    wider = rs.minter.pop_token(device, scope="temp:read temp:write")
    answer, protected = await rs.protected(
        rs.victim, context, aiocoap.POST, "/authz-info", wider, content_format=CF_CWT
    )
    assert protected and answer.code == aiocoap.CREATED and answer.payload == b""
    changed, _ = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"2")
    assert changed.code == aiocoap.CHANGED


async def test_a_new_handshake_with_the_same_token_replaces_the_old_context(
    rs: ProfileRs, device: DeviceKey
) -> None:
    token = rs.minter.pop_token(device)
    first = await rs.edhoc(rs.victim, device, token)
    second = await rs.edhoc(rs.victim, device, token)
    assert len(rs.resource_server.contexts) == 1
    answer, protected = await rs.protected(rs.victim, first, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED
    answer, protected = await rs.protected(rs.victim, second, aiocoap.GET, "/temp")
    assert protected and answer.code == aiocoap.CONTENT


async def test_expiry_and_revocation_end_the_context(
    rs: ProfileRs, device: DeviceKey, clock: SettableClock
) -> None:
    expiring = await rs.edhoc(rs.victim, device, rs.minter.pop_token(device, lifetime=30))
    clock.advance(30)
    answer, protected = await rs.protected(rs.victim, expiring, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED
    assert len(rs.resource_server.contexts) == 0

    token = rs.minter.pop_token(device)
    assert (await rs.post(rs.victim, "/authz-info", token, CF_CWT)).code == aiocoap.CREATED
    context = await rs.edhoc(rs.victim, device)
    assert (await rs.protected(rs.victim, context, aiocoap.GET, "/temp"))[1]
    rs.resource_server.verifier.revocations = RevocationList(frozenset({token_hash(token)}))
    dropped = rs.resource_server.purge()
    assert sorted(key.split(":")[0] for key, _ in dropped) == ["oscore", "pop"]
    answer, protected = await rs.protected(rs.victim, context, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED
    # Neither EDHOC on the held token (gone) nor the token in EAD_3 (revoked) works again.
    with pytest.raises(EdhocRefused):
        await rs.edhoc(rs.victim, device)
    with pytest.raises(EdhocRefused):
        await rs.edhoc(rs.victim, device, token)


async def test_bearer_tokens_when_allowed_stay_per_endpoint(clock: SettableClock) -> None:
    async with profile_rs(clock, allow_bearer=True) as rs:
        token = rs.minter.bearer_token()
        assert (await rs.post(rs.victim, "/authz-info", token, CF_CWT)).code == aiocoap.CREATED
        get = aiocoap.Message(code=aiocoap.GET, uri=rs.base + "/temp")
        assert (await rs.victim.request(get).response).code == aiocoap.CONTENT
        get = aiocoap.Message(code=aiocoap.GET, uri=rs.base + "/temp")
        assert (await rs.thief.request(get).response).code == aiocoap.UNAUTHORIZED
        # A PoP token is never taken as a bearer token, allow_bearer or not.
        device = DeviceKey.generate("dev-2")
        pop = rs.minter.pop_token(device)
        assert (await rs.post(rs.thief, "/authz-info", pop, CF_CWT)).code == aiocoap.CREATED
        get = aiocoap.Message(code=aiocoap.GET, uri=rs.base + "/temp")
        assert (await rs.thief.request(get).response).code == aiocoap.UNAUTHORIZED


async def test_a_client_cannot_claim_another_clients_name(rs: ProfileRs, device: DeviceKey) -> None:
    """A registered client with its own valid token and key names the victim in EDHOC (by kid
    and in a CCS by value): the id EDHOC authenticates must be its token's sub, or the RS
    would log and expose the victim as the peer and count the context against the victim's
    share (outsider round, finding F1)."""
    victim = await rs.edhoc(rs.victim, device, rs.minter.pop_token(device))
    mallory = DeviceKey.generate("mallory")
    own_token = rs.minter.pop_token(mallory, scope="temp:read")
    posing = DeviceKey("dev-1", mallory.private_key)  # the victim's name, Mallory's own key
    for _ in range(rs.resource_server.contexts.per_peer + 1):
        with pytest.raises(EdhocRefused, match="EDHOC error 1"):
            await rs.edhoc(rs.thief, posing, own_token)
    # Under its own name it works, and the victim's context is still there.
    assert await rs.edhoc(rs.thief, mallory, own_token) is not None
    answer, protected = await rs.protected(rs.victim, victim, aiocoap.GET, "/whoami")
    assert protected and answer.payload == b"dev-1 edhoc_oscore"


async def test_a_newer_token_of_the_same_key_ends_the_older_tokens_context(
    rs: ProfileRs, device: DeviceKey
) -> None:
    """One token per client and PoP key (draft-ietf-ace-edhoc-oscore-profile-11 §12): after a
    refresh, EDHOC under the new token ends the context of the old one."""
    old = await rs.edhoc(rs.victim, device, rs.minter.pop_token(device))
    new = await rs.edhoc(rs.victim, device, rs.minter.pop_token(device))
    assert len(rs.resource_server.contexts) == 1
    answer, protected = await rs.protected(rs.victim, old, aiocoap.GET, "/temp")
    assert not protected and answer.code == aiocoap.UNAUTHORIZED
    answer, protected = await rs.protected(rs.victim, new, aiocoap.GET, "/temp")
    assert protected and answer.code == aiocoap.CONTENT


async def test_an_older_token_posted_again_is_not_the_one_edhoc_binds(
    rs: ProfileRs, device: DeviceKey, clock: SettableClock
) -> None:
    """Outsider round 2: a copied older token of the device (narrower scope), uploaded after
    the device's newer one, must not be bound to the device's next handshake."""
    older = rs.minter.pop_token(device, scope="temp:read")
    clock.advance(10)
    newer = rs.minter.pop_token(device, scope="temp:read temp:write")
    assert (await rs.post(rs.victim, "/authz-info", newer, CF_CWT)).code == aiocoap.CREATED
    assert (await rs.post(rs.thief, "/authz-info", older, CF_CWT)).code == aiocoap.CREATED
    context = await rs.edhoc(rs.victim, device)
    changed, protected = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"23")
    assert protected and changed.code == aiocoap.CHANGED


async def test_an_update_from_another_client_with_the_same_key_is_refused(
    rs: ProfileRs, device: DeviceKey
) -> None:
    """Outsider round 2: two client ids holding one key (registered twice, or a req_cnf naming
    another's key): a token of the one, posted over the other's context, is refused."""
    context = await rs.edhoc(rs.victim, device, rs.minter.pop_token(device, scope="temp:read"))
    twin = DeviceKey("dev-twin", device.private_key)
    wider = rs.minter.pop_token(twin, scope="temp:read temp:write")
    answer, protected = await rs.protected(
        rs.victim, context, aiocoap.POST, "/authz-info", wider, content_format=CF_CWT
    )
    assert protected and answer.code == aiocoap.UNAUTHORIZED
    refused, _ = await rs.protected(rs.victim, context, aiocoap.PUT, "/temp", b"1")
    assert refused.code == aiocoap.FORBIDDEN
