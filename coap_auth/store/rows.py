"""Row <-> record conversion shared by the SQL stores (same column order in both schemas), and
the check of every registry row's MAC as it is read (coap_auth.store.registry_mac)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import cbor2

from coap_auth.store.audit import AuditEntry, AuditEvent
from coap_auth.store.records import Audience, Client, RefreshFamily, TrlUpdate
from coap_auth.store.registry_mac import (
    AUDIENCES,
    CLIENTS,
    Mac,
    RegistryReport,
    row_fault,
    row_mac,
)
from coap_auth.store.revocation_audit import AccessRow, RevocationRows

Row = Sequence[Any]
log = logging.getLogger("coap_auth.store")


# Registry columns in schema order (the MAC column, `mac`, comes after them). Queries name
# them, so a migrated table (MAC added last) and a new one read alike.
AUDIENCE_COLUMNS = (
    "audience_id",
    "token_format",
    "lifetime",
    "created_at",
    "key_family",
    "key_alg",
    "introspect_secret_digest",
    "introspect_public_key",
    "profile",  # schema 6; MACed only when not "bearer" (registry_mac.row_mac)
)
CLIENT_COLUMNS = (
    "client_id",
    "audiences",
    "scope",
    "secret_digest",
    "public_key",
    "disabled",
    "created_at",
    # schema 7; MACed only when not both NULL (registry_mac.row_mac)
    "previous_secret_digest",
    "previous_secret_until",
)
AUDIENCE_SELECT = ", ".join((*AUDIENCE_COLUMNS, "mac"))
CLIENT_SELECT = ", ".join((*CLIENT_COLUMNS, "mac"))


def assignments(columns: Sequence[str], placeholder: Callable[[int], str]) -> str:
    """`SET` list of an update writing every column but the first (the id) and the MAC, the
    row's values in order from the second: "a = ?, b = ?" (SQLite) or "a = $1, ..."."""
    names = (*columns[1:], "mac")
    return ", ".join(f"{name} = {placeholder(n)}" for n, name in enumerate(names, start=1))


def client_names(audiences_json: str) -> list[str]:
    """The audiences a clients row names (its `audiences` column, as stored)."""
    names = json.loads(audiences_json)
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


# Every registry row's table, id and MAC: what the audit head's registry digest covers.
REGISTRY_IDS = (
    "SELECT 'clients', client_id, mac FROM clients"
    " UNION ALL SELECT 'audiences', audience_id, mac FROM audiences"
)


def audience_from_row(row: Row, version: bytes = b"") -> Audience:
    (
        audience_id,
        token_format,
        lifetime,
        created_at,
        key_family,
        key_alg,
        introspect_secret_digest,
        introspect_public_key,
        profile,
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
        profile=profile,
        version=version,
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
        audience.profile,
    )


def client_from_row(row: Row, version: bytes = b"") -> Client:
    (
        client_id,
        audiences,
        scope,
        secret_digest,
        public_key,
        disabled,
        created_at,
        previous_secret_digest,
        previous_secret_until,
    ) = row
    return Client(
        client_id=client_id,
        audiences=tuple(json.loads(audiences)),
        scope=tuple(scope.split()),
        created_at=created_at,
        secret_digest=secret_digest,
        public_key=None if public_key is None else cbor2.loads(public_key),
        disabled=bool(disabled),
        previous_secret_digest=previous_secret_digest,
        previous_secret_until=previous_secret_until,
        version=version,
    )


def client_to_row(client: Client) -> tuple[Any, ...]:
    return (
        client.client_id,
        json.dumps(list(client.audiences)),
        " ".join(client.scope),
        client.secret_digest,
        None if client.public_key is None else cbor2.dumps(client.public_key),
        client.disabled,
        client.created_at,
        client.previous_secret_digest,
        client.previous_secret_until,
    )


def sealed_row(mac: Mac, table: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row to insert: its columns and their MAC (registry_mac)."""
    return (*values, row_mac(mac, table, values))


def row_values(table: str, row: Row) -> tuple[Any, ...]:
    """A registry row as read, MAC column apart, in the types its MAC is computed over
    (SQLite keeps `disabled` as 0/1)."""
    values = tuple(row)[:-1]
    if table == CLIENTS:
        disabled = CLIENT_COLUMNS.index("disabled")
        values = (*values[:disabled], bool(values[disabled]), *values[disabled + 1 :])
    return values


# Each registry table, the columns its MAC covers (and the MAC), and its key column: what a
# migration seals, in both stores.
REGISTRY_TABLES = (
    (CLIENTS, CLIENT_SELECT, "client_id"),
    (AUDIENCES, AUDIENCE_SELECT, "audience_id"),
)


def seals(mac: Mac, table: str, rows: Iterable[Row]) -> list[tuple[bytes, Any]]:
    """(MAC, id) of each row as read: what sealing the rows written before MACs sets."""
    sealed = []
    for row in rows:
        values = row_values(table, row)
        sealed.append((row_mac(mac, table, values), values[0]))
    return sealed


def _checked(mac: Mac, table: str, rows: Iterable[Row]) -> Iterator[tuple[tuple[Any, ...], bytes]]:
    """The rows whose MAC verifies, as (values, MAC); each other one is logged (one line,
    naming its id) and left out, exactly as if it were not there."""
    for row in rows:
        values = row_values(table, row)
        stored = tuple(row)[-1]
        fault = row_fault(mac, table, values, stored)
        if fault is None:
            yield values, bytes(stored)
        else:
            log.error("refused the %s", fault.describe())


def verified_mac(mac: Mac, table: str, row: Row | None) -> bytes | None:
    """The MAC of a registry row read by CLIENT_SELECT / AUDIENCE_SELECT if it verifies: what
    a grant decided from a cached record is checked against. None for no row, and for a row
    that does not verify (logged): a grant never rests on a row edited without the master key."""
    if row is None:
        return None
    for _, stored in _checked(mac, table, [row]):
        return stored
    return None


# Registry rows VerifiedRows keeps at most (about 0.5 kB each); past it, the oldest goes.
VERIFIED_ROWS = 16384
# The types whose equal values have one CBOR encoding (unlike 1 == 1.0 == True, 0.0 == -0.0).
_EXACT_TYPES = frozenset({str, bytes, int, bool, type(None)})


class VerifiedRows:
    """`verified_mac` of the rows grants rest on, without computing again the MAC of a row read
    exactly as it last verified (equal values of equal types: the same MAC input). Any other
    row is checked in full, and logged if refused; only rows that verified are kept, by table
    and id. One thread uses it: the SQLite writer, or PostgreSQL's event loop."""

    def __init__(self, mac: Mac, limit: int = VERIFIED_ROWS) -> None:
        self._mac = mac
        self._limit = limit
        self._rows: dict[tuple[str, Any], tuple[tuple[Any, ...], tuple[type, ...]]] = {}

    def mac(self, table: str, row: Row | None) -> bytes | None:
        """verified_mac(mac, table, row)."""
        if row is None:
            return None
        values = tuple(row)
        types = tuple(map(type, values))
        key = (table, values[0])
        if self._rows.get(key) == (values, types):
            return values[-1]  # type: ignore[no-any-return]
        stored = verified_mac(self._mac, table, row)
        if stored is not None and _EXACT_TYPES.issuperset(types):
            self._rows.pop(key, None)
            if len(self._rows) >= self._limit:
                del self._rows[next(iter(self._rows))]
            self._rows[key] = (values, types)
        return stored


def trusted_clients(mac: Mac, rows: Iterable[Row]) -> list[Client]:
    """Clients from rows of CLIENT_SELECT, without any whose MAC does not verify; each carries
    its MAC as its version."""
    return [client_from_row(values, mac_) for values, mac_ in _checked(mac, CLIENTS, rows)]


def trusted_audiences(mac: Mac, rows: Iterable[Row]) -> list[Audience]:
    """Audiences from rows of AUDIENCE_SELECT, without any whose MAC does not verify."""
    return [audience_from_row(values, mac_) for values, mac_ in _checked(mac, AUDIENCES, rows)]


def stand_in_rows(mac: Mac) -> tuple[Row, Row]:
    """A sealed client row and audience row of typical size (a P-256 key, a digest), checked
    and decoded when a lookup by id finds nothing (`trusted_client`, `trusted_audience`)."""
    client = Client(
        "stand-in",
        ("stand-in",),
        ("stand-in",),
        0,
        public_key={1: 2, -1: 1, -2: bytes(32), -3: bytes(32)},
    )
    audience = Audience("stand-in", "cwt", 1, 0, introspect_secret_digest=bytes(32))
    return (
        sealed_row(mac, CLIENTS, client_to_row(client)),
        sealed_row(mac, AUDIENCES, audience_to_row(audience)),
    )


def trusted_client(mac: Mac, rows: Sequence[Row], stand_in: Row) -> Client | None:
    """The client a lookup by id found, if its MAC verifies. A miss checks and decodes the
    stand-in row instead, so it costs what a hit does: timing does not tell who exists."""
    found = trusted_clients(mac, rows or [stand_in])
    return found[0] if rows and found else None


def trusted_audience(mac: Mac, rows: Sequence[Row], stand_in: Row) -> Audience | None:
    """As `trusted_client`, for an audience (which authenticates to /introspect)."""
    found = trusted_audiences(mac, rows or [stand_in])
    return found[0] if rows and found else None


def registry_report(
    mac: Mac, client_rows: Sequence[Row], audience_rows: Sequence[Row]
) -> RegistryReport:
    """Every registry row checked (rows of CLIENT_SELECT and AUDIENCE_SELECT)."""
    faults = [
        fault
        for table, rows in ((CLIENTS, client_rows), (AUDIENCES, audience_rows))
        for row in rows
        if (fault := row_fault(mac, table, row_values(table, row), tuple(row)[-1])) is not None
    ]
    return RegistryReport(len(client_rows), len(audience_rows), tuple(faults))


# A refresh family's columns: what every read of one selects, by name.
FAMILY_COLUMNS = (
    "family_id, client_id, audience, scope, cnf, created_at, last_used_at, expires_at,"
    " killed_at, kill_reason"
)


def family_to_row(family: RefreshFamily) -> tuple[Any, ...]:
    """A family's values in FAMILY_COLUMNS order."""
    cnf = None if family.cnf is None else cbor2.dumps(family.cnf)
    return (
        family.family_id,
        family.client_id,
        family.audience,
        family.scope,
        cnf,
        family.created_at,
        family.last_used_at,
        family.expires_at,
        family.killed_at,
        family.kill_reason,
    )


def family_from_row(row: Mapping[str, Any]) -> RefreshFamily:
    """A family from a row read by column name (sqlite3.Row, asyncpg.Record)."""
    cnf = row["cnf"]
    return RefreshFamily(
        family_id=bytes(row["family_id"]),
        client_id=row["client_id"],
        audience=row["audience"],
        scope=row["scope"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
        cnf=None if cnf is None else cbor2.loads(cnf),
        killed_at=row["killed_at"],
        kill_reason=row["kill_reason"],
    )


TRL_UPDATE_COLUMNS = "seq, at, removed, added"


def trl_update_from_row(row: Mapping[str, Any]) -> TrlUpdate:
    """An update from a row of TRL_UPDATE_COLUMNS, read by name."""
    removed, added = cbor2.loads(row["removed"]), cbor2.loads(row["added"])
    return TrlUpdate(row["seq"], row["at"], tuple(removed), tuple(added))


AUDIT_COLUMNS = "seq, at, actor, event, subject, details, mac"


def audit_entry_to_row(entry: AuditEntry) -> tuple[Any, ...]:
    event = entry.event
    return (
        entry.seq,
        event.at,
        event.actor,
        event.event,
        event.subject,
        event.details_json(),
        entry.mac,
    )


def audit_entry_from_row(row: Mapping[str, Any]) -> AuditEntry:
    """An entry from a row of AUDIT_COLUMNS, read by name."""
    details = json.loads(row["details"])
    event = AuditEvent(row["at"], row["actor"], row["event"], row["subject"], details)
    return AuditEntry(row["seq"], event, bytes(row["mac"]))


# The revocation state `audit verify` compares with the log (`revocation_audit`), read in the
# audit snapshot's transaction.
ACCESS_STATE_QUERY = (
    "SELECT token_hash, family_id, exp, revoked_at, delisted_at FROM access_tokens"
    " ORDER BY token_hash"
)
FAMILY_STATE_QUERY = "SELECT family_id, killed_at FROM refresh_families ORDER BY family_id"
REMOVALS_QUERY = "SELECT seq, removed FROM trl_updates ORDER BY seq"


def revocation_rows(
    access: Iterable[Mapping[str, Any]],
    families: Iterable[Mapping[str, Any]],
    removals: Iterable[Mapping[str, Any]],
) -> RevocationRows:
    """The rows of ACCESS_STATE_QUERY, FAMILY_STATE_QUERY and REMOVALS_QUERY, by name."""
    return RevocationRows(
        tuple(
            AccessRow(r["token_hash"], r["family_id"], r["exp"], r["revoked_at"], r["delisted_at"])
            for r in access
        ),
        tuple((r["family_id"], r["killed_at"]) for r in families),
        tuple((r["seq"], r["removed"]) for r in removals),
    )
