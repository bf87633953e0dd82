"""The token revocation list (RFC 9770) as a device holds it: parsing answers, applying diffs.

Pure: no I/O. `TrlWatcher` (watch.py) keeps one current by observing `/revoke/trl?diff=N`.
With the Cursor extension (RFC 9770 §9) every answer says which update it ends at, so a
device knows exactly which diffs are new and which it missed; without it, the newest diff
entry applied (the anchor) must reappear in the next answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coap_auth import untagged
from coap_auth.wire import TrlParam

# RFC 9770 §4: th = hash-alg id || digest; sha-256 (id 1) gives 33 bytes. Bound the length so
# a hostile list cannot make us hold arbitrary blobs.
MAX_HASH_BYTES = 65
MAX_TRL_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class TrlDiff:
    """One diff entry (RFC 9770 §7): hashes that left the list and hashes that joined it.
    Raises nothing (a plain record)."""

    removed: frozenset[bytes]
    added: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class FullSet:
    """A full-query answer (RFC 9770 §7.1): every listed hash, and with §9 the cursor, the
    index of the newest update (None: no update yet). Raises nothing (a plain record;
    decode_full_set checks the wire form)."""

    hashes: frozenset[bytes]
    cursor: int | None = None
    cursor_given: bool = False


@dataclass(frozen=True, slots=True)
class DiffSet:
    """A diff-query answer (RFC 9770 §7.2): entries newest first, as on the wire. With §9,
    `cursor` is the index of the newest entry sent and `more` says newer ones remain. Raises
    nothing (a plain record; decode_diff_set checks the wire form)."""

    diffs: tuple[TrlDiff, ...]
    cursor: int | None = None
    cursor_given: bool = False
    more: bool = False


def decode_full_set(payload: bytes) -> FullSet:
    """`{0: [* th], ? 2: cursor}`. Raises ValueError if malformed or too large."""
    document = _load_map(payload)
    if TrlParam.FULL_SET not in document:
        raise ValueError("TRL answer has no full_set")
    cursor, given = _cursor(document)
    return FullSet(_hashes(document[TrlParam.FULL_SET]), cursor, given)


def decode_diff_set(payload: bytes) -> DiffSet:
    """`{1: [* [removed, added]], ? 2: cursor, ? 3: more}`. Raises ValueError if malformed
    or too large."""
    document = _load_map(payload)
    if TrlParam.DIFF_SET not in document:
        raise ValueError("TRL answer has no diff_set")
    entries = document[TrlParam.DIFF_SET]
    if not isinstance(entries, list):
        raise ValueError("diff_set must be an array")
    diffs = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            raise ValueError("a diff entry must be [removed, added]")
        diffs.append(TrlDiff(removed=_hashes(entry[0]), added=_hashes(entry[1])))
    more = document.get(TrlParam.MORE, False)
    if not isinstance(more, bool):
        raise ValueError("more must be a boolean")
    cursor, given = _cursor(document)
    return DiffSet(tuple(diffs), cursor, given, more)


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The revoked token hashes, and where in the AS's series of updates they stand.

    `cursor` (RFC 9770 §9): the index of the newest update applied, -1 before the first;
    None when the AS sends no cursors. Then `anchor`, the newest diff entry applied, stands
    in for it. Diffs are applied oldest first. Raises nothing (an immutable value).
    """

    hashes: frozenset[bytes] = frozenset()
    cursor: int | None = None
    anchor: TrlDiff | None = None

    def __contains__(self, token_hash: object) -> bool:
        return token_hash in self.hashes

    def __len__(self) -> int:
        return len(self.hashes)

    def is_revoked(self, token_hash: bytes) -> bool:
        """Whether `token_hash` is on the list. Raises nothing."""
        return token_hash in self.hashes

    @classmethod
    def from_full_set(cls, full: FullSet, latest: DiffSet | None = None) -> RevocationList:
        """The list after a full query. Without cursors, `latest` (a diff answer received
        just before the full query) gives the anchor for the diffs that follow. Raises
        nothing."""
        if full.cursor_given:
            return cls(full.hashes, -1 if full.cursor is None else full.cursor)
        anchor = latest.diffs[0] if latest is not None and latest.diffs else None
        return cls(full.hashes, None, anchor)

    def apply(self, diff_set: DiffSet) -> RevocationList | None:
        """The list with the new entries of `diff_set` applied, or None when this answer
        cannot bring it up to date (entries were missed, or the AS's series restarted):
        then ask from the cursor again, or make a full query. Raises nothing."""
        if self.cursor is not None:
            return self._apply_by_cursor(diff_set)
        return self._apply_by_anchor(diff_set)

    def _apply_by_cursor(self, diff_set: DiffSet) -> RevocationList | None:
        assert self.cursor is not None
        if not diff_set.cursor_given:
            return None
        newest = diff_set.cursor
        if newest is None:
            # RFC 9770 §9.2: no update at all, or (with more) the updates we need are gone.
            return None if diff_set.more or self.cursor >= 0 else self
        count = len(diff_set.diffs)
        if newest < self.cursor:
            # Older than what we hold: fine if the AS says more follow (a batch of the past,
            # RFC 9770 §9), otherwise its series no longer continues ours.
            return self if diff_set.more else None
        if count == 0 and newest != self.cursor:
            return None
        if newest - count + 1 > self.cursor + 1:
            return None  # a gap: updates between ours and the oldest sent
        hashes = set(self.hashes)
        for position in reversed(range(count)):  # oldest first
            if newest - position > self.cursor:
                hashes -= diff_set.diffs[position].removed
                hashes |= diff_set.diffs[position].added
        return RevocationList(frozenset(hashes), newest)

    def _apply_by_anchor(self, diff_set: DiffSet) -> RevocationList | None:
        # Re-applying an entry is harmless: a hash joins once (revoked) and leaves once,
        # later (expired), so the newest N entries fix any state that saw their
        # predecessors. The anchor tells whether we did.
        diffs = diff_set.diffs
        if self.anchor is not None:
            if self.anchor not in diffs:
                return None
            diffs = diffs[: diffs.index(self.anchor)]
        elif diff_set.more:
            return None
        hashes = set(self.hashes)
        for diff in reversed(diffs):
            hashes -= diff.removed
            hashes |= diff.added
        anchor = diff_set.diffs[0] if diff_set.diffs else self.anchor
        return RevocationList(frozenset(hashes), None, anchor)


def _load_map(payload: bytes) -> dict[Any, Any]:
    if len(payload) > MAX_TRL_BYTES:
        raise ValueError("TRL answer too large")
    try:
        document = untagged.loads(payload)
    except Exception:
        raise ValueError("TRL answer is not well-formed CBOR") from None
    if not isinstance(document, dict):
        raise ValueError("TRL answer must be a CBOR map")
    return document


def _cursor(document: dict[Any, Any]) -> tuple[int | None, bool]:
    if TrlParam.CURSOR not in document:
        return None, False
    cursor = document[TrlParam.CURSOR]
    if cursor is None:
        return None, True
    if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
        raise ValueError("cursor must be an unsigned integer or null")
    return cursor, True


def _hashes(value: Any) -> frozenset[bytes]:
    if not isinstance(value, list):
        raise ValueError("token hashes must be an array")
    if not all(isinstance(h, bytes) and 0 < len(h) <= MAX_HASH_BYTES for h in value):
        raise ValueError("a token hash must be a byte string")
    return frozenset(value)
