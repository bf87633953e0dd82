"""Integrity of the registry: each client and audience row carries a MAC over all its columns,
under a key derived from the master key, so a row written with database access alone is refused.

Pure, shared by the stores: they seal a row with `row_mac` on every insert and update, and check
it with `row_fault` on every read; a row whose MAC is missing or wrong is never used.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

# Domain separation: a registry MAC can never stand for any other MAC under this key.
DOMAIN = "coap-auth registry row v1"
DIGEST_DOMAIN = "coap-auth registry digest v1"
CLIENTS = "clients"
AUDIENCES = "audiences"
_KINDS = {CLIENTS: "client", AUDIENCES: "audience"}
_SHOWN_ID = 64  # characters of a row id a message shows (the id may be an attacker's)

Mac = Callable[[bytes], bytes]


# Columns added to a table after its rows were sealed, last in its schema order, and the values
# their migration gave every existing row: the MAC covers them only when one holds another
# value, so rows sealed before keep their MACs (schema 6: an audience's profile, "bearer";
# schema 7: a client's previous secret and the end of its overlap, both NULL).
_LATE_COLUMNS: dict[str, tuple[Any, ...]] = {AUDIENCES: ("bearer",), CLIENTS: (None, None)}


def row_mac(mac: Mac, table: str, values: Sequence[Any]) -> bytes:
    """The MAC of one row: canonical CBOR of [DOMAIN, table, [every column but the MAC, in
    schema order]]. Each column is one CBOR item (text, bytes, int, bool, null), so no two
    different rows share an encoding, and a row cannot pass for one of another table. Late
    columns (`_LATE_COLUMNS`) all at their migration values are left out together: the list
    is that many items shorter, so a row with them and a row without them still never share
    an encoding."""
    columns = list(values)
    late = _LATE_COLUMNS.get(table, ())
    if late and len(columns) > len(late) and tuple(columns[-len(late) :]) == late:
        del columns[-len(late) :]
    return mac(cbor2.dumps([DOMAIN, table, columns], canonical=True))


def registry_digest(rows: Iterable[tuple[str, Any, Any]]) -> bytes:
    """What the audit head records of the whole registry: a hash over every (table, row id,
    row MAC), sorted. A row MAC alone cannot tell an older sealed copy of its row (enabled
    again, its old key) from the current one, nor show a row deleted; the head, MACed and
    rewritten with every registry write, can."""
    items = sorted([table, str(row_id), stored] for table, row_id, stored in rows)
    return hashlib.sha256(cbor2.dumps([DIGEST_DOMAIN, items], canonical=True)).digest()


EMPTY_REGISTRY = registry_digest([])


@dataclass(frozen=True, slots=True)
class RegistryFault:
    """A registry row that is not used: its MAC is missing or does not match."""

    table: str
    row_id: str
    reason: str

    def describe(self) -> str:
        shown = self.row_id[:_SHOWN_ID] + ("..." if len(self.row_id) > _SHOWN_ID else "")
        return f"registry row of {_KINDS.get(self.table, self.table)} {shown!r}: {self.reason}"


def row_fault(mac: Mac, table: str, values: Sequence[Any], stored: Any) -> RegistryFault | None:
    """None when `stored` is the MAC of `values` (the row as read, MAC column apart)."""
    row_id = str(values[0])
    if not isinstance(stored, bytes):
        return RegistryFault(table, row_id, "it has no MAC (written without the master key?)")
    if not hmac.compare_digest(row_mac(mac, table, values), stored):
        return RegistryFault(
            table, row_id, "its MAC does not match (changed without the master key?)"
        )
    return None


@dataclass(frozen=True, slots=True)
class RegistryReport:
    """Every client and audience row checked: how many, and the ones refused."""

    clients: int
    audiences: int
    faults: tuple[RegistryFault, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.faults

    def describe(self) -> str:
        if self.faults:
            return f"registry: {len(self.faults)} rows refused"
        return f"registry intact: {self.clients} clients, {self.audiences} audiences"
