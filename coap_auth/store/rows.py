"""Row <-> record conversion shared by the SQL stores (same column order in both schemas)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import cbor2

from coap_auth.store.audit import AuditEntry, AuditEvent
from coap_auth.store.records import Audience, Client, RefreshFamily, TrlUpdate

Row = Sequence[Any]


def audience_from_row(row: Row) -> Audience:
    (
        audience_id,
        token_format,
        lifetime,
        created_at,
        key_family,
        key_alg,
        introspect_secret_digest,
        introspect_public_key,
    ) = row
    return Audience(
        audience_id,
        token_format,
        lifetime,
        created_at,
        key_family=key_family,
        key_alg=key_alg,
        introspect_secret_digest=introspect_secret_digest,
        introspect_public_key=(
            None if introspect_public_key is None else cbor2.loads(introspect_public_key)
        ),
    )


def audience_to_row(audience: Audience) -> tuple[Any, ...]:
    public_key = audience.introspect_public_key
    return (
        audience.audience_id,
        audience.token_format,
        audience.lifetime,
        audience.created_at,
        audience.key_family,
        audience.key_alg,
        audience.introspect_secret_digest,
        None if public_key is None else cbor2.dumps(public_key),
    )


def client_from_row(row: Row) -> Client:
    client_id, audiences, scope, secret_digest, public_key, disabled, created_at = row
    return Client(
        client_id=client_id,
        audiences=tuple(json.loads(audiences)),
        scope=tuple(scope.split()),
        created_at=created_at,
        secret_digest=secret_digest,
        public_key=None if public_key is None else cbor2.loads(public_key),
        disabled=bool(disabled),
    )


def family_from_row(row: Row) -> RefreshFamily:
    (
        family_id,
        client_id,
        audience,
        scope,
        cnf,
        created_at,
        last_used_at,
        expires_at,
        killed_at,
        kill_reason,
    ) = row
    return RefreshFamily(
        family_id=family_id,
        client_id=client_id,
        audience=audience,
        scope=scope,
        created_at=created_at,
        last_used_at=last_used_at,
        expires_at=expires_at,
        cnf=None if cnf is None else cbor2.loads(cnf),
        killed_at=killed_at,
        kill_reason=kill_reason,
    )


def trl_update_from_row(row: Row) -> TrlUpdate:
    seq, at, removed, added = row
    return TrlUpdate(seq, at, tuple(cbor2.loads(removed)), tuple(cbor2.loads(added)))


def audit_entry_from_row(row: Row) -> AuditEntry:
    seq, at, actor, event, subject, details, mac = row
    return AuditEntry(seq, AuditEvent(at, actor, event, subject, json.loads(details)), mac)


def family_kill_events(
    families: Iterable[RefreshFamily],
    revoked: Counter[bytes] | None,
    reason: str,
    actor: str,
    now: int,
) -> list[AuditEvent]:
    """One audit event per killed family; `revoked` counts its access tokens put on the TRL
    (None when the kill revoked none)."""
    events = []
    for family in families:
        details: dict[str, Any] = {"client_id": family.client_id, "reason": reason}
        if revoked is not None:
            details["revoked_access_tokens"] = revoked[family.family_id]
        events.append(AuditEvent(now, actor, "family.killed", family.family_id.hex(), details))
    return events
