"""aiocoap's memory of recent messages for duplicate detection (RFC 7252 §4.5), bounded.

aiocoap's message manager remembers every request's (endpoint, message id) and the answer it
sent for EXCHANGE_LIFETIME (247 s), without a bound: about 1.3 KB a datagram, a flood's too.
Here it is bounded per source address and in all.

Pure: the standard library and coap_auth.addresses.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from coap_auth.addresses import address_key

# aiocoap remembers every request's (endpoint, message id) and answer for EXCHANGE_LIFETIME
# (247 s) to answer duplicates, without a bound. Here at most this many in all (about 1.3 KB
# each) and per source address (address_key: an IPv6 /64); past either, the oldest (of that
# source, or in all) is forgotten: a duplicate of it would be processed again (RFC 7252 §4.5
# only says SHOULD), which beats refusing new requests, which one sender could make everyone
# suffer (found by an outsider test).
MAX_REMEMBERED_EXCHANGES = 50_000
MAX_REMEMBERED_PER_SOURCE = 1_000


class RememberedExchanges(dict[Any, Any]):
    """What aiocoap's message manager remembers of recent messages for duplicate detection
    (its `_recent_messages`: (remote, message id) -> the answer sent, or None), bounded as
    MAX_REMEMBERED_EXCHANGES says. aiocoap forgets each entry after EXCHANGE_LIFETIME by
    `pop(key)`; one forgotten here first is simply gone by then."""

    def __init__(
        self,
        max_entries: int = MAX_REMEMBERED_EXCHANGES,
        per_source: int = MAX_REMEMBERED_PER_SOURCE,
    ) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.per_source = per_source
        self._by_source: dict[str, OrderedDict[Any, None]] = {}
        # The datagram length of each confirmable request remembered (coap_auth.udp: a
        # duplicate must be as long): set before aiocoap adds its entry, gone with it.
        self.lengths: dict[Any, int] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self:
            source = _source_key(key)
            mine = self._by_source.setdefault(source, OrderedDict())
            if len(mine) >= self.per_source:
                self.pop(next(iter(mine)))
            while len(self) >= self.max_entries:
                self.pop(next(iter(self)))
            mine = self._by_source.setdefault(source, OrderedDict())
            mine[key] = None
        super().__setitem__(key, value)

    def pop(self, key: Any, *default: Any) -> Any:
        if key not in self:
            self.lengths.pop(key, None)
            return default[0] if default else None
        self.lengths.pop(key, None)
        mine = self._by_source.get(_source_key(key))
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_source[_source_key(key)]
        return super().pop(key)


def _source_key(key: Any) -> str:
    remote = key[0]
    sockaddr = getattr(remote, "sockaddr", None)
    if not sockaddr:
        return repr(remote)
    return address_key(str(sockaddr[0]).removeprefix("::ffff:"))
