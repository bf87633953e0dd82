"""The store's decisions (coap_auth.store.decisions), pure: each rule on its own, without a store.

The contract suite (test_store_contract.py) shows both stores follow them; these show the rules.
"""

from __future__ import annotations

import pytest

from coap_auth.store.audit import SERVICE_ACTOR, AuditName
from coap_auth.store.decisions import (
    EXPIRY_END,
    REUSE_KILL,
    AccessRecord,
    FamilyKill,
    KillReason,
    PresentedToken,
    RefreshPlan,
    audience_added_event,
    client_added_event,
    delistable,
    disable_event,
    forgettable,
    kill_events,
    may_revoke,
    plan_refresh,
    registry_current,
    removal_event,
    revocable,
    revocation_event,
    settle_refresh,
    unminted,
    updates_kept,
)
from coap_auth.store.records import (
    Audience,
    Client,
    IssuedAccess,
    Minted,
    RefreshFamily,
    RefreshOutcome,
    RefreshStatus,
    RegistryVersions,
)

NOW = 1_000_000
GRACE, IDLE = 30, 3600
LIVE = PresentedToken(spent_at=None, successor_unspent=False)


def _family(**changes: object) -> RefreshFamily:
    fields: dict[str, object] = {
        "family_id": b"f" * 16,
        "client_id": "sensor-1",
        "audience": "thermostat",
        "scope": "temp:read",
        "created_at": NOW - 100,
        "last_used_at": NOW - 10,
        "expires_at": NOW + 10_000,
    }
    fields.update(changes)
    return RefreshFamily(**fields)  # type: ignore[arg-type]


def _plan(token: PresentedToken | None, family: RefreshFamily | None, client: str = "sensor-1"):  # type: ignore[no-untyped-def]
    return plan_refresh(token, family, client_id=client, now=NOW, grace=GRACE, idle_timeout=IDLE)


# -- the refresh state machine ------------------------------------------------------------


def test_a_live_token_rotates() -> None:
    plan = _plan(LIVE, _family())
    assert plan.status is RefreshStatus.ROTATED
    assert plan.rotates and not plan.spends_successor and plan.kill is None


@pytest.mark.parametrize(
    ("token", "family", "client"),
    [
        (None, None, "sensor-1"),
        (LIVE, None, "sensor-1"),
        # Another client's live token is as unknown as a made-up one.
        (LIVE, _family(), "sensor-2"),
    ],
    ids=["no such token", "no family", "another client's"],
)
def test_unknown_tokens_change_nothing(
    token: PresentedToken | None, family: RefreshFamily | None, client: str
) -> None:
    plan = _plan(token, family, client)
    assert plan.status is RefreshStatus.UNKNOWN
    assert not plan.rotates and plan.kill is None


def test_a_killed_family_is_dead_even_for_a_live_token() -> None:
    plan = _plan(LIVE, _family(killed_at=NOW - 5, kill_reason="x"))
    assert plan.status is RefreshStatus.DEAD and plan.kill is None and not plan.rotates


@pytest.mark.parametrize(
    "family",
    [_family(expires_at=NOW), _family(last_used_at=NOW - IDLE)],
    ids=["absolute expiry reached", "idle timeout reached"],
)
def test_expiry_ends_the_family_without_revoking(family: RefreshFamily) -> None:
    plan = _plan(LIVE, family)
    assert plan.status is RefreshStatus.EXPIRED
    assert plan.kill == EXPIRY_END and plan.kill is not None
    assert not plan.kill.revoke_access and not plan.rotates


def test_one_second_before_expiry_still_rotates() -> None:
    assert _plan(LIVE, _family(expires_at=NOW + 1, last_used_at=NOW - IDLE + 1)).rotates


def test_a_spent_token_within_grace_with_its_successor_unused_is_grace() -> None:
    plan = _plan(PresentedToken(spent_at=NOW - GRACE + 1, successor_unspent=True), _family())
    assert plan.status is RefreshStatus.GRACE and plan.rotates and plan.spends_successor


@pytest.mark.parametrize(
    "token",
    [
        PresentedToken(spent_at=NOW - GRACE, successor_unspent=True),
        PresentedToken(spent_at=NOW - 1, successor_unspent=False),
    ],
    ids=["grace over", "successor already used"],
)
def test_any_other_reuse_is_theft_and_kills_with_revocation(token: PresentedToken) -> None:
    plan = _plan(token, _family())
    assert plan.status is RefreshStatus.REUSED and not plan.rotates
    assert plan.kill == REUSE_KILL
    assert plan.kill is not None and plan.kill.revoke_access
    assert plan.kill.reason == KillReason.REUSED and plan.kill.actor == SERVICE_ACTOR


# -- kills, revocation, sweep -------------------------------------------------------------


def _record(h: bytes, **changes: object) -> AccessRecord:
    fields: dict[str, object] = {
        "token_hash": h,
        "family_id": b"f" * 16,
        "client_id": "sensor-1",
        "audience": "thermostat",
        "exp": NOW + 60,
    }
    fields.update(changes)
    return AccessRecord(**fields)  # type: ignore[arg-type]


def test_a_kill_revokes_only_unrevoked_unexpired_tokens_in_hash_order() -> None:
    records = [
        _record(b"\x03"),
        _record(b"\x01"),
        _record(b"\x02", revoked_at=NOW - 1),
        _record(b"\x04", exp=NOW),
    ]
    chosen = revocable(records, NOW)
    assert list(chosen) == [b"\x01", b"\x03"]
    assert chosen[b"\x01"] == ("sensor-1", "thermostat")


def test_kill_events_name_what_the_kill_put_on_the_list() -> None:
    family, other = _family(), _family(family_id=b"g" * 16)
    records = [_record(b"\x01"), _record(b"\x02", family_id=other.family_id, exp=NOW + 5)]
    kill = FamilyKill("client disabled", "operator alice")
    events = kill_events([family, other], kill, records, {b"\x02"}, NOW)
    assert [e.subject for e in events] == [family.family_id.hex(), other.family_id.hex()]
    assert all(e.event == AuditName.FAMILY_KILLED and e.actor == "operator alice" for e in events)
    assert events[0].details["revoked_access_tokens"] == 0
    assert events[1].details["access_tokens"] == {"02": NOW + 5}
    ended = kill_events([family], EXPIRY_END, records, set(), NOW)[0]
    assert "access_tokens" not in ended.details and ended.details["reason"] == "expired"


@pytest.mark.parametrize(
    ("record", "client", "allowed"),
    [
        (_record(b"\x01"), "sensor-1", True),
        (_record(b"\x01"), None, True),  # the operator revokes any
        (_record(b"\x01"), "sensor-2", False),  # RFC 7009 §2.1: only one's own
        (_record(b"\x01", revoked_at=NOW - 1), "sensor-1", False),
        (_record(b"\x01", exp=NOW), "sensor-1", False),
        (None, "sensor-1", False),
    ],
    ids=["own", "operator", "foreign", "already revoked", "expired", "unknown"],
)
def test_who_may_revoke_what(
    record: AccessRecord | None, client: str | None, allowed: bool
) -> None:
    assert may_revoke(record, client, NOW) is allowed


def test_a_revocation_event_records_the_exp() -> None:
    event = revocation_event(_record(b"\xab"), "client sensor-1", NOW)
    assert (event.event, event.subject, event.details) == (
        AuditName.TOKEN_REVOKED,
        "ab",
        {"client_id": "sensor-1", "exp": NOW + 60},
    )


def test_the_sweep_delists_expired_revoked_tokens_in_revocation_order() -> None:
    records = [
        _record(b"\x01", revoked_at=NOW - 5, exp=NOW),
        _record(b"\x02", revoked_at=NOW - 9, exp=NOW - 1),
        _record(b"\x03", revoked_at=NOW - 9, exp=NOW + 1),  # still valid: stays listed
        _record(b"\x04", revoked_at=NOW - 9, exp=NOW - 1, delisted_at=NOW - 1),
        _record(b"\x05", exp=NOW - 1),  # never revoked: forgotten, not delisted
    ]
    assert list(delistable(records, NOW)) == [b"\x02", b"\x01"]
    assert forgettable(records, NOW) == [b"\x05"]


@pytest.mark.parametrize(("asked", "kept"), [(0, 1), (1, 1), (-3, 1), (32, 32)])
def test_every_history_keeps_its_newest_update(asked: int, kept: int) -> None:
    assert updates_kept(asked) == kept


# -- a grant's registry view --------------------------------------------------------------


def test_a_grant_is_current_only_while_every_row_it_used_is_unchanged() -> None:
    versions = RegistryVersions(clients=(("sensor-1", b"m1"),), audiences=(("rs", b"m2"),))
    assert registry_current(versions, {"sensor-1": b"m1"}, {"rs": b"m2"})
    assert not registry_current(versions, {"sensor-1": b"changed"}, {"rs": b"m2"})
    assert not registry_current(versions, {"sensor-1": None}, {"rs": b"m2"})  # removed
    assert not registry_current(versions, {"sensor-1": b"m1"}, {})


def test_an_absent_row_is_expected_absent() -> None:
    absent = RegistryVersions(audiences=(("gone", b""),))
    assert registry_current(absent, {}, {"gone": None})
    assert not registry_current(absent, {}, {"gone": b"added meanwhile"})
    assert registry_current(RegistryVersions(), {}, {})


# -- registry audit events -------------------------------------------------------------------


def test_registry_events_name_what_changed_and_never_a_secret() -> None:
    audience = Audience("thermostat", "cwt", 600, NOW, profile="bearer")
    client = Client("sensor-1", ("thermostat",), ("r", "w"), NOW, secret_digest=b"\x01" * 32)
    added = audience_added_event(audience, "operator alice")
    assert (added.at, added.actor, added.event, added.subject) == (
        NOW,
        "operator alice",
        AuditName.AUDIENCE_ADDED,
        "thermostat",
    )
    assert added.details == {"token_format": "cwt", "key_family": "default", "profile": "bearer"}
    joined = client_added_event(client, "operator alice")
    assert joined.event == AuditName.CLIENT_ADDED and joined.subject == "sensor-1"
    assert joined.details == {"audiences": ["thermostat"], "scope": "r w", "auth": "secret"}
    assert (b"\x01" * 32).hex() not in joined.details_json()
    gone = removal_event(AuditName.CLIENT_REMOVED, "sensor-1", 3, "operator", NOW + 1)
    assert (gone.event, gone.details, gone.at) == (
        AuditName.CLIENT_REMOVED,
        {"killed_families": 3},
        NOW + 1,
    )
    off = disable_event("sensor-1", "operator", NOW + 2)
    assert (off.event, off.subject, dict(off.details)) == (
        AuditName.CLIENT_DISABLED,
        "sensor-1",
        {},
    )


def test_a_refresh_settles_stale_then_refused_then_as_planned() -> None:
    family = _family()
    rotated, grace = RefreshPlan(RefreshStatus.ROTATED), RefreshPlan(RefreshStatus.GRACE)
    access = IssuedAccess(b"\x01", "sensor-1", NOW + 60, "thermostat")
    made, refused = Minted("token", access), Minted("no", None)
    assert settle_refresh(rotated, family, made, False).status is RefreshStatus.STALE
    assert settle_refresh(rotated, family, refused, False).status is RefreshStatus.STALE
    outcome = settle_refresh(rotated, family, refused, True)
    assert (outcome.status, outcome.minted) == (RefreshStatus.REFUSED, "no")
    outcome = settle_refresh(grace, family, made, True)
    assert (outcome.status, outcome.family, outcome.minted) == (
        RefreshStatus.GRACE,
        family,
        "token",
    )
    assert unminted(rotated, family) is None
    assert unminted(RefreshPlan(RefreshStatus.UNKNOWN), family) == RefreshOutcome(
        RefreshStatus.UNKNOWN
    )
    dead = unminted(RefreshPlan(RefreshStatus.DEAD), family)
    assert dead is not None and (dead.status, dead.family) == (RefreshStatus.DEAD, family)
