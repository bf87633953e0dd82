"""OSCORE recipient ids are never shared (review of issue 15): the RS hands ids out to EDHOC
handshakes (C_R) and to RFC 9203 exchanges (ID2) from one table, and a handshake awaits
(credential lookups, token verification) between message_3's arrival and its context."""

from __future__ import annotations

import pytest

from coap_auth.secure.contexts import ContextTable, OscoreContext
from coap_auth.secure.credentials import PeerCredential


def _context(peer: str, recipient_id: bytes) -> OscoreContext:
    return OscoreContext(
        b"k" * 16,
        b"s" * 8,
        sender_id=b"\x09",
        recipient_id=recipient_id,
        peer=PeerCredential(peer, None),
    )


def test_a_held_id_is_never_overwritten() -> None:
    table = ContextTable(lambda: 0, max_contexts=8, idle_timeout=100, per_peer=1)
    first = _context("attacker", b"\x01\x02")
    table.add(first)
    with pytest.raises(ValueError, match="already in use"):
        table.add(_context("victim", b"\x01\x02"))
    # The table is intact: the next add of the same peer evicts its own context only.
    table.add(_context("attacker", b"\x03\x04"))
    assert b"\x01\x02" not in table and b"\x03\x04" in table and len(table) == 1


def test_a_reserved_id_is_not_handed_out_until_released() -> None:
    table = ContextTable(lambda: 0, max_contexts=8, idle_timeout=100)
    handed: set[bytes] = set()
    # Reserve every id handed out: none comes twice while reserved.
    for _ in range(2000):  # without reservations, 2-byte ids repeat well before this
        rid = table.unused_id(lambda _: False, avoid=b"")
        assert rid not in handed
        handed.add(rid)
        table.reserve(rid)
    for rid in handed:
        table.release(rid)
    assert not table._reserved
