"""The audit log through the real CLI: every key and admin action is recorded, and
`coap-auth audit verify` catches an edited, removed, reordered or forged entry, entries cut
from the end (or all of them), and a removed or forged head.

Tampering is done the way an attacker with the database file would: with sqlite3, directly.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from coap_auth.store import MasterKey
from coap_auth.store.audit import GENESIS, AuditEntry, AuditEvent, entry_mac, sealed_head
from coap_auth.store.registry_mac import EMPTY_REGISTRY
from coap_auth.store.revocation_audit import AccessRow, RevocationRows, revocation_report
from coap_auth.store.rows import audit_entry_from_row
from tests.processes import add_secret_client, cli_ok, run_cli
from tests.test_cli import keys_by_state

DB = "coap-auth.sqlite3"


SECRETS: list[str] = []


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with a history: keys created, an audience, a client, a forced rotation,
    a key revocation, a disabled client."""
    data_dir = tmp_path_factory.mktemp("audited") / "data"
    cli_ok("init", data_dir=data_dir)
    cli_ok("audiences", "add", "thermostat", "--lifetime", "600", data_dir=data_dir)
    SECRETS.append(add_secret_client(data_dir))
    cli_ok("keys", "rotate", "--force", data_dir=data_dir)
    (next_kid,) = keys_by_state(data_dir)["next"]
    cli_ok("keys", "revoke", next_kid, data_dir=data_dir)
    cli_ok("clients", "disable", "sensor-1", data_dir=data_dir)
    return data_dir


def tail(data_dir: Path) -> list[dict]:
    return json.loads(cli_ok("audit", "tail", "-n", "100", "--json", data_dir=data_dir))


def test_every_key_and_admin_action_is_recorded_in_order(audited: Path) -> None:
    events = [(e["actor"], e["event"]) for e in tail(audited)]
    assert events == [
        ("service", "key.created"),  # init: the active key...
        ("service", "key.created"),  # ...and its published successor
        ("operator", "audience.added"),
        ("operator", "client.added"),
        ("operator", "key.retired"),
        ("operator", "key.activated"),
        ("operator", "key.created"),
        ("operator", "key.revoked"),
        ("operator", "key.created"),  # a fresh next key replaces the revoked one
        ("operator", "client.disabled"),
    ]
    out = cli_ok("audit", "verify", data_dir=audited)
    assert out.startswith("audit log intact: 10 entries; head ")
    # No secret reaches the log: the client's entry says how it authenticates, nothing more.
    logged = json.dumps(tail(audited))
    assert SECRETS and all(secret not in logged for secret in SECRETS)
    assert "digest" not in logged
    short = cli_ok("audit", "tail", "-n", "2", data_dir=audited).splitlines()
    assert len(short) == 2 and "client.disabled" in short[-1]


def _edit(sql: str, *args: object) -> Callable[[sqlite3.Connection], None]:
    return lambda conn: conn.execute(sql, args)


def _swap(conn: sqlite3.Connection) -> None:
    rows = {r[0]: r[1:] for r in conn.execute("SELECT * FROM audit_log WHERE seq IN (3, 4)")}
    for seq, other in ((3, 4), (4, 3)):
        conn.execute(
            "UPDATE audit_log SET at = ?, actor = ?, event = ?, subject = ?, details = ?, mac = ?"
            " WHERE seq = ?",
            (*rows[other], seq),
        )


def _forge(conn: sqlite3.Connection) -> None:
    last = conn.execute("SELECT * FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    conn.execute(
        "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?)",
        (last[0] + 1, last[1], "operator", "client.added", "mallory", "{}", bytes(32)),
    )


@pytest.mark.parametrize(
    ("tamper", "broken_at"),
    [
        pytest.param(
            _edit("UPDATE audit_log SET subject = 'someone-else' WHERE seq = 4"), 4, id="edit"
        ),
        pytest.param(
            _edit("UPDATE audit_log SET details = '{}' WHERE seq = 8"), 8, id="edit-details"
        ),
        pytest.param(_edit("UPDATE audit_log SET at = at + 1 WHERE seq = 1"), 1, id="edit-time"),
        pytest.param(_edit("DELETE FROM audit_log WHERE seq = 5"), 6, id="delete"),
        pytest.param(_swap, 3, id="swap"),
        pytest.param(_edit("UPDATE audit_log SET seq = 99 WHERE seq = 2"), 3, id="renumber"),
        pytest.param(_forge, 11, id="append-forged"),
        pytest.param(_edit("DELETE FROM audit_log WHERE seq > 7"), 8, id="truncate"),
        pytest.param(_edit("DELETE FROM audit_log WHERE seq = 10"), 10, id="drop-newest"),
        pytest.param(_edit("DELETE FROM audit_log"), 1, id="delete-all"),
    ],
)
def test_audit_verify_detects_tampering(
    audited: Path,
    tmp_path: Path,
    tamper: Callable[[sqlite3.Connection], None],
    broken_at: int,
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(audited, data_dir)
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as conn, conn:
        tamper(conn)

    result = run_cli("audit", "verify", data_dir=data_dir)

    assert result.returncode == 2, result.stdout
    assert f"audit log broken at entry {broken_at}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_chain_is_keyed_by_the_master_key(audited: Path, tmp_path: Path) -> None:
    """Someone with the database but not the master key edits an entry and re-chains every
    MAC after it with a key of their own: verify still fails, at the edited entry."""
    data_dir = tmp_path / "data"
    shutil.copytree(audited, data_dir)
    forger = MasterKey(b"\x07" * 32)
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as conn, conn:
        conn.row_factory = sqlite3.Row
        conn.execute("UPDATE audit_log SET subject = 'mallory' WHERE seq = 4")
        previous = GENESIS
        for row in conn.execute("SELECT * FROM audit_log ORDER BY seq").fetchall():
            entry = audit_entry_from_row(row)
            previous = entry_mac(forger.audit_mac, previous, entry.seq, entry.event)
            conn.execute("UPDATE audit_log SET mac = ? WHERE seq = ?", (previous, entry.seq))

    result = run_cli("audit", "verify", data_dir=data_dir)

    assert result.returncode == 2
    assert "audit log broken at entry 1: MAC does not match" in result.stderr


def _tampered_copy(audited: Path, tmp_path: Path, *statements: str) -> Path:
    data_dir = tmp_path / "data"
    shutil.copytree(audited, data_dir)
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as conn, conn:
        for statement in statements:
            conn.execute(statement)
    return data_dir


def _verify_fails(data_dir: Path) -> str:
    result = run_cli("audit", "verify", data_dir=data_dir)
    assert result.returncode == 2, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_removed_entries_are_reported_with_what_the_head_records(
    audited: Path, tmp_path: Path
) -> None:
    data_dir = _tampered_copy(audited, tmp_path, "DELETE FROM audit_log WHERE seq > 7")
    assert "entries 8-10 removed; the head records 10" in _verify_fails(data_dir)


def test_deleting_every_entry_is_reported(audited: Path, tmp_path: Path) -> None:
    data_dir = _tampered_copy(audited, tmp_path, "DELETE FROM audit_log")
    assert "audit log broken at entry 1: all 10 entries removed" in _verify_fails(data_dir)


def test_entries_appended_after_a_cut_leave_the_gap_visible(audited: Path, tmp_path: Path) -> None:
    """New entries continue from the head, not from what is left of the log: a later action
    does not paper over the entries removed before it."""
    data_dir = _tampered_copy(audited, tmp_path, "DELETE FROM audit_log WHERE seq > 7")
    cli_ok("keys", "rotate", "--force", data_dir=data_dir)
    assert "audit log broken at entry 11: expected entry 8" in _verify_fails(data_dir)


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        pytest.param(
            ["DELETE FROM audit_head"], "audit log broken: its head is missing", id="head-deleted"
        ),
        pytest.param(
            ["DELETE FROM audit_log", "DELETE FROM audit_head"],
            "audit log broken: its head is missing",
            id="log-and-head-deleted",
        ),
        pytest.param(
            ["UPDATE audit_head SET seq = 7"],
            "audit log broken: its head does not verify",
            id="head-edited",
        ),
    ],
)
def test_a_missing_or_edited_head_is_reported(
    audited: Path, tmp_path: Path, statements: list[str], message: str
) -> None:
    data_dir = _tampered_copy(audited, tmp_path, *statements)
    assert message in _verify_fails(data_dir)


def test_an_empty_log_with_a_genuine_empty_head_is_still_reported(
    audited: Path, tmp_path: Path
) -> None:
    """Every entry deleted and the head put back to a genuine copy of the one a new store
    starts with: a store that holds keys and registrations cannot have an empty log."""
    data_dir = _tampered_copy(audited, tmp_path, "DELETE FROM audit_log")
    master_key = MasterKey((data_dir / "master.key").read_bytes())
    genesis = sealed_head(master_key.audit_mac, 0, GENESIS, EMPTY_REGISTRY)
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as conn, conn:
        conn.execute(
            "UPDATE audit_head SET seq = 0, last_mac = ?, mac = ?, registry = ?",
            (GENESIS, genesis.mac, EMPTY_REGISTRY),
        )
    assert (
        "audit log broken at entry 1: the log is empty, but the store holds keys"
        in _verify_fails(data_dir)
    )


def test_a_head_put_back_behind_the_log_is_reported(audited: Path, tmp_path: Path) -> None:
    """A genuine older head (as a copy of the database would hold) with the log left whole."""
    data_dir = _tampered_copy(audited, tmp_path)
    master_key = MasterKey((data_dir / "master.key").read_bytes())
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as conn, conn:
        (mac_5,) = conn.execute("SELECT mac FROM audit_log WHERE seq = 5").fetchone()
        (registry,) = conn.execute("SELECT registry FROM audit_head").fetchone()
        older = sealed_head(master_key.audit_mac, 5, mac_5, registry)
        conn.execute("UPDATE audit_head SET seq = 5, last_mac = ?, mac = ?", (mac_5, older.mac))
    assert "audit log broken at entry 6: the log runs past its head (5)" in _verify_fails(data_dir)


# -- revocations against the log (pure: coap_auth.store.revocation_audit) --------------------

NOW = 1_000
TH, OTHER, FAMILY = b"\x01" + bytes(range(32)), b"\x01" + bytes(32), bytes(range(16))


def _entry(seq: int, event: str, subject: bytes, **details: object) -> AuditEntry:
    return AuditEntry(seq, AuditEvent(NOW - 100, "service", event, subject.hex(), details), b"")


def _access(th: bytes, exp: int = NOW + 500, revoked: int | None = NOW - 100, **kw: object):
    row = {"family_id": FAMILY, "exp": exp, "revoked_at": revoked, "delisted_at": None, **kw}
    return AccessRow(th, **row)  # type: ignore[arg-type]


REVOKED = _entry(1, "token.revoked", TH, client_id="sensor-1", exp=NOW + 500)


@pytest.mark.parametrize(
    ("entries", "rows", "fault"),
    [
        ([REVOKED], RevocationRows((_access(TH, revoked=None),)), "not revoked in access_tokens"),
        ([REVOKED], RevocationRows((_access(TH, delisted_at=NOW),)), "delisted from the TRL"),
        ([REVOKED], RevocationRows(), "its record is gone"),
        (
            [REVOKED],
            RevocationRows((_access(TH),), removals=((7, cbor2.dumps([TH])),)),
            "TRL update 7 removes it",
        ),
        # The exp in the log wins over an exp moved back in the row.
        ([REVOKED], RevocationRows((_access(TH, exp=1, revoked=None),)), "not revoked"),
        # An entry from before exps were recorded: the row's exp.
        (
            [_entry(1, "token.revoked", TH, client_id="sensor-1")],
            RevocationRows((_access(TH, revoked=None),)),
            "not revoked",
        ),
        # A kill that recorded its tokens, and an older one that recorded only a count.
        (
            [_entry(1, "family.killed", FAMILY, access_tokens={TH.hex(): NOW + 500})],
            RevocationRows((_access(TH, revoked=None, family_id=None),), ((FAMILY, NOW),)),
            "not revoked",
        ),
        (
            [_entry(1, "family.killed", FAMILY, revoked_access_tokens=1)],
            RevocationRows((_access(TH, revoked=None),), ((FAMILY, NOW),)),
            "not revoked",
        ),
        (
            [_entry(1, "family.killed", FAMILY, reason="expired")],
            RevocationRows(families=((FAMILY, None),)),
            "alive again",
        ),
        ([_entry(1, "family.killed", FAMILY)], RevocationRows(), "its record is gone"),
        ([], RevocationRows(removals=((3, b"\xff"),)), "TRL update 3 does not decode"),
    ],
)
def test_revocations_undone_are_reported(
    entries: list[AuditEntry], rows: RevocationRows, fault: str
) -> None:
    report = revocation_report(entries, rows, NOW)
    assert not report.ok
    (problem,) = report.problems
    assert fault in problem
    assert TH.hex() not in problem  # a prefix names it
    if "access token" in problem:
        assert f"access token {TH.hex()[:16]}... revoked by audit entry 1" in problem


def test_revocations_that_hold_or_expired_are_not_reported() -> None:
    expired = _entry(2, "token.revoked", OTHER, client_id="sensor-1", exp=NOW)
    kill = _entry(3, "family.killed", FAMILY, reason="expired")  # its tokens live on
    rows = RevocationRows(
        (_access(TH), _access(OTHER, exp=NOW, delisted_at=NOW), _access(b"\x01x", revoked=None)),
        ((FAMILY, NOW - 100),),
        ((4, cbor2.dumps([OTHER])),),  # the sweep delisted the expired one
    )
    report = revocation_report([REVOKED, expired, kill], rows, NOW)
    assert report.ok, report.problems
    assert (report.tokens, report.families) == (1, 1)
