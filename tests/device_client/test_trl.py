"""Parsing RFC 9770 answers and applying diffs: pure, no network.

Integers are RFC 9770's (full_set 0, diff_set 1, cursor 2, more 3), written out on purpose.
"""

from __future__ import annotations

import cbor2
import pytest

from device_client import (
    DiffSet,
    FullSet,
    RevocationList,
    TrlDiff,
    decode_diff_set,
    decode_full_set,
)


def th(n: int) -> bytes:
    """A token hash shaped like RFC 9770 §4's: 0x01 || 32 bytes."""
    return b"\x01" + n.to_bytes(32, "big")


def diff(removed: list[int], added: list[int]) -> TrlDiff:
    return TrlDiff(frozenset(map(th, removed)), frozenset(map(th, added)))


def wire_diffs(*entries: TrlDiff, **extra: object) -> bytes:
    body = {1: [[sorted(d.removed), sorted(d.added)] for d in entries]}
    body.update({2 if k == "cursor" else 3: v for k, v in extra.items()})
    return cbor2.dumps(body)


# -- decoding -----------------------------------------------------------------------------------


def test_full_set_with_and_without_cursor() -> None:
    assert decode_full_set(cbor2.dumps({0: [th(1), th(2)], 2: 5})) == FullSet(
        frozenset({th(1), th(2)}), 5, True
    )
    assert decode_full_set(cbor2.dumps({0: [], 2: None})) == FullSet(frozenset(), None, True)
    assert decode_full_set(cbor2.dumps({0: [th(3)]})) == FullSet(frozenset({th(3)}), None, False)


def test_diff_set_keeps_wire_order_newest_first() -> None:
    decoded = decode_diff_set(wire_diffs(diff([], [2]), diff([], [1]), cursor=7, more=True))
    assert decoded == DiffSet((diff([], [2]), diff([], [1])), 7, True, True)
    assert decode_diff_set(cbor2.dumps({1: []})) == DiffSet(())


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff\x00", id="not-cbor"),
        pytest.param(cbor2.dumps([th(1)]), id="not-a-map"),
        pytest.param(cbor2.dumps({1: []}), id="diff-answer-to-full-query"),
        pytest.param(cbor2.dumps({0: th(1)}), id="hashes-not-an-array"),
        pytest.param(cbor2.dumps({0: ["text"]}), id="hash-not-bytes"),
        pytest.param(cbor2.dumps({0: [b""]}), id="empty-hash"),
        pytest.param(cbor2.dumps({0: [b"\x01" * 66]}), id="hash-too-long"),
        pytest.param(cbor2.dumps({0: [], 2: -1}), id="negative-cursor"),
        pytest.param(cbor2.dumps({0: [], 2: True}), id="boolean-cursor"),
        pytest.param(cbor2.dumps({0: [], 2: "5"}), id="text-cursor"),
    ],
)
def test_malformed_full_answers(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_full_set(payload)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(cbor2.dumps({0: []}), id="full-answer-to-diff-query"),
        pytest.param(cbor2.dumps({1: {}}), id="diffs-not-an-array"),
        pytest.param(cbor2.dumps({1: [[[]]]}), id="entry-not-a-pair"),
        pytest.param(cbor2.dumps({1: [[[], [], []]]}), id="entry-of-three"),
        pytest.param(cbor2.dumps({1: [[[1], []]]}), id="removed-not-bytes"),
        pytest.param(cbor2.dumps({1: [], 3: 1}), id="more-not-boolean"),
    ],
)
def test_malformed_diff_answers(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_diff_set(payload)


# -- applying diffs with the cursor (RFC 9770 §9) ----------------------------------------------


def test_new_entries_apply_oldest_first_and_old_ones_are_skipped() -> None:
    # The full query stands at update 4; update 5 added h1, 6 removed h1 and added h2.
    listed = RevocationList.from_full_set(FullSet(frozenset({th(9)}), 4, True))
    # The entry at index 4 is at our cursor: it must not be applied again (it says h9 left,
    # contradicting the full set on purpose, so applying it would show).
    answer = DiffSet((diff([1], [2]), diff([], [1]), diff([9], [])), cursor=6, cursor_given=True)
    applied = listed.apply(answer)
    assert applied == RevocationList(frozenset({th(9), th(2)}), 6)
    assert applied.is_revoked(th(2)) and not applied.is_revoked(th(1))


def test_a_gap_is_detected() -> None:
    listed = RevocationList(frozenset(), 4)
    # Indexes 7 and 8 only: 5 and 6 were missed.
    answer = DiffSet((diff([], [8]), diff([], [7])), cursor=8, cursor_given=True)
    assert listed.apply(answer) is None


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(DiffSet((), 4, True), "same", id="nothing-new"),
        pytest.param(DiffSet((diff([], [1]),), 3, True, more=True), "same", id="old-page-more"),
        pytest.param(DiffSet((diff([], [1]),), 3, True), None, id="series-went-back"),
        pytest.param(DiffSet((), None, True, more=True), None, id="updates-no-longer-kept"),
        pytest.param(DiffSet((), None, True), None, id="as-forgot-all-updates"),
        pytest.param(DiffSet((diff([], [1]),)), None, id="cursor-disappeared"),
        pytest.param(DiffSet((), 6, True), None, id="cursor-moved-without-entries"),
    ],
)
def test_answers_that_cannot_continue_the_series(answer: DiffSet, expected: object) -> None:
    listed = RevocationList(frozenset({th(7)}), 4)
    applied = listed.apply(answer)
    if expected == "same":
        assert applied is not None and applied.hashes == listed.hashes
    else:
        assert applied is expected


def test_before_the_first_update() -> None:
    empty = RevocationList.from_full_set(FullSet(frozenset(), None, True))
    assert empty.cursor == -1
    assert empty.apply(DiffSet((), None, True)) == empty  # still no update at all
    first = DiffSet((diff([], [1]),), 0, True)
    assert empty.apply(first) == RevocationList(frozenset({th(1)}), 0)


# -- without cursors: the anchor ----------------------------------------------------------------


def test_anchor_follows_overlapping_windows() -> None:
    d1, d2, d3, d4 = diff([], [1]), diff([1], [2]), diff([], [3]), diff([2], [])
    # The full query came after a diff answer whose newest entry was d2.
    listed = RevocationList.from_full_set(FullSet(frozenset({th(2)})), DiffSet((d2, d1)))
    listed = listed.apply(DiffSet((d3, d2, d1)))
    assert listed is not None and listed.hashes == {th(2), th(3)} and listed.anchor == d3
    listed = listed.apply(DiffSet((d4, d3)))
    assert listed is not None and listed.hashes == {th(3)}
    # A window that no longer shows our newest entry: something was missed.
    assert listed.apply(DiffSet((diff([], [6]), diff([], [5])))) is None


def test_reapplying_a_window_is_harmless() -> None:
    # h1 revoked (d1) then delisted on expiry (d2): the full set already reflects both.
    d1, d2 = diff([], [1]), diff([1], [])
    listed = RevocationList.from_full_set(FullSet(frozenset()))
    applied = listed.apply(DiffSet((d2, d1)))
    assert applied is not None and applied.hashes == frozenset()
    # Without an anchor, an answer that says it has more cannot be trusted to be complete.
    assert listed.apply(DiffSet((d2,), more=True)) is None
