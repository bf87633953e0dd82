"""The pure part of per-requester update collections (RFC 9770 §6.2): whom an update pertains
to, what each requester's item holds, and the collections a migration builds."""

from __future__ import annotations

import cbor2

from coap_auth.store.trl_history import attributed_history, patches

A, B, C, D = (bytes([1, n]) for n in range(4))
OWNERS = {
    A: ("sensor-1", "thermostat"),
    B: ("sensor-2", "thermostat"),
    C: ("gateway", "gateway"),  # a device that is its own audience
    D: ("sensor-1", None),  # recorded before schema 5 outside a refresh family
}


def test_an_update_is_split_by_requester_and_skips_the_unaffected() -> None:
    unknown = bytes([1, 99])
    assert patches([D], [A, B, C, unknown], OWNERS) == {
        "gateway": ([], [C]),  # once, though it is client and audience
        "sensor-1": ([D], [A]),
        "sensor-2": ([], [B]),
        "thermostat": ([], [A, B]),
    }
    assert patches([], [unknown], OWNERS) == {}


def test_a_migration_numbers_each_requester_from_1_in_update_order() -> None:
    updates = [
        (4, 100, cbor2.dumps([]), cbor2.dumps([A])),
        (5, 101, cbor2.dumps([]), cbor2.dumps([B, C])),
        (6, 102, cbor2.dumps([A]), cbor2.dumps([])),
    ]
    rows = [(r, seq, trl_seq) for r, seq, trl_seq, _, _, _ in attributed_history(updates, OWNERS)]
    assert rows == [
        ("sensor-1", 1, 4),
        ("thermostat", 1, 4),
        ("gateway", 1, 5),
        ("sensor-2", 1, 5),
        ("thermostat", 2, 5),
        ("sensor-1", 2, 6),
        ("thermostat", 3, 6),
    ]
