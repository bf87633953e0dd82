"""Signing keys as stored rows: the secret sealed under the master key (AES-256-GCM, the kid
as associated data), or NULL once the key has ended. Shared by the SQL stores."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization

from coap_auth.keys import PUBLISHED, SYMMETRIC_ALGS, KeyState, SigningKey
from coap_auth.store.master_key import MasterKey
from coap_auth.wire import CoseAlg

log = logging.getLogger("coap_auth.store")


def key_to_row(master_key: MasterKey, key: SigningKey) -> tuple[Any, ...]:
    return (
        key.kid,
        int(key.alg),
        key.state.value,
        None if key.private_key is None else _seal(master_key, key),
        key.created_at,
        key.activated_at,
        key.retire_until,
        key.family,
        key.retired_at,
        key.ended_at,
    )


def _seal(master_key: MasterKey, key: SigningKey) -> bytes:
    secret = key.private_key
    if isinstance(secret, bytes):
        plain = secret
    else:
        assert secret is not None
        plain = secret.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return master_key.encrypt(plain, key.kid)


# A signing key's columns, in the order key_to_row gives its values.
KEY_COLUMNS = (
    "kid, alg, state, private_key, created_at, activated_at, retire_until, family,"
    " retired_at, ended_at"
)


def key_from_row(master_key: MasterKey, row: Mapping[str, Any]) -> SigningKey:
    """A key from a row of KEY_COLUMNS, read by name, its private part unsealed."""
    kid, alg, state, sealed = row["kid"], row["alg"], row["state"], row["private_key"]
    created_at, activated_at = row["created_at"], row["activated_at"]
    retire_until, family = row["retire_until"], row["family"]
    retired_at, ended_at = row["retired_at"], row["ended_at"]
    alg = CoseAlg(alg)
    if sealed is None and state in PUBLISHED:
        # Only an ended key loses its private part, so the row was edited (a revoked key put
        # back as retiring, say): it was served as published and failed every /keys with a
        # 5.00. Read as revoked, it stays unpublished, as it was.
        log.error(
            "signing key %s claims state %s without its private part: read as revoked",
            kid.hex(),
            state,
        )
        state = KeyState.REVOKED
    secret: Any = None
    if sealed is not None:
        plain = master_key.decrypt(sealed, kid)
        if alg in SYMMETRIC_ALGS:
            secret = plain
        else:
            secret = serialization.load_der_private_key(plain, password=None)
    return SigningKey(
        kid=kid,
        alg=alg,
        state=KeyState(state),
        private_key=secret,
        created_at=created_at,
        family=family,
        activated_at=activated_at,
        retired_at=retired_at,
        retire_until=retire_until,
        ended_at=ended_at,
    )
