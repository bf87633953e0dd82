"""TokenClient and ResourceClient with the real AS: audiences registered by the CLI with their
profiles (`lock` coap_oscore, `door` edhoc_oscore, the default, with its RS key), /token over
OSCORE (the default). TokenClient keeps what the AS answered; ResourceClient sets up both
profiles' contexts with the RS double of test_resource_client, which here learns the token as
a real RS does: it decrypts the coap_oscore token under the key `keys export lock` printed,
and verifies the edhoc_oscore token against the AS's /keys. (The real RS, device_client/rs.py,
is being written at the same time; the end-to-end tests with it come with it.)
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.config import Settings
from coap_auth.errors import CoapAuthError
from coap_auth.tokens import compress_cose_key, cose_key_from_public, verify_cwt
from coap_auth.tokens.cwt import decrypt_cwt
from coap_auth.wire import AceProfile, ContentFormat, TokenType
from device_client import (
    DeviceKey,
    KeySet,
    ResourceClient,
    TokenClient,
    create_client_context,
)
from device_client.resource_client import MAX_EAD_TOKEN_BYTES
from tests.conftest import SEEN_SECRETS, Coap
from tests.device_client.conftest import FAST_REFRESH, ISSUER, fetch_key_set
from tests.device_client.test_resource_client import Issued, World, serving_rs_double
from tests.processes import cli_ok


@dataclasses.dataclass(frozen=True)
class Template:
    data_dir: Path
    door: DeviceKey  # the door RS's key: its audience's registered key, its EDHOC identity
    lock_keys: dict[bytes, bytes]  # kid -> AES key, from `keys export lock`


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    root = tmp_path_factory.mktemp("rc-profiles")
    data_dir = root / "data"
    door = DeviceKey.generate("door")
    pem = root / "door.pem"
    pem.write_bytes(door.public_pem())
    cli_ok("init", data_dir=data_dir)
    cli_ok("audiences", "add", "lock", "--profile", "coap_oscore", data_dir=data_dir)
    cli_ok("audiences", "add", "door", "--introspect-public-key", pem, data_dir=data_dir)
    exported = cli_ok("keys", "export", "lock", data_dir=data_dir).strip()
    key_set = cbor2.loads(base64.urlsafe_b64decode(exported + "=" * (-len(exported) % 4)))
    lock_keys = {key[2]: key[-1] for key in key_set}
    SEEN_SECRETS.update(lock_keys.values())
    return Template(data_dir, door, lock_keys)


@pytest.fixture
def settings(settings: Settings, template: Template) -> Settings:
    """A private copy of the template; OSCORE required on /token (the default)."""
    shutil.copytree(template.data_dir, settings.data_dir, dirs_exist_ok=True)
    return dataclasses.replace(settings, require_oscore=True)


@dataclasses.dataclass
class RealAs(World):
    """The RS double's world with the real AS behind /token."""

    coap: Coap | None = None
    lock_keys: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    key_set: KeySet = dataclasses.field(default_factory=KeySet)
    device: DeviceKey = dataclasses.field(default_factory=lambda: DeviceKey.generate("meter-7"))

    def lookup(self, token: bytes) -> Issued | None:
        try:
            claims = decrypt_cwt(token, self.lock_keys.get)
        except CoapAuthError:
            try:
                claims = verify_cwt(token, self.key_set.lookup)
            except CoapAuthError:
                return None
        if claims.cnf_osc is not None:
            material = dict(claims.cnf_osc)
            return Issued(AceProfile.COAP_OSCORE, claims.sub, claims.exp, material=material)
        assert claims.cnf_key is not None
        cnf_key = dict(claims.cnf_key)
        return Issued(AceProfile.COAP_EDHOC_OSCORE, claims.sub, claims.exp, cnf_key=cnf_key)

    async def real_tokens(self, audience: str) -> TokenClient:
        assert self.coap is not None
        context = await create_client_context()
        self.contexts.append(context)
        return TokenClient(
            context,
            self.as_base,
            self.device,
            audience=audience,
            issuer=ISSUER,
            clock=self.clock,
            policy=FAST_REFRESH,
            as_credential=self.coap.service.edhoc_identity.credential,
            on_token=lambda _, token: SEEN_SECRETS.add(token.value),
        )


@pytest.fixture
async def real(coap: Coap, template: Template, clock: SettableClock) -> AsyncIterator[RealAs]:
    world = RealAs(clock, template.door, coap=coap, lock_keys=template.lock_keys)
    world.key_set = await fetch_key_set(coap)
    await coap.add_key_client(
        "meter-7",
        ("lock", "door"),
        "open",
        cose_key_from_public(world.device.private_key.public_key()),
    )
    world.as_base = coap.base
    async with serving_rs_double(world):
        yield world


async def test_coap_oscore_with_the_real_as(real: RealAs) -> None:
    tokens = await real.real_tokens("lock")
    token = await tokens.token()
    assert token.profile == AceProfile.COAP_OSCORE and token.token_type == TokenType.POP
    assert token.cnf_osc is not None and token.cnf_key is None and token.rs_cnf is None
    SEEN_SECRETS.add(token.cnf_osc[2])
    issued = real.lookup(token.value)  # what the RS reads in the encrypted token
    assert issued is not None and issued.material == token.cnf_osc
    assert repr(token).count(token.cnf_osc[2].hex()) == 0

    assert real.rs is not None
    async with ResourceClient(tokens.context, real.rs_base, tokens, timeout=2.0) as client:
        answer = await client.request(aiocoap.GET, "temperature")
        assert answer.code == aiocoap.CONTENT
    [(ct, protected, body)] = real.rs.authz_info
    assert (ct, protected) == (ContentFormat.ACE_CBOR, False) and body[1] == token.value
    assert real.rs.served == [("GET", token.value)]


async def test_edhoc_oscore_with_the_real_as(real: RealAs, template: Template) -> None:
    tokens = await real.real_tokens("door")
    token = await tokens.token()
    assert token.profile == AceProfile.COAP_EDHOC_OSCORE and token.cnf_osc is None
    # The registered key (no req_cnf was sent), its point compressed (RFC 9053 §7.1.1).
    device_key = compress_cose_key(cose_key_from_public(real.device.private_key.public_key()))
    assert token.cnf_key == device_key and isinstance(device_key[-3], bool)
    assert token.rs_cnf == cose_key_from_public(template.door.private_key.public_key())
    # So the token fits EAD_3 of message_3 (ES256 CWT of this AS: about 190 bytes).
    assert len(token.value) <= MAX_EAD_TOKEN_BYTES

    assert real.rs is not None
    async with ResourceClient(tokens.context, real.rs_base, tokens, timeout=2.0) as client:
        assert (await client.request(aiocoap.GET, "temperature")).code == aiocoap.CONTENT
        assert client.handshakes == 1
    assert real.rs.ead_tokens == [token.value] and real.rs.authz_info == []
    assert real.rs.served == [("GET", token.value)]
