"""Per-requester TRL update collections (RFC 9770 §6.2): whom an update pertains to, and what
each of them sees of it. Pure; both SQL stores write and read the rows described here.

Each TRL update is one row of `trl_updates` (the whole list's history, numbered by `seq`) and
one row of `trl_requester_updates` per requester it pertains to, numbered 1, 2, ... in that
requester's own sequence (its RFC 9770 index is that number minus one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cbor2

# The (client_id, audience) of an access token: who its hash pertains to (RFC 9770 §2,
# "pertaining access token": the client it was issued to, the RS it was issued for). The
# audience is None for a token recorded before schema 5 outside a refresh family.
Owner = tuple[str, str | None]

REQUESTER_UPDATE_COLUMNS = "requester, seq, trl_seq, at, removed, added"


def requesters_of(owner: Owner) -> set[str]:
    client_id, audience = owner
    return {client_id} if audience is None else {client_id, audience}


def patches(
    removed: Sequence[bytes], added: Sequence[bytes], owners: Mapping[bytes, Owner]
) -> dict[str, tuple[list[bytes], list[bytes]]]:
    """RFC 9770 §6.2 steps 1-3: for each requester whose subset of the TRL this update
    changes, its "removed" and "added" sets (in the update's order), by requester. A
    requester the update does not affect gets nothing: no series item, no notification."""
    found: dict[str, tuple[list[bytes], list[bytes]]] = {}
    for side, hashes in ((0, removed), (1, added)):
        for h in hashes:
            owner = owners.get(h)
            if owner is None:  # not a token we recorded: it pertains to no registered device
                continue
            for requester in requesters_of(owner):
                found.setdefault(requester, ([], []))[side].append(h)
    return dict(sorted(found.items()))


def requester_rows(
    trl_seq: int,
    at: int,
    removed: Sequence[bytes],
    added: Sequence[bytes],
    owners: Mapping[bytes, Owner],
) -> list[tuple[str, int, int, bytes, bytes]]:
    """(requester, trl_seq, at, removed, added) for each requester this update pertains to;
    the store numbers each row after that requester's newest."""
    return [
        (requester, trl_seq, at, cbor2.dumps(r), cbor2.dumps(a))
        for requester, (r, a) in patches(removed, added, owners).items()
    ]


def attributed_history(
    updates: Iterable[Sequence[Any]], owners: Mapping[bytes, Owner]
) -> list[tuple[str, int, int, int, bytes, bytes]]:
    """The migration to schema 5: the update collections the kept TRL updates (rows of
    `seq, at, removed, added`, oldest first) would have built, each requester's numbered
    from 1. Rows in `REQUESTER_UPDATE_COLUMNS` order."""
    counts: dict[str, int] = {}
    rows = []
    for trl_seq, at, removed, added in updates:
        for requester, _, _, r, a in requester_rows(
            trl_seq, at, cbor2.loads(removed), cbor2.loads(added), owners
        ):
            counts[requester] = counts.get(requester, 0) + 1
            rows.append((requester, counts[requester], trl_seq, at, r, a))
    return rows
