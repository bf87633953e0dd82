"""RFC 9203 §4.3 derivation against the RFC's own example values, and both sides agreeing."""

from __future__ import annotations

import pytest

from coap_auth.errors import MalformedToken
from coap_auth.secure.ace_oscore import derive_context, master_salt
from coap_auth.secure.credentials import PeerCredential

# RFC 9203 §4.3 (figure "Example of Nonces and OSCORE Input Material"), §4.1, §4.2.
N1 = bytes.fromhex("018a278f7faab55a")
N2 = bytes.fromhex("25a8991cd700ac01")
SALT = bytes.fromhex("f9af838368e353e78888e1426bd94e6f")
MS = bytes.fromhex("f9af838368e353e78888e1426bd94e6f")
ID1, ID2 = bytes.fromhex("1645"), bytes.fromhex("0000")
MATERIAL = {0: b"\x01", 2: MS, 5: SALT}
PEER = PeerCredential("client", None)


def test_master_salt_is_the_rfc_example() -> None:
    expected = bytes.fromhex(
        "50f9af838368e353e78888e1426bd94e6f48018a278f7faab55a4825a8991cd700ac01"
    )
    assert master_salt(MATERIAL, N1, N2) == expected


def test_keys_from_the_rfc_inputs() -> None:
    # RFC 8613 §3.2.1 keys for the inputs above (computed with an HKDF written apart from
    # aiocoap, itself checked against RFC 8613 Appendix C.1.1); the RFC lists no keys.
    client = derive_context(MATERIAL, N1, N2, sender_id=ID2, recipient_id=ID1, peer=PEER)
    assert client.sender_key.hex() == "b27e21a6e8904c69367a7903b60c19ae"
    assert client.recipient_key.hex() == "7ca38f735b2e0866341bfe149795d547"
    assert client.common_iv.hex() == "7c3b80ba46ee86b866da7b6718"


def test_client_and_server_talk() -> None:
    import aiocoap

    client = derive_context(MATERIAL, N1, N2, sender_id=ID2, recipient_id=ID1, peer=PEER)
    server = derive_context(MATERIAL, N1, N2, sender_id=ID1, recipient_id=ID2, peer=PEER)
    request = aiocoap.Message(code=aiocoap.GET, uri="coap://rs.example/temperature")
    protected, _ = client.protect(request)
    protected.mtype, protected.mid = aiocoap.CON, 1
    received = aiocoap.Message.decode(protected.encode())  # as the RS's socket hands it over
    inner, _ = server.unprotect(received)
    assert inner.opt.uri_path == ("temperature",)


@pytest.mark.parametrize(
    "extra", [{4: 11}, {3: -11}, {6: b"ctx"}], ids=["other-aead", "other-hkdf", "context-id"]
)
def test_what_cannot_be_derived_is_refused(extra: dict[int, object]) -> None:
    with pytest.raises(MalformedToken):
        derive_context({**MATERIAL, **extra}, N1, N2, sender_id=ID2, recipient_id=ID1, peer=PEER)


def _rfc8613_derive(secret: bytes, salt: bytes, sender_id: bytes, kind: str, length: int) -> bytes:
    """RFC 8613 §3.2.1 with cryptography's HKDF, written apart from aiocoap's:
    info = [id, id_context (nil), alg_aead (10), type, L]."""
    import cbor2
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = cbor2.dumps([sender_id, None, 10, kind, length])
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def test_the_hardcoded_keys_follow_from_an_independent_hkdf() -> None:
    salt = master_salt(MATERIAL, N1, N2)
    assert _rfc8613_derive(MS, salt, ID2, "Key", 16).hex() == "b27e21a6e8904c69367a7903b60c19ae"
    assert _rfc8613_derive(MS, salt, ID1, "Key", 16).hex() == "7ca38f735b2e0866341bfe149795d547"
    assert _rfc8613_derive(MS, salt, b"", "IV", 13).hex() == "7c3b80ba46ee86b866da7b6718"
