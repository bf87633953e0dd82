"""The `Store` contract: what every implementation (SQLite today, PostgreSQL later) must do.

Tests talk to the `Store` protocol only. Backend-specific checks (plaintext on disk, direct
SQL) go through the `Backend` fixture (conftest.py), so adding a backend means adding one
param and one `Backend` implementation. Time is always passed as `now`; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.errors import OperatorError
from coap_auth.keys import KeyRing, KeyState, RotationPolicy, SigningKey
from coap_auth.store import (
    Audience,
    Client,
    IssuedAccess,
    MasterKey,
    RefreshFamily,
    SqliteStore,
    Store,
)
from coap_auth.store.audit import AuditEvent, verify_chain, verify_log
from coap_auth.store.records import UNCHECKED, Minted, RegistryChange, RegistryVersions
from coap_auth.store.registry_mac import RegistryReport
from coap_auth.store.sqlite import DB_FILE
from coap_auth.store.sqlite_schema import SCHEMA_VERSION
from coap_auth.wire import CoseAlg
from tests.store.conftest import Backend

T0 = 1_700_000_000
POLICY = RotationPolicy(period=86400, lead=0, retire_after=700)


async def _save(store: Store, keys: Any) -> list[SigningKey]:
    """Store these keys as they are (a transition that ignores what is stored)."""
    return await store.update_keys(lambda _current: list(keys), "operator", T0)


async def _listed(store: Store) -> list[bytes]:
    """The hashes on the TRL now."""
    return (await store.trl())[0]


LIFETIME = 30 * 24 * 3600  # absolute family lifetime used unless a test says otherwise
IDLE = 7 * 24 * 3600
GRACE = 30
ACCESS_LIFETIME = 600


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open_store()


@pytest.fixture
async def registered(store: Store) -> Store:
    """A store with audience `thermostat` and secret clients `sensor-1` and `sensor-2`."""
    await store.add_audience(Audience("thermostat", "cwt", ACCESS_LIFETIME, T0), "operator")
    for client_id in ("sensor-1", "sensor-2"):
        await store.add_client(_secret_client(client_id), "operator")
    return store


# -- helpers ------------------------------------------------------------------------------------


def _secret_client(client_id: str, audiences: tuple[str, ...] = ("thermostat",)) -> Client:
    return Client(
        client_id,
        audiences,
        ("temp:read", "temp:write"),
        T0,
        secret_digest=secrets.token_bytes(32),
    )


def _digest() -> bytes:
    return secrets.token_bytes(32)


def _access(client_id: str = "sensor-1", exp: int = T0 + 10 * ACCESS_LIFETIME) -> IssuedAccess:
    return IssuedAccess(secrets.token_bytes(16), client_id, exp)


def _family(
    client_id: str = "sensor-1",
    now: int = T0,
    lifetime: int = LIFETIME,
    cnf: dict[Any, Any] | None = None,
) -> RefreshFamily:
    return RefreshFamily(
        family_id=secrets.token_bytes(16),
        client_id=client_id,
        audience="thermostat",
        scope="temp:read temp:write",
        created_at=now,
        last_used_at=now,
        expires_at=now + lifetime,
        cnf=cnf,
    )


class Minter:
    """A mint callback that records what it was given and what it returned."""

    def __init__(self, exp: int = T0 + 10 * ACCESS_LIFETIME) -> None:
        self.exp = exp
        self.families: list[RefreshFamily] = []
        self.issued: list[IssuedAccess] = []

    def __call__(self, family: RefreshFamily) -> Minted[IssuedAccess]:
        access = _access(family.client_id, self.exp)
        self.families.append(family)
        self.issued.append(access)
        return Minted(access, access)


async def _start(
    store: Store, family: RefreshFamily | None = None, access: IssuedAccess | None = None
) -> tuple[RefreshFamily, bytes, IssuedAccess]:
    family = family or _family()
    digest = _digest()
    access = access or _access(family.client_id)
    await store.start_family(family, digest, access)
    return family, digest, access


async def _rotate(
    store: Store,
    digest: bytes,
    successor: bytes,
    now: int,
    *,
    client_id: str = "sensor-1",
    grace: int = GRACE,
    idle_timeout: int = IDLE,
    mint: Any = None,
) -> str:
    outcome = await store.rotate_refresh(
        digest,
        successor,
        client_id=client_id,
        now=now,
        grace=grace,
        idle_timeout=idle_timeout,
        mint=mint or Minter(),
    )
    return outcome.status


async def _live_ids(store: Store, now: int, client_id: str | None = None) -> set[bytes]:
    return {f.family_id for f in await store.list_families(client_id, now)}


# -- audiences and clients ----------------------------------------------------------------------


async def test_audiences_add_get_list(store: Store) -> None:
    thermostat = Audience("thermostat", "cwt", 600, T0)
    dashboard = Audience("dashboard", "jwt", 900, T0 + 1)
    assert await store.list_audiences() == []
    await store.add_audience(thermostat, "operator")
    await store.add_audience(dashboard, "operator")

    assert await store.get_audience("thermostat") == thermostat
    assert await store.get_audience("dashboard") == dashboard
    assert await store.get_audience("nope") is None
    listed = await store.list_audiences()
    assert sorted(listed, key=lambda a: a.audience_id) == [dashboard, thermostat]


async def test_duplicate_audience_raises_and_changes_nothing(store: Store) -> None:
    original = Audience("thermostat", "cwt", 600, T0)
    await store.add_audience(original, "operator")

    with pytest.raises(OperatorError):
        await store.add_audience(Audience("thermostat", "jwt", 900, T0 + 5), "operator")

    assert await store.get_audience("thermostat") == original
    assert await store.list_audiences() == [original]


async def test_clients_add_get_list_roundtrip(store: Store) -> None:
    await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
    await store.add_audience(Audience("dashboard", "jwt", 900, T0), "operator")
    secret = _secret_client("sensor-1", ("thermostat", "dashboard"))
    x, y = secrets.token_bytes(32), secrets.token_bytes(32)
    cose_key = {1: 2, -1: 1, -2: x, -3: y}
    keyed = Client("sensor-2", ("thermostat",), ("temp:read",), T0 + 1, public_key=cose_key)
    await store.add_client(secret, "operator")
    await store.add_client(keyed, "operator")

    got = await store.get_client("sensor-1")
    assert got == secret
    assert got is not None and got.secret_digest == secret.secret_digest
    assert got.audiences == ("thermostat", "dashboard") and got.public_key is None
    got_keyed = await store.get_client("sensor-2")
    assert got_keyed == keyed
    # public_key is compare=False on the record: check it explicitly.
    assert got_keyed is not None and got_keyed.public_key == cose_key
    assert got_keyed.secret_digest is None
    assert await store.get_client("sensor-3") is None
    listed = sorted(await store.list_clients(), key=lambda c: c.client_id)
    assert listed == [secret, keyed]
    assert listed[1].public_key == cose_key


async def test_duplicate_client_raises_and_changes_nothing(registered: Store) -> None:
    before = await registered.get_client("sensor-1")
    before_list = await registered.list_clients()

    with pytest.raises(OperatorError):
        await registered.add_client(_secret_client("sensor-1"), "operator")

    after = await registered.get_client("sensor-1")
    assert after == before
    assert after is not None and before is not None
    assert after.secret_digest == before.secret_digest
    assert await registered.list_clients() == before_list


@pytest.mark.parametrize(
    "audiences", [("no-such-audience",), ("thermostat", "no-such-audience")], ids=["one", "mixed"]
)
async def test_client_with_unknown_audience_raises_and_changes_nothing(
    registered: Store, audiences: tuple[str, ...]
) -> None:
    before = await registered.list_clients()

    with pytest.raises(OperatorError):
        await registered.add_client(_secret_client("sensor-3", audiences), "operator")

    assert await registered.get_client("sensor-3") is None
    assert await registered.list_clients() == before


async def test_disable_client(registered: Store) -> None:
    assert await registered.disable_client("sensor-1", T0, "operator") is True
    assert await registered.disable_client("no-such-client", T0, "operator") is False

    sensor_1 = await registered.get_client("sensor-1")
    sensor_2 = await registered.get_client("sensor-2")
    assert sensor_1 is not None and sensor_1.disabled
    assert sensor_2 is not None and not sensor_2.disabled


# -- signing keys -------------------------------------------------------------------------------


def _public_bytes(key: SigningKey) -> bytes:
    return key.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _raw_private(key: SigningKey) -> bytes:
    private_key = key.private_key
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.private_numbers().private_value.to_bytes(32, "big")
    assert isinstance(private_key, ed25519.Ed25519PrivateKey)
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _by_kid(keys: list[SigningKey]) -> dict[bytes, SigningKey]:
    return {k.kid: k for k in keys}


@pytest.mark.parametrize("alg", [CoseAlg.ES256, CoseAlg.EDDSA], ids=["ES256", "EdDSA"])
async def test_keys_roundtrip_and_update(store: Store, alg: CoseAlg) -> None:
    ring = KeyRing.initial(alg, T0)
    assert await store.load_keys() == []
    await _save(store, ring.keys)

    loaded = _by_kid(await store.load_keys())
    assert set(loaded) == {k.kid for k in ring.keys}
    for key in ring.keys:
        got = loaded[key.kid]
        assert got == key  # kid, alg, state, timestamps
        assert _public_bytes(got) == _public_bytes(key)
        assert _raw_private(got) == _raw_private(key)

    rotated, changed = ring.rotate(T0 + 100, POLICY)
    await _save(store, changed)
    loaded = _by_kid(await store.load_keys())
    assert len(loaded) == 3
    for key in rotated.keys:
        assert loaded[key.kid] == key
        assert _public_bytes(loaded[key.kid]) == _public_bytes(key)
    assert {k.state for k in loaded.values()} == {
        KeyState.RETIRING,
        KeyState.ACTIVE,
        KeyState.NEXT,
    }


async def test_a_published_key_row_without_its_private_part_reads_as_revoked(
    backend: Backend,
) -> None:
    """Only an ended key loses its private part. A row edited to claim a published state
    without one (attack round 1: a revoked key put back as retiring) was served at /keys,
    which then failed with 5.00; it reads as revoked, unpublished."""
    store = await backend.open_store()
    ring = KeyRing.initial(CoseAlg.ES256, T0)
    await _save(store, ring.keys)
    edited = ring.keys[0]
    await backend.execute(
        "UPDATE signing_keys SET private_key = NULL, state = 'retiring' WHERE kid = $1",
        edited.kid,
    )
    loaded = _by_kid(await store.load_keys())
    assert loaded[edited.kid].state == KeyState.REVOKED
    assert all(loaded[k.kid].state == k.state for k in ring.keys[1:])


@pytest.mark.parametrize("alg", [CoseAlg.ES256, CoseAlg.EDDSA], ids=["ES256", "EdDSA"])
async def test_private_keys_not_stored_in_plaintext(backend: Backend, alg: CoseAlg) -> None:
    store = await backend.open_store()
    ring = KeyRing.initial(alg, T0)
    await _save(store, ring.keys)
    secrets_on_disk = [_raw_private(k) for k in ring.keys]
    secrets_on_disk += [
        k.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for k in ring.keys
    ]

    files = await backend.raw_files()  # while open: the WAL holds the fresh pages
    assert files, "backend keeps no files?"
    # The check must be able to see key material at all: public keys are stored in clear
    # nowhere, but the kid is, so the files really are the ones holding the key rows.
    assert any(ring.keys[0].kid in data for data in files.values())
    for name, data in files.items():
        for secret in secrets_on_disk:
            assert secret not in data, f"private key material in plaintext in {name}"

    await store.close()
    backend.opened.remove(store)
    for name, data in (await backend.raw_files()).items():  # after the checkpoint on close
        for secret in secrets_on_disk:
            assert secret not in data, f"private key material in plaintext in {name}"


async def test_change_counter_increases_on_key_updates(store: Store) -> None:
    ring = KeyRing.initial(CoseAlg.ES256, T0)
    before = await store.change_counters()
    await _save(store, ring.keys)
    after_first = await store.change_counters()
    assert after_first.keys > before.keys
    assert after_first.revocations == before.revocations

    _, changed = ring.rotate(T0 + 10, POLICY)
    await _save(store, changed)
    assert (await store.change_counters()).keys > after_first.keys


async def test_change_counter_seen_by_another_instance(backend: Backend, store: Store) -> None:
    other = await backend.open_store()
    before = await other.change_counters()
    await _save(store, KeyRing.initial(CoseAlg.ES256, T0).keys)
    assert (await other.change_counters()).keys > before.keys


# -- client-assertion replay cache ----------------------------------------------------------------


async def test_remember_assertion_refuses_replay_until_exp(registered: Store) -> None:
    cti, exp = secrets.token_bytes(8), T0 + 300

    assert await registered.remember_assertion("sensor-1", cti, exp, T0) is True
    assert await registered.remember_assertion("sensor-1", cti, exp, T0) is False
    assert await registered.remember_assertion("sensor-1", cti, exp, exp - 1) is False
    # Another client may use the same cti.
    assert await registered.remember_assertion("sensor-2", cti, exp, T0 + 1) is True
    assert await registered.remember_assertion("sensor-2", cti, exp, T0 + 2) is False
    # Another cti of the same client is fresh.
    assert await registered.remember_assertion("sensor-1", b"other", exp, T0 + 2) is True
    # Once exp has passed the entry may be forgotten (the assertion is refused as expired
    # anyway, before the replay cache is asked).
    assert await registered.remember_assertion("sensor-1", cti, exp + 300, exp + 1) is True
    assert await registered.remember_assertion("sensor-1", cti, exp + 300, exp + 2) is False


# -- refresh families ---------------------------------------------------------------------------


async def test_start_family_is_listed(registered: Store) -> None:
    cnf = {1: 2, -1: 1, -2: b"x" * 32, -3: b"y" * 32}
    plain, _, _ = await _start(registered)
    pop, _, _ = await _start(registered, _family(now=T0 + 1, cnf=cnf))
    other, _, _ = await _start(registered, _family("sensor-2", now=T0 + 2))

    listed = await registered.list_families(None, T0 + 10)
    assert {f.family_id for f in listed} == {plain.family_id, pop.family_id, other.family_id}
    by_id = {f.family_id: f for f in listed}
    assert by_id[plain.family_id] == plain and by_id[plain.family_id].cnf is None
    assert by_id[pop.family_id] == pop and by_id[pop.family_id].cnf == cnf
    assert await _live_ids(registered, T0 + 10, "sensor-1") == {plain.family_id, pop.family_id}
    assert await _live_ids(registered, T0 + 10, "sensor-2") == {other.family_id}
    assert await _live_ids(registered, T0 + 10, "sensor-3") == set()
    # Past the absolute lifetime a family is no longer listed.
    assert await _live_ids(registered, T0 + LIFETIME + 1, "sensor-1") == set()


async def test_rotate_spends_and_successor_rotates(registered: Store) -> None:
    family, d0, _ = await _start(registered)
    d1, d2 = _digest(), _digest()
    mint = Minter()

    outcome = await registered.rotate_refresh(
        d0, d1, client_id="sensor-1", now=T0 + 10, grace=GRACE, idle_timeout=IDLE, mint=mint
    )

    assert outcome.status == "rotated"
    assert outcome.family is not None and outcome.family.family_id == family.family_id
    assert [f.family_id for f in mint.families] == [family.family_id]
    assert mint.families[0].scope == family.scope
    assert mint.families[0].audience == family.audience
    assert await _rotate(registered, d1, d2, T0 + 20) == "rotated"
    listed = {f.family_id: f for f in await registered.list_families("sensor-1", T0 + 20)}
    assert listed[family.family_id].last_used_at == T0 + 20


async def test_grace_replaces_successor_which_is_then_reused(registered: Store) -> None:
    family, d0, _ = await _start(registered)
    d1, d2, d3, d4 = _digest(), _digest(), _digest(), _digest()
    assert await _rotate(registered, d0, d1, T0 + 10) == "rotated"

    # The response carrying d1 was lost: d0 again, inside the grace window, d1 still unused.
    mint = Minter()
    outcome = await registered.rotate_refresh(
        d0, d2, client_id="sensor-1", now=T0 + 20, grace=GRACE, idle_timeout=IDLE, mint=mint
    )
    assert outcome.status == "grace"
    assert len(mint.issued) == 1

    # d2 is the live token now; d1 was spent by the grace refresh and is useless.
    assert await _rotate(registered, d1, d3, T0 + 20 + GRACE + 1) == "reused"
    assert family.family_id not in await _live_ids(registered, T0 + 20 + GRACE + 1)
    assert await _rotate(registered, d2, d4, T0 + 20 + GRACE + 2) == "dead"
    # The access token minted under grace belongs to the family and was revoked with it.
    assert mint.issued[0].token_hash in await _listed(registered)


async def test_replaced_successor_is_reuse_even_inside_grace(registered: Store) -> None:
    family, d0, _ = await _start(registered)
    d1, d2, d3 = _digest(), _digest(), _digest()
    assert await _rotate(registered, d0, d1, T0 + 10) == "rotated"
    assert await _rotate(registered, d0, d2, T0 + 11) == "grace"

    # d1 was spent by the grace refresh without a successor of its own: not a lost response.
    assert await _rotate(registered, d1, d3, T0 + 12) == "reused"
    assert family.family_id not in await _live_ids(registered, T0 + 12)


async def test_grace_needs_unused_successor(registered: Store) -> None:
    family, d0, _ = await _start(registered)
    d1, d2, d3 = _digest(), _digest(), _digest()
    assert await _rotate(registered, d0, d1, T0 + 10) == "rotated"
    assert await _rotate(registered, d1, d2, T0 + 11) == "rotated"

    # d0 again within the window, but its successor d1 has been used: theft.
    assert await _rotate(registered, d0, d3, T0 + 12) == "reused"
    assert family.family_id not in await _live_ids(registered, T0 + 12)


async def test_reuse_outside_grace_kills_family_and_revokes_its_access_tokens(
    registered: Store,
) -> None:
    kill_at = T0 + 100
    family, d0, a0 = await _start(registered, access=_access(exp=kill_at + 500))
    bystander, b0, b_access = await _start(registered, _family(now=T0 + 1))
    expiring = Minter(exp=kill_at - 1)  # expired by the time of the reuse
    lasting = Minter(exp=kill_at + 500)
    d1, d2, d3 = _digest(), _digest(), _digest()
    assert await _rotate(registered, d0, d1, T0 + 10, mint=expiring) == "rotated"
    assert await _rotate(registered, d1, d2, T0 + 20, mint=lasting) == "rotated"
    assert await _listed(registered) == []

    outcome = await registered.rotate_refresh(
        d0, d3, client_id="sensor-1", now=kill_at, grace=GRACE, idle_timeout=IDLE, mint=Minter()
    )

    assert outcome.status == "reused"
    assert outcome.family is not None and outcome.family.family_id == family.family_id
    assert await _live_ids(registered, kill_at) == {bystander.family_id}
    revoked = set(await _listed(registered))
    assert revoked == {a0.token_hash, lasting.issued[0].token_hash}
    assert expiring.issued[0].token_hash not in revoked
    assert b_access.token_hash not in revoked
    # No token of the family works any more, not even the newest one; the bystander does.
    assert await _rotate(registered, d2, _digest(), kill_at + 1) == "dead"
    assert await _rotate(registered, d3, _digest(), kill_at + 1) == "unknown"
    assert await _rotate(registered, b0, _digest(), kill_at + 1) == "rotated"
    # The TRL forgets revoked tokens once they expire: one update removing both.
    assert await registered.sweep_expired(kill_at + 500, keep_updates=32) == 2
    assert await _listed(registered) == []
    _, first, last = await registered.trl()
    newest = (await registered.trl_updates(last, last))[0]
    assert set(newest.removed) == revoked and newest.added == ()


async def test_unknown_digest_and_other_client(registered: Store) -> None:
    _, d0, _ = await _start(registered)
    mint = Minter()

    assert await _rotate(registered, _digest(), _digest(), T0 + 1, mint=mint) == "unknown"
    assert (
        await _rotate(registered, d0, _digest(), T0 + 2, client_id="sensor-2", mint=mint)
        == "unknown"
    )
    assert mint.issued == []
    # Neither attempt spent anything: the owner's token rotates normally (not "grace").
    assert await _rotate(registered, d0, _digest(), T0 + 3) == "rotated"


async def test_idle_timeout_expires_family(registered: Store) -> None:
    idle = 100
    _, fresh, _ = await _start(registered)
    stale_family, stale, _ = await _start(registered)
    mint = Minter()

    assert await _rotate(registered, fresh, _digest(), T0 + idle - 1, idle_timeout=idle) == (
        "rotated"
    )
    assert (
        await _rotate(registered, stale, _digest(), T0 + idle, idle_timeout=idle, mint=mint)
        == "expired"
    )
    assert mint.issued == []
    assert stale_family.family_id not in await _live_ids(registered, T0 + idle)


async def test_idle_timeout_counts_from_last_use(registered: Store) -> None:
    idle = 100
    _, d0, _ = await _start(registered)
    d1, d2 = _digest(), _digest()
    assert await _rotate(registered, d0, d1, T0 + 90, idle_timeout=idle) == "rotated"
    # 180 s after the start but only 90 s after the last use.
    assert await _rotate(registered, d1, d2, T0 + 180, idle_timeout=idle) == "rotated"
    assert await _rotate(registered, d2, _digest(), T0 + 280, idle_timeout=idle) == "expired"


async def test_absolute_lifetime_expires_family(registered: Store) -> None:
    lifetime = 500
    family, d0, _ = await _start(registered, _family(lifetime=lifetime))
    d1, d2 = _digest(), _digest()
    mint = Minter()

    # Regular use does not extend the absolute lifetime.
    assert await _rotate(registered, d0, d1, T0 + 250) == "rotated"
    assert await _rotate(registered, d1, d2, T0 + lifetime - 1) == "rotated"
    assert await _rotate(registered, d2, _digest(), T0 + lifetime, mint=mint) == "expired"
    assert mint.issued == []
    assert family.family_id not in await _live_ids(registered, T0 + lifetime)


class MintFailed(Exception):
    pass


def _failing_mint(family: RefreshFamily) -> IssuedAccess:
    raise MintFailed("no")


async def test_failing_mint_changes_nothing(registered: Store, backend: Backend) -> None:
    family, d0, _ = await _start(registered)
    failed_successor = _digest()

    with pytest.raises(MintFailed):
        await _rotate(registered, d0, failed_successor, T0 + 10, mint=_failing_mint)

    assert await backend.unspent_refresh_tokens(family.family_id) == 1
    # The failed successor was not stored; last_used_at did not move.
    assert await _rotate(registered, failed_successor, _digest(), T0 + 11) == "unknown"
    listed = {f.family_id: f for f in await registered.list_families("sensor-1", T0 + 11)}
    assert listed[family.family_id].last_used_at == T0
    # d0 is still live: it rotates (not "grace", which a persisted spend would give).
    assert await _rotate(registered, d0, _digest(), T0 + 12) == "rotated"


async def test_failing_mint_in_grace_keeps_successor_live(registered: Store) -> None:
    family, d0, _ = await _start(registered)
    d1 = _digest()
    assert await _rotate(registered, d0, d1, T0 + 10) == "rotated"

    with pytest.raises(MintFailed):
        await _rotate(registered, d0, _digest(), T0 + 11, mint=_failing_mint)

    # The grace attempt rolled back: d1 was not spent, so it still rotates.
    assert await _rotate(registered, d1, _digest(), T0 + 12) == "rotated"
    assert family.family_id in await _live_ids(registered, T0 + 12)


async def _versions(store: Store, client_id: str = "sensor-1") -> RegistryVersions:
    """The registry rows a grant for this client decides from, as stored now."""
    client = await store.get_client(client_id)
    audience = await store.get_audience("thermostat")
    assert client is not None and audience is not None and client.version and audience.version
    return RegistryVersions(((client_id, client.version),), (("thermostat", audience.version),))


async def _nothing_written(
    store: Store, family: RefreshFamily, digest: bytes, access: IssuedAccess
) -> None:
    assert family.family_id not in await _live_ids(store, T0 + 10)
    assert await store.token_status(access.token_hash) is None
    assert await _rotate(store, digest, _digest(), T0 + 10) == "unknown"


async def test_start_family_checks_the_registry_rows_it_was_decided_from(
    registered: Store,
) -> None:
    versions = await _versions(registered)
    started, digest, access = _family(), _digest(), _access()
    assert await registered.start_family(started, digest, access, versions) is True
    assert started.family_id in await _live_ids(registered, T0 + 10)
    assert await registered.token_status(access.token_hash) == "live"
    # A client named as absent (b"") is current while there is no such row.
    absent = RegistryVersions((("sensor-9", b""),))
    assert await registered.start_family(_family(), _digest(), _access(), absent) is True

    # The client changed since the grant was decided: nothing is written.
    assert await registered.disable_client("sensor-1", T0 + 1, "operator")
    for stale in (versions, RegistryVersions((("sensor-2", b""),)), absent + versions):
        family, digest, access = _family(), _digest(), _access()
        assert await registered.start_family(family, digest, access, stale) is False
        await _nothing_written(registered, family, digest, access)


async def test_start_family_refuses_a_changed_audience(registered: Store) -> None:
    versions = await _versions(registered)
    longer = Audience("thermostat", "cwt", 2 * ACCESS_LIFETIME, T0)
    await registered.update_audience(
        "thermostat", lambda _a: RegistryChange(longer, "audience.changed"), "operator", T0 + 1
    )
    family, digest, access = _family(), _digest(), _access()
    assert await registered.start_family(family, digest, access, versions) is False
    await _nothing_written(registered, family, digest, access)


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE clients SET scope = 'temp:read temp:write admin' WHERE client_id = 'sensor-1'",
        "UPDATE audiences SET lifetime = 315360000 WHERE audience_id = 'thermostat'",
    ],
    ids=["client", "audience"],
)
async def test_a_row_edited_without_the_master_key_stops_the_writes_resting_on_it(
    registered: Store, backend: Backend, edit: str
) -> None:
    """The row keeps its MAC column, so only its MAC check tells: grants and refreshes that
    rested on it just before (the store has seen it verify) are refused from the next one on,
    and work again once it is as it was (rows.VerifiedRows)."""
    versions = await _versions(registered)
    family, d0, _ = await _start(registered)
    assert await registered.start_family(_family(), _digest(), _access(), versions) is True
    assert await _rotate(registered, d0, d1 := _digest(), T0 + 1) == "rotated"
    (row,) = await backend.query(
        "SELECT scope, lifetime FROM clients, audiences"
        " WHERE client_id = 'sensor-1' AND audience_id = 'thermostat'"
    )

    await backend.execute(edit)
    started, digest, access = _family(), _digest(), _access()
    assert await registered.start_family(started, digest, access, versions) is False
    await _nothing_written(registered, started, digest, access)
    minter = Minter()

    def rests_on_both(family: RefreshFamily) -> Minted[IssuedAccess]:
        return replace(minter(family), registry=versions)

    assert await _rotate(registered, d1, _digest(), T0 + 2, mint=rests_on_both) == "stale"
    assert await backend.unspent_digests(family.family_id) == [d1]

    await backend.execute("UPDATE clients SET scope = $1 WHERE client_id = 'sensor-1'", row[0])
    await backend.execute(
        "UPDATE audiences SET lifetime = $1 WHERE audience_id = 'thermostat'", row[1]
    )
    assert await registered.start_family(_family(), _digest(), _access(), versions) is True


class Refuser:
    """A mint that refuses (a wider scope, say): a value for the caller, nothing to store."""

    def __init__(self, registry: RegistryVersions = UNCHECKED) -> None:
        self.registry = registry
        self.calls = 0

    def __call__(self, family: RefreshFamily) -> Minted[str]:
        self.calls += 1
        return Minted("refused: wider scope", None, self.registry)


async def _unchanged_after(store: Store, family: RefreshFamily, presented: bytes) -> None:
    """The refresh wrote nothing: its successor is unknown, last_used_at did not move, the
    presented token is as it was (it rotates now, as a live one; not "grace")."""
    listed = {f.family_id: f for f in await store.list_families("sensor-1", T0 + 11)}
    assert listed[family.family_id].last_used_at == T0
    assert await _rotate(store, presented, _digest(), T0 + 12) == "rotated"


async def test_a_refused_mint_writes_nothing(registered: Store, backend: Backend) -> None:
    family, d0, _ = await _start(registered)
    successor, refuser = _digest(), Refuser()

    outcome = await registered.rotate_refresh(
        d0,
        successor,
        client_id="sensor-1",
        now=T0 + 10,
        grace=GRACE,
        idle_timeout=IDLE,
        mint=refuser,
    )

    assert outcome.status == "refused" and refuser.calls == 1
    assert outcome.minted == "refused: wider scope"
    assert outcome.family is not None and outcome.family.family_id == family.family_id
    assert await backend.unspent_digests(family.family_id) == [d0]
    assert await _rotate(registered, successor, _digest(), T0 + 11) == "unknown"
    await _unchanged_after(registered, family, d0)


async def test_a_stale_registry_refresh_writes_nothing(registered: Store, backend: Backend) -> None:
    family, d0, _ = await _start(registered)
    versions = await _versions(registered)
    assert await registered.disable_client("sensor-1", T0 + 1, "operator")

    # Stale by the versions the request was decided from, or by those the mint used.
    for registry, mint_registry in ((versions, UNCHECKED), (UNCHECKED, versions)):
        successor, mint = _digest(), Minter()
        outcome = await registered.rotate_refresh(
            d0,
            successor,
            client_id="sensor-1",
            now=T0 + 10,
            grace=GRACE,
            idle_timeout=IDLE,
            mint=lambda f, mint=mint, r=mint_registry: replace(mint(f), registry=r),
            registry=registry,
        )
        assert outcome.status == "stale" and outcome.minted is None
        assert len(mint.issued) == 1
        assert await registered.token_status(mint.issued[0].token_hash) is None
        assert await backend.unspent_digests(family.family_id) == [d0]
        assert await _rotate(registered, successor, _digest(), T0 + 11) == "unknown"
    await _unchanged_after(registered, family, d0)


async def test_a_refused_or_stale_grace_refresh_keeps_the_successor_live(
    registered: Store, backend: Backend
) -> None:
    family, d0, _ = await _start(registered)
    d1 = _digest()
    assert await _rotate(registered, d0, d1, T0 + 10) == "rotated"
    stale = RegistryVersions((("sensor-1", b"not its mac"),))

    for mint, status in ((Refuser(), "refused"), (Refuser(stale), "stale")):
        outcome = await registered.rotate_refresh(
            d0,
            _digest(),
            client_id="sensor-1",
            now=T0 + 11,
            grace=GRACE,
            idle_timeout=IDLE,
            mint=mint,
        )
        assert outcome.status == status and mint.calls == 1

    # Neither attempt spent d1: it is the one live token, and it rotates.
    assert await backend.unspent_digests(family.family_id) == [d1]
    assert await _rotate(registered, d1, _digest(), T0 + 12) == "rotated"


async def test_kill_families_counts_and_revokes(registered: Store) -> None:
    now = T0 + 50
    _, d_a, a_a = await _start(registered)
    _, d_b, a_b = await _start(registered, _family(now=T0 + 1))
    other, d_other, a_other = await _start(registered, _family("sensor-2", now=T0 + 2))
    rotated = Minter()
    d_a1 = _digest()
    assert await _rotate(registered, d_a, d_a1, T0 + 10, mint=rotated) == "rotated"
    before = await registered.change_counters()

    assert await registered.kill_families("sensor-1", "revoked by operator", now, "operator") == 2

    assert (await registered.change_counters()).revocations > before.revocations
    assert set(await _listed(registered)) == {
        a_a.token_hash,
        a_b.token_hash,
        rotated.issued[0].token_hash,
    }
    assert await _live_ids(registered, now) == {other.family_id}
    assert await _rotate(registered, d_a1, _digest(), now + 1) == "dead"
    assert await _rotate(registered, d_b, _digest(), now + 1) == "dead"
    assert await _rotate(registered, d_other, _digest(), now + 1, client_id="sensor-2") == (
        "rotated"
    )
    assert a_other.token_hash not in await _listed(registered)
    # Already dead families are not counted again.
    assert await registered.kill_families("sensor-1", "again", now + 2, "operator") == 0
    assert await registered.kill_families("no-such-client", "none", now + 2, "operator") == 0


# -- registry lifecycle (issue 18): update and remove, with their families ------------------------


def _events(entries: Any, seq: int) -> list[tuple[str, str, str]]:
    return [(e.event.actor, e.event.event, e.event.subject) for e in entries if e.seq > seq]


async def _newest_seq(store: Store) -> int:
    return (await store.audit_entries(last=1))[0].seq


async def test_update_client_stores_the_change_and_kills_the_families_it_names(
    registered: Store,
) -> None:
    bound_key = {1: 2, -1: 1, -2: b"x" * 32, -3: b"y" * 32}
    kept, _, kept_access = await _start(registered)
    doomed, d_doomed, doomed_access = await _start(registered, _family(cnf=bound_key))
    seq = await _newest_seq(registered)

    def disable(client: Client) -> RegistryChange[Client]:
        return RegistryChange(
            replace(client, disabled=True),
            "client.disabled",
            {"revoke": True},
            kill=lambda family: family.cnf == bound_key,
            kill_reason="test",
        )

    result = await registered.update_client("sensor-1", disable, "operator:alice", T0 + 5)

    assert result is not None and result[1] == 1 and result[0].disabled
    assert (await registered.get_client("sensor-1")) == result[0]
    assert (await registered.registry_report()).ok
    assert await _listed(registered) == [doomed_access.token_hash]
    assert await _live_ids(registered, T0 + 5) == {kept.family_id}
    assert await _rotate(registered, d_doomed, _digest(), T0 + 6) == "dead"
    assert _events(await registered.audit_entries(), seq) == [
        ("operator:alice", "family.killed", doomed.family_id.hex()),
        ("operator:alice", "client.disabled", "sensor-1"),
    ]
    assert kept_access.token_hash not in await _listed(registered)
    assert await registered.update_client("no-such", disable, "operator", T0) is None


async def test_a_refused_change_changes_nothing(registered: Store) -> None:
    await _start(registered)
    before = (await registered.get_client("sensor-1"), len(await registered.audit_entries()))

    def refuse(client: Client) -> RegistryChange[Client]:
        raise OperatorError("no")

    with pytest.raises(OperatorError):
        await registered.update_client("sensor-1", refuse, "operator", T0 + 1)
    assert (await registered.get_client("sensor-1"), len(await registered.audit_entries())) == (
        before
    )


async def test_a_rotated_secret_round_trips(registered: Store) -> None:
    def rotate(client: Client) -> RegistryChange[Client]:
        rotated = replace(
            client,
            secret_digest=b"\x01" * 32,
            previous_secret_digest=client.secret_digest,
            previous_secret_until=T0 + 60,
        )
        return RegistryChange(rotated, "client.secret_rotated")

    result = await registered.update_client("sensor-1", rotate, "operator", T0)
    assert result is not None
    stored = await registered.get_client("sensor-1")
    assert stored == result[0] and stored.previous_secret_until == T0 + 60  # type: ignore[union-attr]
    assert stored.previous_secret_valid(T0 + 59) and not stored.previous_secret_valid(T0 + 60)  # type: ignore[union-attr]
    assert (await registered.registry_report()).ok


async def test_remove_client_kills_its_families_and_keeps_its_trl_entries(
    backend: Backend, registered: Store
) -> None:
    _, _, access = await _start(registered)
    await _start(registered, _family("sensor-2"))
    seq = await _newest_seq(registered)

    assert await registered.remove_client("sensor-1", "operator:bob", T0 + 5) == 1

    assert await registered.get_client("sensor-1") is None
    assert [c.client_id for c in await registered.list_clients()] == ["sensor-2"]
    assert await _listed(registered) == [access.token_hash]
    assert (await registered.trl("sensor-1"))[0] == [access.token_hash]
    assert [e[1] for e in _events(await registered.audit_entries(), seq)] == [
        "family.killed",
        "client.removed",
    ]
    assert await registered.remove_client("sensor-1", "operator", T0 + 6) is None
    assert verify_log(backend.master_key.audit_mac, await registered.audit_snapshot()).ok


async def test_a_token_that_outlives_its_family_is_revoked_with_it(registered: Store) -> None:
    """A refresh just before a family's absolute end mints a token with the audience's full
    lifetime, so it outlives the family: killing the client's families (disable --revoke,
    tokens revoke --client) and removing the client must still revoke it."""
    ends = T0 + 100
    _, _, outliving = await _start(registered, _family(lifetime=100), _access(exp=ends + 500))
    _, _, other = await _start(registered, _family("sensor-2", lifetime=100), _access("sensor-2"))
    after_the_family = ends + 10

    assert (
        await registered.kill_families(
            "sensor-1", "revoked by operator", after_the_family, "operator"
        )
        == 1
    )
    assert await _listed(registered) == [outliving.token_hash]
    assert await registered.remove_client("sensor-2", "operator", after_the_family) == 1
    assert set(await _listed(registered)) == {outliving.token_hash, other.token_hash}


async def test_update_audience_is_sealed_and_heard(registered: Store) -> None:
    before = await registered.change_counters()

    def longer(audience: Audience) -> RegistryChange[Audience]:
        return RegistryChange(replace(audience, lifetime=1200), "audience.changed")

    changed = await registered.update_audience("thermostat", longer, "operator", T0 + 1)

    assert changed is not None and changed.lifetime == 1200
    assert await registered.get_audience("thermostat") == changed
    assert (await registered.registry_report()).ok
    assert (await registered.change_counters()).keys > before.keys
    assert await registered.update_audience("nope", longer, "operator", T0) is None


async def test_remove_audience_is_refused_while_clients_name_it(registered: Store) -> None:
    await registered.add_audience(Audience("valve", "cwt", 600, T0), "operator")
    await registered.add_client(_secret_client("valve-client", ("valve",)), "operator")
    family, _, access = await _start(registered, replace(_family("valve-client"), audience="valve"))
    other, _, _ = await _start(registered)

    with pytest.raises(OperatorError, match="2 clients still name audience thermostat"):
        await registered.remove_audience("thermostat", "operator", T0 + 1)
    assert await registered.get_audience("thermostat") is not None
    assert await registered.remove_client("valve-client", "operator", T0 + 1) == 1
    assert await registered.remove_audience("valve", "operator", T0 + 2) == 0

    assert await registered.get_audience("valve") is None
    assert await _listed(registered) == [access.token_hash]
    assert await _live_ids(registered, T0 + 2) == {other.family_id}


async def test_token_hashes_between(registered: Store) -> None:
    hashes = [b"\x01\x42" + bytes([n]) + bytes(30) for n in (1, 2, 3)]
    for token_hash in hashes:
        await _start(registered, access=IssuedAccess(token_hash, "sensor-1", T0 + 600))
    low, high = b"\x01\x42" + bytes(31), b"\x01\x42" + b"\xff" * 31
    assert await registered.token_hashes_between(low, high, 2) == hashes[:2]
    assert await registered.token_hashes_between(hashes[2], hashes[2], 2) == [hashes[2]]
    assert await registered.token_hashes_between(b"\x02", b"\x03", 2) == []


# -- concurrency: two instances on the same storage (two processes) --------------------------------


async def _race(
    stores: list[Store], digest: bytes, now: int, grace: int, calls: int = 20
) -> tuple[list[str], list[bytes]]:
    successors = [_digest() for _ in range(calls)]
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(
                stores[i % len(stores)].rotate_refresh(
                    digest,
                    successors[i],
                    client_id="sensor-1",
                    now=now,
                    grace=grace,
                    idle_timeout=IDLE,
                    mint=Minter(),
                )
                for i in range(calls)
            )
        ),
        timeout=60,
    )
    return [o.status for o in outcomes], successors


async def test_concurrent_rotation_without_grace_has_one_winner(
    backend: Backend, registered: Store
) -> None:
    stores = [registered, await backend.open_store()]
    for round_ in range(20):
        now = T0 + 10 + round_
        family, d0, _ = await _start(stores[round_ % 2], _family(now=now))

        statuses, _ = await _race(stores, d0, now, grace=0)

        assert statuses.count("rotated") == 1, statuses
        # Every loser is a reuse (the first one kills the family, the rest find it dead).
        assert set(statuses) - {"rotated"} <= {"reused", "dead"}, statuses
        assert "reused" in statuses
        assert family.family_id not in await _live_ids(stores[1], now)
        assert await backend.unspent_refresh_tokens(family.family_id) == 0


async def test_concurrent_rotation_with_grace_leaves_one_live_token(
    backend: Backend, registered: Store
) -> None:
    stores = [registered, await backend.open_store()]
    family, d0, _ = await _start(registered)
    now = T0 + 10

    statuses, successors = await _race(stores, d0, now, grace=30)

    assert statuses.count("rotated") == 1, statuses
    assert statuses.count("grace") == len(statuses) - 1, statuses
    assert await backend.unspent_refresh_tokens(family.family_id) == 1
    # The one live token is one of the successors and it works; any other one is a reuse.
    [live] = await backend.unspent_digests(family.family_id)
    assert live in successors
    assert await _rotate(registered, live, _digest(), now + GRACE + 1, grace=30) == "rotated"
    spent = next(s for s in successors if s != live)
    assert await _rotate(registered, spent, _digest(), now + GRACE + 2, grace=30) == "reused"
    assert family.family_id not in await _live_ids(registered, now + GRACE + 2)


# -- audit chain, key updates and the TRL across instances ----------------------------------------


async def test_audit_chain_stays_whole_under_concurrent_appends(
    backend: Backend, registered: Store
) -> None:
    other = await backend.open_store()
    events = [AuditEvent(T0 + n, "operator", "test.event", f"subject-{n}") for n in range(20)]
    await asyncio.gather(
        *((registered if n % 2 else other).append_audit([event]) for n, event in enumerate(events))
    )
    entries = await registered.audit_entries()
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert {e.event.subject for e in entries} >= {e.subject for e in events}
    report = verify_chain(backend.master_key.audit_mac, entries)
    assert report.ok and report.entries == len(entries)
    assert [e.seq for e in await other.audit_entries(last=3)] == [e.seq for e in entries[-3:]]
    # And the head moved with every append: the chain ends where it says.
    assert verify_log(backend.master_key.audit_mac, await other.audit_snapshot()) == report


async def test_concurrent_key_updates_on_two_instances_apply_once(backend: Backend) -> None:
    """Two instances both find a rotation due: the store serialises the transitions, and the
    second sees the first's result (nothing left to do)."""
    stores = [await backend.open_store(), await backend.open_store()]
    await _save(stores[0], KeyRing.initial(CoseAlg.ES256, T0).keys)

    def rotate_if_due(current: list[SigningKey]) -> list[SigningKey]:
        ring = KeyRing(tuple(current))
        if ring.active.activated_at != T0:  # already rotated by the other instance
            return []
        return ring.rotate(T0 + 10, POLICY)[1]

    results = await asyncio.gather(
        *(store.update_keys(rotate_if_due, "scheduler", T0 + 10) for store in stores)
    )
    assert sorted(len(r) for r in results) == [0, 3]
    states = sorted(k.state.value for k in await stores[1].load_keys())
    assert states == ["active", "next", "retiring"]


async def test_trl_updates_are_numbered_without_gaps_across_instances(
    backend: Backend, registered: Store
) -> None:
    other = await backend.open_store()
    started = [await _start(registered) for _ in range(10)]
    results = await asyncio.gather(
        *(
            (registered if n % 2 else other).revoke_access(access.token_hash, None, T0 + 1, "x")
            for n, (_, _, access) in enumerate(started)
        )
    )
    assert all(results)
    hashes, first, last = await other.trl()
    assert (first, last) == (1, 10) and len(hashes) == 10
    updates = await registered.trl_updates(1, 10)
    assert [u.seq for u in updates] == list(range(10, 0, -1))
    assert {h for u in updates for h in u.added} == set(hashes)
    # A second revocation of the same token changes nothing.
    assert not await other.revoke_access(started[0][2].token_hash, None, T0 + 2, "x")
    assert (await registered.trl())[2] == 10


async def test_revoke_access_respects_the_owner(registered: Store) -> None:
    _, _, mine = await _start(registered, _family("sensor-2"), _access("sensor-2"))
    assert not await registered.revoke_access(mine.token_hash, "sensor-1", T0, "client sensor-1")
    assert await registered.token_status(mine.token_hash) == "live"
    assert await registered.revoke_access(mine.token_hash, "sensor-2", T0, "client sensor-2")
    assert await registered.token_status(mine.token_hash) == "revoked"
    assert await registered.token_status(b"\x01" + bytes(32)) is None


# -- migration (SQLite only) --------------------------------------------------------------------


async def test_a_version_1_database_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    """A data directory made by coap-auth 0.1 opens with today's store, its keys and
    registrations intact, and gains the new tables."""
    master_key = MasterKey(b"\x05" * 32)
    ring = KeyRing.initial(CoseAlg.ES256, T0)
    path = tmp_path / DB_FILE
    schema = (Path(__file__).parent.parent / "vectors" / "sqlite_schema_v1.sql").read_text()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(schema)
        conn.execute("INSERT INTO audiences VALUES ('thermostat', 'cwt', 600, ?)", (T0,))
        conn.execute(
            "INSERT INTO clients VALUES ('sensor-1', '[\"thermostat\"]', 'temp:read', ?, NULL,"
            " 1, ?)",
            (b"d" * 32, T0),
        )
        for key in ring.keys:
            der = key.private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            conn.execute(
                "INSERT INTO signing_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (
                    key.kid,
                    int(key.alg),
                    key.state.value,
                    master_key.encrypt(der, key.kid),
                    key.created_at,
                    key.activated_at,
                ),
            )
        conn.execute("UPDATE change_feed SET counter = 7")
        # A family killed for reuse under version 1: its access token is revoked.
        conn.execute(
            "INSERT INTO refresh_families VALUES (?, 'sensor-1', 'thermostat', 'temp:read',"
            " NULL, ?, ?, ?, ?, 'refresh token reused')",
            (b"fam", T0, T0, T0 + LIFETIME, T0 + 5),
        )
        conn.execute(
            "INSERT INTO access_tokens VALUES (?, ?, 'sensor-1', ?, ?)",
            (b"\x01" + bytes(32), b"fam", T0 + 600, T0 + 5),
        )

    store = SqliteStore(path, master_key)
    await store.open()
    try:
        loaded = {k.kid: k for k in await store.load_keys()}
        assert loaded == {k.kid: k for k in ring.keys}  # family "default", no end dates
        assert _raw_private(loaded[ring.active.kid]) == _raw_private(ring.active)
        (audience,) = await store.list_audiences()
        assert audience.key_family == "default" and audience.introspect_secret_digest is None
        assert (await store.change_counters()).keys == 7
        # Its rows got their MACs in the migration: they are used, and verify.
        assert await store.get_client("sensor-1") == Client(
            "sensor-1", ("thermostat",), ("temp:read",), T0, b"d" * 32, None, True
        )
        assert (await store.registry_report()) == RegistryReport(1, 1)
        # Version 1 kept no audit log: the migration starts it, and it verifies to its head.
        (migrated,) = await store.audit_entries()
        assert (migrated.event.event, migrated.event.details) == (
            "store.migrated",
            {"from": 1, "to": SCHEMA_VERSION},
        )
        assert verify_log(master_key.audit_mac, await store.audit_snapshot()).ok
        # Diff readers see what version 1 revoked as one update, and its expiry later.
        assert await store.trl() == ([b"\x01" + bytes(32)], 1, 1)
        (update,) = await store.trl_updates(1, 1)
        assert update.added == (b"\x01" + bytes(32),) and update.removed == ()
        assert (await store.change_counters()).revocations == 1
        assert await store.sweep_expired(T0 + 600, keep_updates=32) == 1
        await _save(store, ring.rotate(T0 + 10, POLICY)[1])  # the new columns take writes
        assert len(await store.audit_entries()) == 1 + 3
        assert verify_log(master_key.audit_mac, await store.audit_snapshot()).ok
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
