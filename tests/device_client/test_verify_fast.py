"""TokenVerifier's shortcuts (issue 17) against what they replace, offline: the scope check
without sets, the routing by the token's first bytes, and VerifiedToken built without its
frozen __init__."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from coap_auth.tokens import Claims, VerificationKey, encode_cwt, encode_jwt, token_hash
from coap_auth.wire import CoseAlg
from device_client import InsufficientScope, KeySet, TokenVerifier, VerifiedToken
from device_client.verify import _verified, scope_set

NOW = 1_700_000_000
KID = b"k1"
SIGNING_KEY = ed25519.Ed25519PrivateKey.generate()
KEY = VerificationKey(KID, CoseAlg.EDDSA, SIGNING_KEY.public_key())


class FixedClock:
    def now(self) -> int:
        return NOW


def _verifier() -> TokenVerifier:
    return TokenVerifier(KeySet((KEY,)), issuer="as", audience="rs", clock=FixedClock())


def _token(scope: str | None, *, jwt: bool = False) -> bytes:
    claims = Claims("as", "dev", "rs", NOW + 60, NOW, b"cti", scope=scope)
    return (encode_jwt if jwt else encode_cwt)(claims, SIGNING_KEY, CoseAlg.EDDSA, KID)


words = st.sampled_from(["a", "b", "c:d", "é"])
spaces = st.sampled_from([" ", "  ", "\t", "\n", ""])
scope_texts = st.lists(st.tuples(words, spaces), max_size=3).map(
    lambda parts: "".join(w + s for w, s in parts)
)
requests = st.one_of(
    st.none(), scope_texts, scope_texts, st.lists(scope_texts, max_size=3), st.tuples(scope_texts)
)
SCOPE_CASES = [
    ("a b", "a b", True),
    ("a b", "b", True),
    ("a b", " b\ta ", True),
    ("a", "a b", False),
    ("a", "b", False),
    (None, "a", False),
    (None, "", True),
    (None, None, True),
    ("", " ", True),
    ("a", ["a", "b"], False),
    ("a b", ["b a"], True),
    ("a b", ("a", "b c"), False),
]


@pytest.mark.parametrize(("granted", "requested", "covered"), SCOPE_CASES)
def test_scope_check(granted: str | None, requested: Any, covered: bool) -> None:
    verifier = _verifier()
    if covered:
        verifier.verify_offline(_token(granted), scope=requested)
    else:
        with pytest.raises(InsufficientScope):
            verifier.verify_offline(_token(granted), scope=requested)


@settings(max_examples=300, deadline=None)
@given(granted=st.none() | scope_texts, requested=requests, jwt=st.booleans())
def test_scope_check_is_the_subset_of_sets(granted: str | None, requested: Any, jwt: bool) -> None:
    token = _token(granted, jwt=jwt)
    covered = scope_set(requested) <= Claims("", "", "", 0, 0, b"", scope=granted).scopes
    try:
        verified = _verifier().verify_offline(token, scope=requested)
    except InsufficientScope as error:
        assert not covered
        assert str(error) == "token scope does not cover the request"
    else:
        assert covered and verified.claims.scope == granted


def test_a_request_scope_of_other_items_fails_as_before() -> None:
    with pytest.raises(AttributeError):
        _verifier().verify_offline(_token("a"), scope=[1])  # type: ignore[list-item]


@pytest.mark.parametrize("jwt", [False, True], ids=["cwt", "jwt"])
def test_verified_token_is_the_value_object(jwt: bool) -> None:
    token = _token("a b", jwt=jwt)
    verified = _verifier().verify_offline(token, scope="a")
    expected = VerifiedToken(verified.claims, token_hash(token), "jwt" if jwt else "cwt", KID, KEY)
    assert type(verified) is VerifiedToken and type(verified.claims) is Claims
    assert verified == expected and repr(verified) == repr(expected)
    assert hash(verified) == hash(expected) and verified.key == KEY
    with pytest.raises(dataclasses.FrozenInstanceError):
        verified.kid = b"other"  # type: ignore[misc]
    built = _verified(verified.claims, verified.token_hash, "cwt", KID, b"secret")
    assert dataclasses.replace(built, kid=b"x") == VerifiedToken(
        verified.claims, verified.token_hash, "cwt", b"x", b"secret"
    )
