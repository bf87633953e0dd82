"""Issue 15, the AS side: what /token issues for each audience profile, over real UDP to the
real server with OSCORE required on /token (the default).

coap_oscore (RFC 9203 §3.2): ace_profile 2, cnf {4: material} with fresh material per token,
an encrypted CWT that an independent COSE library (pycose) decrypts under the key `coap-auth
keys export` prints, and whose cnf is the response's; no JWT, no req_cnf; /introspect and
/revoke take it. edhoc_oscore (draft-ietf-ace-edhoc-oscore-profile-11): ace_profile 4, cnf the
client's key (req_cnf, else the registered one), rs_cnf the RS's registered key. Bearer
audiences as before. Audiences are registered by the CLI, as an operator does.

Integers on the wire are written out (RFC numbers), not taken from coap_auth.wire.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import CoseKey
from pycose.messages import Enc0Message

from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.secure.provisioned import provision
from coap_auth.service import AuthService, IssuedToken
from coap_auth.store import Client
from coap_auth.tokens import Claims, compress_cose_key, cose_key_from_public
from coap_auth.udp import create_client_context
from coap_auth.wire import TokenType
from tests.conftest import SEEN_SECRETS
from tests.processes import cli_ok, run_cli
from tests.secure.conftest import Device, Protected
from tests.secure.test_provisioned import device_side

# RFC 9200 / 9201 / 9203 / RFC 8392 numbers
ACCESS_TOKEN, EXPIRES_IN, REQ_CNF, AUDIENCE, CNF, SCOPE = 1, 2, 4, 5, 8, 9
ACTIVE, TOKEN, ERROR, ERROR_DESCRIPTION, GRANT_TYPE, TOKEN_TYPE = 10, 11, 30, 31, 33, 34
REFRESH_TOKEN, ACE_PROFILE, RS_CNF = 37, 38, 41
REFRESH_GRANT = 3
CLIENT_ID, CLIENT_SECRET = 24, 25
INVALID_REQUEST, INVALID_GRANT = 1, 3
POP = 2
COAP_OSCORE, COAP_EDHOC_OSCORE = 2, 4  # the latter provisional (draft -11 example value)
COSE_KEY, OSC = 1, 4  # cnf methods
OSC_ID, OSC_MS, OSC_SALT = 0, 2, 5
TAG_CWT, TAG_ENCRYPT0 = 61, 16
CLAIM_SUB, CLAIM_AUD, CLAIM_CNF = 2, 3, 8
CF_ACE_TRL_CBOR = 262
FULL_SET = 0

LIFETIME = 600
SCOPE_TEXT = "open"
AUDIENCES = ("lock", "door", "gate", "plain")


@dataclasses.dataclass(frozen=True)
class Template:
    data_dir: Path
    lock_keys: list[dict[int, Any]]  # what `keys export lock` printed, decoded
    door_key: dict[int, Any]  # the door RS's registered key, as a COSE_Key
    door_private: ec.EllipticCurvePrivateKey
    lock_private: ec.EllipticCurvePrivateKey  # the lock RS's, for /introspect


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """Built once by the CLI: lock (coap_oscore), door (edhoc_oscore, the default, with its
    RS key), gate (edhoc_oscore, no RS key), plain (bearer); lock's exported key set."""
    root = tmp_path_factory.mktemp("profiles")
    data_dir = root / "data"
    door_private, lock_private = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    door_pem, lock_pem = (
        _pem(root / "door.pem", door_private),
        _pem(root / "lock.pem", lock_private),
    )
    cli_ok("init", data_dir=data_dir)
    lifetime = ("--lifetime", str(LIFETIME))
    out = cli_ok(
        "audiences",
        "add",
        "lock",
        "--profile",
        "coap_oscore",
        "--introspect-public-key",
        lock_pem,
        *lifetime,
        data_dir=data_dir,
    )
    assert "audience lock added (coap_oscore, cwt, 600 s tokens)" in out
    assert "key family lock (AES-CCM-16-64-128)" in out
    cli_ok(
        "audiences",
        "add",
        "door",
        "--introspect-public-key",
        door_pem,
        *lifetime,
        data_dir=data_dir,
    )
    cli_ok("audiences", "add", "gate", "--profile", "edhoc_oscore", *lifetime, data_dir=data_dir)
    cli_ok("audiences", "add", "plain", "--profile", "bearer", *lifetime, data_dir=data_dir)
    exported = cli_ok("keys", "export", "lock", data_dir=data_dir).strip()
    lock_keys = cbor2.loads(base64.urlsafe_b64decode(exported + "=" * (-len(exported) % 4)))
    for key in lock_keys:
        SEEN_SECRETS.add(key[-1])
    door_key = cose_key_from_public(door_private.public_key())
    return Template(data_dir, lock_keys, door_key, door_private, lock_private)


def _pem(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
def settings(settings: Settings, template: Template) -> Settings:
    """A private copy of the template; OSCORE required on /token (the default)."""
    shutil.copytree(template.data_dir, settings.data_dir, dirs_exist_ok=True)
    return dataclasses.replace(settings, require_oscore=True)


@pytest.fixture
async def world(service: AuthService) -> AsyncIterator[Protected]:
    server = Server(service, "127.0.0.1", 0)
    await server.start()
    protected = Protected(server, service, f"coap://127.0.0.1:{server.port}", [])
    try:
        yield protected
    finally:
        for device in protected.devices:
            await device.context.shutdown()
        await server.stop()


async def _device(world: Protected, client_id: str = "sensor-1") -> Device:
    device = await world.device(client_id, audiences=AUDIENCES, scope=SCOPE_TEXT)
    await device.handshake()
    return device


async def _token(device: Device, audience: str, **extra: Any) -> tuple[aiocoap.Message, Any]:
    body = {AUDIENCE: audience, **{_PARAMS[k]: v for k, v in extra.items()}}
    response, answer = await device.post_ace("/token", body)
    _remember_material(answer)
    return response, answer


_PARAMS = {"req_cnf": REQ_CNF, "token_format": "token_format", "scope": SCOPE}


def _remember_material(answer: Any) -> None:
    """The master secret is a secret: the session's log scan looks for it too."""
    if isinstance(answer, dict) and isinstance(answer.get(CNF), dict):
        material = answer[CNF].get(OSC)
        if isinstance(material, dict):
            SEEN_SECRETS.add(material[OSC_MS])


def _decrypt(token: bytes, key_set: list[dict[int, Any]]) -> dict[int, Any]:
    """The claims of an encrypted CWT, decrypted by pycose under the exported key its kid
    names."""
    outer = cbor2.loads(token)
    assert isinstance(outer, cbor2.CBORTag) and outer.tag == TAG_CWT
    assert isinstance(outer.value, cbor2.CBORTag) and outer.value.tag == TAG_ENCRYPT0
    protected = cbor2.loads(outer.value.value[0])
    assert protected[1] == 10 and len(protected[5]) == 13  # AES-CCM-16-64-128, its nonce
    message = Enc0Message.decode(cbor2.dumps(outer.value))
    (key,) = [k for k in key_set if k[2] == protected[4]]
    assert (key[1], key[3], len(key[-1])) == (4, 10, 16)  # symmetric, alg 10, 128 bits

    message.key = CoseKey.from_dict(key)
    claims = cbor2.loads(message.decrypt())
    assert isinstance(claims, dict)
    return claims


def _assert_refused(response: aiocoap.Message, answer: Any, words: str) -> None:
    assert response.code == aiocoap.BAD_REQUEST, (response, answer)
    assert answer[ERROR] == INVALID_REQUEST
    assert words in answer[ERROR_DESCRIPTION]


# -- coap_oscore -------------------------------------------------------------------------------


async def test_coap_oscore_token_carries_material_the_rs_can_decrypt(
    world: Protected, template: Template
) -> None:
    device = await _device(world)
    response, answer = await _token(device, "lock")

    assert response.code == aiocoap.CREATED
    assert answer[ACE_PROFILE] == COAP_OSCORE
    assert answer[TOKEN_TYPE] == POP
    assert answer[EXPIRES_IN] == LIFETIME
    assert RS_CNF not in answer
    material = answer[CNF][OSC]
    assert set(answer[CNF]) == {OSC}
    assert sorted(material) == [OSC_ID, OSC_MS, OSC_SALT]
    assert [len(material[label]) for label in (OSC_ID, OSC_MS, OSC_SALT)] == [8, 16, 8]
    # Decrypted by pycose under the key `keys export lock` printed: the same material.
    claims = _decrypt(answer[ACCESS_TOKEN], template.lock_keys)
    assert claims[CLAIM_CNF] == {OSC: material}
    assert (claims[CLAIM_SUB], claims[CLAIM_AUD]) == ("sensor-1", "lock")
    # The master secret is nowhere in the token's bytes.
    assert material[OSC_MS] not in answer[ACCESS_TOKEN]


async def test_coap_oscore_material_is_fresh_per_grant_and_per_refresh(
    world: Protected, template: Template
) -> None:
    device = await _device(world)
    _, first = await _token(device, "lock")
    _, second = await _token(device, "lock")
    _, refreshed = await device.post_ace(
        "/token", {GRANT_TYPE: REFRESH_GRANT, REFRESH_TOKEN: first[REFRESH_TOKEN]}
    )
    _remember_material(refreshed)

    assert refreshed[ACE_PROFILE] == COAP_OSCORE and refreshed[TOKEN_TYPE] == POP
    materials = [a[CNF][OSC] for a in (first, second, refreshed)]
    for label in (OSC_ID, OSC_MS, OSC_SALT):
        assert len({m[label] for m in materials}) == 3, label
    assert _decrypt(refreshed[ACCESS_TOKEN], template.lock_keys)[CLAIM_CNF] == {OSC: materials[2]}
    # A refresh that sends req_cnf is refused, as a grant is.
    key = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    response, answer = await device.post_ace(
        "/token",
        {GRANT_TYPE: REFRESH_GRANT, REFRESH_TOKEN: refreshed[REFRESH_TOKEN], REQ_CNF: {1: key}},
    )
    _assert_refused(response, answer, "takes no req_cnf")


async def test_coap_oscore_refuses_jwt_and_req_cnf(world: Protected) -> None:
    device = await _device(world)
    response, answer = await _token(device, "lock", token_format="jwt")
    _assert_refused(response, answer, "not JWTs")
    key = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    response, answer = await _token(device, "lock", req_cnf={COSE_KEY: key})
    _assert_refused(response, answer, "audience lock takes no req_cnf")


async def test_coap_oscore_token_is_introspected_and_revoked(
    world: Protected, template: Template
) -> None:
    device = await _device(world)
    _, answer = await _token(device, "lock")
    token = answer[ACCESS_TOKEN]
    # The lock introspects over EDHOC with the key it was registered with.
    rs = await world._device("lock", template.lock_private)
    await rs.handshake()
    response, introspected = await rs.post_ace("/introspect", {TOKEN: token})
    assert response.code == aiocoap.CREATED, introspected
    assert introspected[ACTIVE] is True
    assert (introspected[CLAIM_SUB], introspected[CLAIM_AUD]) == ("sensor-1", "lock")
    # Another RS (its own key family) cannot read it.
    door = await world._device("door", template.door_private)
    await door.handshake()
    _, other = await door.post_ace("/introspect", {TOKEN: token})
    assert other == {ACTIVE: False}

    response, _ = await device.post_ace("/revoke", {TOKEN: token})
    assert response.code == aiocoap.CHANGED
    _, introspected = await rs.post_ace("/introspect", {TOKEN: token})
    assert introspected == {ACTIVE: False}
    # On the lock's TRL, hashed over the token's bytes (docs/protocol.md, RFC 9770 §4); not on
    # the door's.
    hashed = b"\x01" + hashlib.sha256(base64.urlsafe_b64encode(token).rstrip(b"=")).digest()
    assert hashed in await _trl(rs)
    assert hashed not in await _trl(door)


async def _trl(device: Device) -> list[bytes]:
    response = await device.request(aiocoap.GET, "/revoke/trl")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == CF_ACE_TRL_CBOR
    full_set = cbor2.loads(response.payload)[FULL_SET]
    assert isinstance(full_set, list)
    return full_set


# -- edhoc_oscore ------------------------------------------------------------------------------


def _compressed(public_key: ec.EllipticCurvePublicKey) -> dict[int, Any]:
    """The COSE_Key of RFC 9053 §7.1.1's compressed point, built independently: x and the
    sign bit (true for an odd y) from the X9.62 compressed form (0x02 even, 0x03 odd)."""
    x962 = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    return {1: 2, -1: 1, -2: x962[1:], -3: x962[0] == 0x03}


async def test_edhoc_oscore_binds_the_registered_key_and_names_the_rs_key(
    world: Protected, template: Template
) -> None:
    device = await _device(world)
    public_key = device.identity.private_key.public_key()
    # The token and the response carry the key's point compressed (33 bytes less: the
    # token fits EAD_3 of EDHOC message_3); the RS's key in rs_cnf stays as registered.
    registered = _compressed(public_key)
    response, answer = await _token(device, "door")

    assert response.code == aiocoap.CREATED
    assert answer[ACE_PROFILE] == COAP_EDHOC_OSCORE
    assert answer[TOKEN_TYPE] == POP
    assert answer[CNF] == {COSE_KEY: registered}
    assert answer[RS_CNF] == {COSE_KEY: template.door_key}
    claims = _signed_claims(answer[ACCESS_TOKEN])
    assert claims[CLAIM_CNF] == {COSE_KEY: registered}
    # Without an RS key registered, no rs_cnf; a refresh stays bound to the same key.
    _, gate = await _token(device, "gate")
    assert gate[ACE_PROFILE] == COAP_EDHOC_OSCORE and RS_CNF not in gate
    assert gate[CNF] == {COSE_KEY: registered}
    _, refreshed = await device.post_ace(
        "/token", {GRANT_TYPE: REFRESH_GRANT, REFRESH_TOKEN: answer[REFRESH_TOKEN]}
    )
    assert refreshed[CNF] == {COSE_KEY: registered}
    assert refreshed[RS_CNF] == {COSE_KEY: template.door_key}
    assert _signed_claims(refreshed[ACCESS_TOKEN])[CLAIM_CNF] == {COSE_KEY: registered}
    # A refresh naming the key (req_cnf) in either form is the same key: accepted.
    full = cose_key_from_public(public_key)
    token = refreshed
    for named in (full, registered):
        response, token = await device.post_ace(
            "/token",
            {GRANT_TYPE: REFRESH_GRANT, REFRESH_TOKEN: token[REFRESH_TOKEN], REQ_CNF: {1: named}},
        )
        assert response.code == aiocoap.CREATED, token
        assert token[CNF] == {COSE_KEY: registered}


async def test_edhoc_oscore_binds_req_cnf_when_given(world: Protected) -> None:
    device = await _device(world)
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    other = cose_key_from_public(public_key)
    response, answer = await _token(device, "door", req_cnf={COSE_KEY: other})
    assert response.code == aiocoap.CREATED
    assert answer[CNF] == {COSE_KEY: _compressed(public_key)}
    assert _signed_claims(answer[ACCESS_TOKEN])[CLAIM_CNF] == {COSE_KEY: _compressed(public_key)}
    # A refresh with the req_cnf of the grant, as sent (uncompressed), keeps that key.
    response, refreshed = await device.post_ace(
        "/token",
        {GRANT_TYPE: REFRESH_GRANT, REFRESH_TOKEN: answer[REFRESH_TOKEN], REQ_CNF: {1: other}},
    )
    assert response.code == aiocoap.CREATED, refreshed
    assert refreshed[CNF] == {COSE_KEY: _compressed(public_key)}
    claims = _signed_claims(refreshed[ACCESS_TOKEN])
    assert claims[CLAIM_CNF] == {COSE_KEY: _compressed(public_key)}
    # Another key is refused (RFC 9200 §5.8.1: a refresh never changes the key).
    third = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    response, refused = await device.post_ace(
        "/token",
        {GRANT_TYPE: REFRESH_GRANT, REFRESH_TOKEN: refreshed[REFRESH_TOKEN], REQ_CNF: {1: third}},
    )
    assert response.code == aiocoap.BAD_REQUEST
    assert refused[ERROR] == INVALID_GRANT


async def test_edhoc_oscore_jwt_keeps_the_full_key(world: Protected) -> None:
    """A JWT's cnf is a JWK (RFC 7800), which has no compressed form: the response echoes
    the full COSE_Key."""
    device = await _device(world)
    public_key = device.identity.private_key.public_key()
    response, answer = await _token(device, "door", token_format="jwt")
    assert response.code == aiocoap.CREATED, answer
    assert answer[CNF] == {COSE_KEY: cose_key_from_public(public_key)}
    token = answer[ACCESS_TOKEN]
    text = token if isinstance(token, str) else token.decode("ascii")
    jwk = json.loads(_b64(text.split(".")[1]))["cnf"]["jwk"]
    numbers = public_key.public_numbers()
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    assert _b64(jwk["x"]) == numbers.x.to_bytes(32, "big")
    assert _b64(jwk["y"]) == numbers.y.to_bytes(32, "big")


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_edhoc_oscore_refuses_a_client_without_a_key(world: Protected) -> None:
    """A secret client (here over an operator-provisioned OSCORE context) has no key to
    bind the token to unless it sends req_cnf."""
    service = world.service
    await service.store.add_client(
        Client(
            "legacy",
            AUDIENCES,
            (SCOPE_TEXT,),
            service.clock.now(),
            secret_digest=service.secret_digest("unused-secret-0123456789"),
        ),
        "operator",
    )
    oscore = device_side(provision(service.settings.data_dir, "legacy"))
    world.server.reload_provisioned()
    context = await create_client_context()
    try:
        context.client_credentials[f"{world.base}/*"] = oscore
        device = Device(None, context, world.base, world.server)  # type: ignore[arg-type]
        # A request padded with an ignored parameter (RFC 6749 §3.2): the description is
        # left out of answers more than 3 times a request's size (amplification bound).
        response, answer = await device.post_ace("/token", {AUDIENCE: "door", "pad": "x" * 64})
        assert response.code == aiocoap.BAD_REQUEST
        assert answer[ERROR] == INVALID_REQUEST
        assert answer[ERROR_DESCRIPTION] == (
            "audience door needs a proof-of-possession key: send req_cnf or register the"
            " client's public key"
        )
        key = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
        response, answer = await _token(device, "door", req_cnf={COSE_KEY: key})
        assert response.code == aiocoap.CREATED
        assert answer[CNF] == {COSE_KEY: compress_cose_key(key)}
        # Bearer audiences still serve it, without a key.
        response, answer = await _token(device, "plain")
        assert response.code == aiocoap.CREATED
        assert ACE_PROFILE not in answer and CNF not in answer and answer[TOKEN_TYPE] == 1
    finally:
        await context.shutdown()


# -- bearer ------------------------------------------------------------------------------------


async def test_bearer_audience_is_unchanged(world: Protected) -> None:
    device = await _device(world)
    response, answer = await _token(device, "plain")
    assert response.code == aiocoap.CREATED
    assert ACE_PROFILE not in answer and CNF not in answer and RS_CNF not in answer
    assert answer[TOKEN_TYPE] == 1  # Bearer
    assert CLAIM_CNF not in _signed_claims(answer[ACCESS_TOKEN])
    key = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    _, pop = await _token(device, "plain", req_cnf={COSE_KEY: key})
    assert ACE_PROFILE not in pop and pop[CNF] == {COSE_KEY: key} and pop[TOKEN_TYPE] == POP


def _signed_claims(token: bytes) -> dict[int, Any]:
    """The claims of a signed CWT (its signature is the tokens tests' business)."""
    outer = cbor2.loads(token)
    assert outer.tag == TAG_CWT and outer.value.tag == 18  # COSE_Sign1
    claims = cbor2.loads(outer.value.value[2])
    assert isinstance(claims, dict)
    return claims


# -- the CLI -----------------------------------------------------------------------------------


def test_audiences_add_defaults_to_edhoc_oscore_and_list_shows_profiles(
    template: Template, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(template.data_dir, data_dir)
    rows = json.loads(cli_ok("audiences", "list", "--json", data_dir=data_dir))
    assert {r["audience_id"]: r["profile"] for r in rows} == {
        "door": "edhoc_oscore",
        "gate": "edhoc_oscore",
        "lock": "coap_oscore",
        "plain": "bearer",
    }
    assert "coap_oscore" in cli_ok("audiences", "list", data_dir=data_dir)
    lock = next(r for r in rows if r["audience_id"] == "lock")
    assert (lock["key_family"], lock["key_alg"]) == ("lock", "AES-CCM-16-64-128")
    # The family's keys are listed, never published at /keys, and rotate by hand.
    keys = json.loads(cli_ok("keys", "list", "--family", "lock", "--json", data_dir=data_dir))
    assert {k["alg"] for k in keys} == {"AES_CCM_16_64_128"}
    exported = {k[2].hex() for k in template.lock_keys}
    assert exported == {k["kid"] for k in keys if k["state"] in ("active", "next")}
    # The audit records each audience's profile.
    tail = json.loads(cli_ok("audit", "tail", "-n", "20", "--json", data_dir=data_dir))
    added = {e["subject"]: e["details"]["profile"] for e in tail if e["event"] == "audience.added"}
    assert added == {
        "lock": "coap_oscore",
        "door": "edhoc_oscore",
        "gate": "edhoc_oscore",
        "plain": "bearer",
    }
    assert "registry intact" in cli_ok("audit", "verify", data_dir=data_dir)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (("--profile", "coap_oscore", "--token-format", "jwt"), "not JWTs"),
        (("--profile", "coap_oscore", "--own-keys", "--key-alg", "ES256"), "AES-CCM-16-64-128"),
        (("--own-keys", "--key-alg", "AES-CCM-16-64-128"), "coap_oscore"),
        (("--profile", "oauth"), "invalid choice"),
    ],
)
def test_audiences_add_refuses_what_a_profile_cannot_take(
    template: Template, tmp_path: Path, options: tuple[str, ...], words: str
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(template.data_dir, data_dir)
    refused = run_cli("audiences", "add", "x", *options, data_dir=data_dir)
    assert refused.returncode == 2 and words in refused.stderr
    assert "x" not in {
        r["audience_id"]
        for r in json.loads(cli_ok("audiences", "list", "--json", data_dir=data_dir))
    }


def test_the_master_secret_is_never_in_a_repr() -> None:
    material = {OSC_ID: b"\x01" * 8, OSC_MS: bytes(range(16)), OSC_SALT: b"\x02" * 8}
    claims = Claims("coap://as.test", "sensor-1", "lock", 2, 1, b"c" * 8, cnf_osc=material)
    issued = IssuedToken(b"t" * 32, 600, TokenType.POP, claims, cnf={OSC: material})
    for shown in (repr(issued), repr(claims), str(issued)):
        assert bytes(range(16)).hex() not in shown and repr(bytes(range(16))) not in shown


async def test_coap_oscore_material_never_travels_unprotected(world: Protected) -> None:
    """With `require_oscore` off (a lab), /token answers plain CoAP: a coap_oscore grant is
    refused there all the same, since its answer carries the master secret (review finding:
    anyone on the path could otherwise set the token's context up)."""
    service = world.service
    service.settings = dataclasses.replace(service.settings, require_oscore=False)
    secret = "lab-secret-0123456789abcdef"
    await service.store.add_client(
        Client(
            "lab",
            AUDIENCES,
            (SCOPE_TEXT,),
            service.clock.now(),
            secret_digest=service.secret_digest(secret),
        ),
        "operator",
    )
    context = await create_client_context()
    try:
        device = Device(None, context, world.base, world.server)  # type: ignore[arg-type]
        body = {CLIENT_ID: "lab", CLIENT_SECRET: secret, AUDIENCE: "lock"}
        response, answer = await device.post_ace("/token", {**body, "pad": "x" * 64})
        _assert_refused(response, answer, "issued only over OSCORE")
        assert CNF not in answer
        # The same plain request for a bearer audience is served: only the secret is held back.
        response, answer = await device.post_ace("/token", {**body, AUDIENCE: "plain"})
        assert response.code == aiocoap.CREATED and CNF not in answer
    finally:
        await context.shutdown()
