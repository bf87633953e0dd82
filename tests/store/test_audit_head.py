"""The audit log's head (issue 13), on every backend: it moves with every append in the same
transaction, so entries cut from the end of the log, or all of them, or the head itself going
missing, are reported by `verify_log`; and later appends do not paper over a cut.
"""

from __future__ import annotations

import pytest

from coap_auth.store import Audience, Client, Store
from coap_auth.store.audit import AuditEvent, verify_log
from tests.store.conftest import Backend

T0 = 1_700_000_000


@pytest.fixture
async def store(backend: Backend) -> Store:
    """A store with six entries in its log."""
    store = await backend.open_store()
    await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
    for n in range(1, 6):
        await store.add_client(
            Client(f"sensor-{n}", ("thermostat",), ("temp:read",), T0, secret_digest=bytes(32)),
            "operator",
        )
    return store


async def _verify(backend: Backend, store: Store) -> tuple[bool, int | None, str | None]:
    report = verify_log(backend.master_key.audit_mac, await store.audit_snapshot())
    return report.ok, report.broken_at, report.reason


async def test_a_whole_log_verifies_to_its_head(backend: Backend, store: Store) -> None:
    assert await _verify(backend, store) == (True, None, None)
    assert (await backend.query("SELECT seq FROM audit_head"))[0][0] == 6


async def test_entries_cut_from_the_end_are_reported(backend: Backend, store: Store) -> None:
    await backend.execute("DELETE FROM audit_log WHERE seq > 4")
    assert await _verify(backend, store) == (False, 5, "entries 5-6 removed; the head records 6")
    # A later append continues from the head, leaving the gap where it was.
    await store.append_audit([AuditEvent(T0 + 1, "operator", "test.event", "x")])
    assert [e.seq for e in await store.audit_entries()] == [1, 2, 3, 4, 7]
    assert await _verify(backend, store) == (False, 7, "expected entry 5")


async def test_a_log_emptied_is_reported(backend: Backend, store: Store) -> None:
    await backend.execute("DELETE FROM audit_log")
    assert await _verify(backend, store) == (
        False,
        1,
        "all 6 entries removed; the head records 6",
    )


async def test_a_missing_head_is_reported_and_not_recreated(backend: Backend, store: Store) -> None:
    await backend.execute("DELETE FROM audit_head")
    await store.append_audit([AuditEvent(T0 + 1, "operator", "test.event", "x")])
    ok, broken_at, reason = await _verify(backend, store)
    assert (ok, broken_at) == (False, None)
    assert reason is not None and reason.startswith("its head is missing")
    assert len(await store.audit_entries()) == 7  # the store keeps working, and recording


async def test_a_new_store_has_an_empty_log_that_verifies(backend: Backend) -> None:
    store = await backend.open_store()
    assert await _verify(backend, store) == (True, None, None)
