"""Every store write path at once, on two instances: key rotations, token revocations,
family kills and audience additions must neither deadlock nor lose or duplicate an update.

PostgreSQL is where this bites (row locks, advisory locks and the change-feed row taken by
concurrent transactions); SQLite serialises writers and must give the same results.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from typing import Any

import pytest

from coap_auth.keys import KeyRing, RotationPolicy, SigningKey, rings_by_family
from coap_auth.store import Audience, Client, IssuedAccess, RefreshFamily, Store
from coap_auth.store.audit import Mac, verify_chain, verify_log
from coap_auth.wire import CoseAlg
from tests.store.conftest import Backend

T0 = 1_700_000_000
NOW = T0 + 10
POLICY = RotationPolicy(period=86400, lead=0, retire_after=700)
ROTATIONS = 8
NEW_AUDIENCES = 4
KILLED = ("sensor-0", "sensor-1", "sensor-2")  # every family of these is killed
SPARED = ("sensor-3", "sensor-4")  # only single tokens of these are revoked
FAMILIES = 4  # per client, one access token each
ROUNDS = 3


def _rotate_default(current: list[SigningKey]) -> list[SigningKey]:
    return rings_by_family(current)["default"].rotate(NOW, POLICY)[1]


async def _register(store: Store) -> None:
    await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
    initial = KeyRing.initial(CoseAlg.ES256, T0).keys
    await store.update_keys(lambda _current: list(initial), "operator", T0)
    for client_id in KILLED + SPARED:
        client = Client(
            client_id, ("thermostat",), ("temp:read",), T0, secret_digest=secrets.token_bytes(32)
        )
        await store.add_client(client, "operator")


async def _start_families(store: Store) -> dict[str, list[bytes]]:
    """FAMILIES live families per client; returns each client's access-token hashes."""
    tokens: dict[str, list[bytes]] = {}
    for client_id in KILLED + SPARED:
        for _ in range(FAMILIES):
            family = RefreshFamily(
                family_id=secrets.token_bytes(16),
                client_id=client_id,
                audience="thermostat",
                scope="temp:read",
                created_at=T0,
                last_used_at=T0,
                expires_at=T0 + 86400,
            )
            access = IssuedAccess(secrets.token_bytes(16), client_id, T0 + 3600)
            await store.start_family(family, secrets.token_bytes(32), access)
            tokens.setdefault(client_id, []).append(access.token_hash)
    return tokens


async def _one_round(stores: list[Store], audit_mac: Mac, round_: int) -> None:
    store, other = stores
    tokens = await _start_families(store)
    counters = await store.change_counters()
    _, _, last_seq = await store.trl()
    entries_before = len(await store.audit_entries())

    # Revoked one by one: every killed client's families but the first (so each kill still
    # has a token to revoke, and most race a kill) and every token of the spared clients.
    singles = [h for c in KILLED for h in tokens[c][1:]] + [h for c in SPARED for h in tokens[c]]
    ops: list[tuple[str, Any]] = []
    for n in range(max(ROTATIONS, NEW_AUDIENCES, len(KILLED), len(singles))):
        on, off = stores[n % 2], stores[(n + 1) % 2]
        if n < ROTATIONS:
            ops.append(("rotate", on.update_keys(_rotate_default, "scheduler", NOW)))
        if n < len(KILLED):
            ops.append(
                ("kill", on.kill_families(KILLED[n], "revoked by operator", NOW, "operator"))
            )
        if n < len(singles):
            ops.append(("revoke", off.revoke_access(singles[n], None, NOW, "operator")))
        if n < NEW_AUDIENCES:
            ops.append(
                (
                    "audience",
                    on.add_audience(Audience(f"a{round_}-{n}", "cwt", 600, NOW), "operator"),
                )
            )

    results = await asyncio.wait_for(asyncio.gather(*(op for _, op in ops)), timeout=30)

    by_kind: dict[str, list[Any]] = {}
    for (kind, _), result in zip(ops, results, strict=True):
        by_kind.setdefault(kind, []).append(result)
    assert [len(changed) for changed in by_kind["rotate"]] == [3] * ROTATIONS
    assert by_kind["kill"] == [FAMILIES] * len(KILLED)
    revoked_singly = {h for h, won in zip(singles, by_kind["revoke"], strict=True) if won}
    # Nothing but its own revocation revokes a spared client's token.
    assert {h for c in SPARED for h in tokens[c]} <= revoked_singly

    # What was meant to be revoked is, each hash in exactly one TRL update.
    expected = {h for c in KILLED for h in tokens[c]} | set(singles)
    assert {await store.token_status(h) for h in expected} == {"revoked"}
    kills = len(KILLED)  # one TRL update per kill_families call
    after = await other.change_counters()
    assert after.keys - counters.keys == ROTATIONS + NEW_AUDIENCES
    assert after.revocations - counters.revocations == len(revoked_singly) + kills
    listed, _, new_last = await other.trl()
    assert new_last - last_seq == len(revoked_singly) + kills
    updates = await store.trl_updates(last_seq + 1, new_last)
    added = [h for u in updates for h in u.added]
    assert all(u.added for u in updates) and len(added) == len(set(added))
    assert set(added) == expected and expected <= set(listed)

    # The audit chain is whole and holds one entry per change.
    entries = await other.audit_entries()
    report = verify_chain(audit_mac, entries)
    assert report.ok and report.entries == len(entries), report
    assert verify_log(audit_mac, await other.audit_snapshot()) == report
    new = entries[entries_before:]
    assert Counter(e.event.event for e in new) == {
        "key.retired": ROTATIONS,
        "key.activated": ROTATIONS,
        "key.created": ROTATIONS,
        "family.killed": len(KILLED) * FAMILIES,
        "token.revoked": len(revoked_singly),
        "audience.added": NEW_AUDIENCES,
    }
    by_kills = sum(
        e.event.details["revoked_access_tokens"] for e in new if e.event.event == "family.killed"
    )
    assert by_kills + len(revoked_singly) == len(expected)
    states = Counter(k.state.value for k in await store.load_keys())
    assert states["active"] == 1 and states["next"] == 1
    assert states["retiring"] == ROTATIONS * (round_ + 1)


async def test_concurrent_writes_neither_deadlock_nor_lose_updates(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coap_auth.store")
    stores = [await backend.open_store(), await backend.open_store()]
    await _register(stores[0])
    for round_ in range(ROUNDS):
        await _one_round(stores, backend.master_key.audit_mac, round_)
    # The lock order, not the store's retry of a lost race, is what kept this whole.
    assert not [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
