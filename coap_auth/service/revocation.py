"""The token revocation list (RFC 9770): query parsing, full and diff answers, the cursor.

Each requester has its own update collection (§6.2): the updates that changed the hashes
pertaining to it (§5), each holding only those, numbered 1, 2, ... in its own sequence; the
RFC 9770 index of one is its number minus one. A diff query reaches the requester's last MAX_N
updates; with the Cursor extension (§6.2.1, §9) it pages through them MAX_DIFF_BATCH at a time.
An unprotected requester (None, lab mode) reads the whole list and every update, as the RFC's
administrator does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coap_auth.errors import TrlQueryError
from coap_auth.store import Store
from coap_auth.wire import TrlErrorId, TrlParam

# RFC 9770 §6.2.1: indexes wrap after MAX_INDEX; ours never do (2^63 updates).
MAX_INDEX = 2**63 - 1
_MAX_DIGITS = 20
# Records of tokens that expired unrevoked are dropped at least this often (s).
SWEEP_EVERY = 3600


@dataclass(frozen=True, slots=True)
class TrlQuery:
    """A parsed /revoke/trl query: no diff is a full query. The cursor stays text until the
    list's state is known, because its error response must carry the current cursor."""

    diff: int | None = None
    cursor: str | None = None


def parse_trl_query(options: Sequence[str]) -> TrlQuery:
    """RFC 9770 §6.3. Unknown query parameters are silently ignored."""
    values: dict[str, str] = {}
    for option in options:
        name, _, value = option.partition("=")
        if name in ("diff", "cursor"):
            if name in values:
                raise TrlQueryError(
                    f"{name} given more than once", TrlErrorId.INVALID_SET_OF_PARAMETERS
                )
            values[name] = value
    diff = None
    if "diff" in values:
        diff = _uint(values["diff"])
        if diff is None:
            raise TrlQueryError(
                "diff must be an unsigned integer", TrlErrorId.INVALID_PARAMETER_VALUE
            )
    if "cursor" in values and diff is None:
        raise TrlQueryError("cursor requires diff", TrlErrorId.INVALID_SET_OF_PARAMETERS)
    return TrlQuery(diff, values.get("cursor"))


def _uint(text: str, maximum: int = MAX_INDEX) -> int | None:
    if not text or len(text) > _MAX_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= maximum else None


class RevocationList:
    def __init__(self, store: Store, max_n: int, max_diff_batch: int) -> None:
        self.store = store
        self.max_n = max_n
        self.max_diff_batch = max_diff_batch
        self._last_sweep: int | None = None
        self._next_expiry: int | None = None

    async def plan_sweep(self) -> None:
        """Learn when the next listed token expires (after any change of the list)."""
        self._next_expiry = await self.store.next_trl_expiry()

    async def sweep_due(self, now: int) -> int:
        """RFC 9770 §5.1: a hash leaves the list when its token expires. Delist what has
        expired (one update, observers notified through the change feed); returns how many."""
        if self._last_sweep is None:
            self._last_sweep = now
        expired = self._next_expiry is not None and self._next_expiry <= now
        if not expired and now - self._last_sweep < SWEEP_EVERY:
            return 0
        # Twice what a query can reach, in each history (the list's and every requester's): a
        # diff answer reads its bounds and then its updates in two reads, and a prune in
        # between must not take what the bounds promised.
        removed = await self.store.sweep_expired(now, keep_updates=2 * self.max_n)
        self._last_sweep = now
        await self.plan_sweep()
        return removed

    async def answer(self, query: TrlQuery, requester: str | None) -> dict[int, Any]:
        """The CBOR map of a full or diff query response (RFC 9770 §7, §8, §9) for
        `requester`, the authenticated peer: only the hashes of tokens issued to it or for it
        (§5), its own updates and indexes (§6.2). None (an unprotected request, lab mode
        only) reads the whole list. Two store reads at most."""
        if query.diff is None:  # §7, §9.1: the cursor is the requester's own last_index
            hashes, _, last = await self.store.trl(requester)
            return {TrlParam.FULL_SET: hashes, TrlParam.CURSOR: last - 1 if last else None}
        first, last = await self.store.trl_bounds(requester)
        last_index = last - 1 if last else None
        cursor = None
        if query.cursor is not None:
            cursor = _uint(query.cursor)
            if cursor is None:
                raise TrlQueryError(
                    "cursor must be an unsigned integer",
                    TrlErrorId.INVALID_PARAMETER_VALUE,
                    cursor=last_index,
                )
        if last_index is None:  # §9.2.1: no update pertaining to the requester yet
            return _diff([], None, more=False)
        num = self.max_n if query.diff == 0 or query.diff > self.max_n else query.diff
        # Only the requester's last MAX_N updates are in reach, whatever the store still holds.
        oldest = max(first, last - self.max_n + 1)
        if cursor is None:  # §9.2.2: the eldest batch of the last U updates
            wanted = min(num, last - oldest + 1)
            batch = min(wanted, self.max_diff_batch)
            start, more = last - wanted + 1, wanted > batch
        else:  # §9.2.3
            if cursor > last_index:
                raise TrlQueryError(
                    "cursor is past the latest update", TrlErrorId.OUT_OF_BOUND_CURSOR_VALUE
                )
            if cursor + 2 < oldest:  # neither update P nor P + 1 is kept: ask for a full query
                return _diff([], None, more=True)
            # The updates right after P (index P + 1 is seq P + 2), so that paging with the
            # cursor never skips one, even when N is smaller than what is pending.
            start = cursor + 2
            pending = last - start + 1
            batch = min(num, pending, self.max_diff_batch)
            more = pending > batch
            if batch == 0:
                return _diff([], last_index, more=False)
        updates = await self.store.trl_updates(start, start + batch - 1, requester)
        entries = [[list(u.removed), list(u.added)] for u in updates]
        # The cursor is the index (seq - 1) of the newest update returned.
        return _diff(entries, start + batch - 2, more=more)

    async def changes_since(self, trl_seq: int | None) -> tuple[frozenset[str] | None, int]:
        """Whose pertaining part of the list changed after the list's update `trl_seq`
        (RFC 9770 §11: only they are notified), and the list's newest update. None for
        "everyone" when `trl_seq` is None (nothing known yet)."""
        requesters, newest = await self.store.trl_changes_since(trl_seq)
        return (None if trl_seq is None else requesters), newest


def _diff(entries: list[list[list[bytes]]], cursor: int | None, *, more: bool) -> dict[int, Any]:
    return {TrlParam.DIFF_SET: entries, TrlParam.CURSOR: cursor, TrlParam.MORE: more}
