"""Block-wise uploads (RFC 7959 Block1) for every resource of the service, assembled here under
the size cap, the per-address rate limit and a cap on uploads in flight, per address and in all.

aiocoap's own per-resource spool bounds none of these: each fragment would bypass the rate
limit, and a flood of first blocks that never finish would grow memory for as long as it lasts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import aiocoap

from coap_auth.clock import Clock
from coap_auth.errors import BadRequest, PayloadTooLarge, RequestEntityIncomplete
from coap_auth.service.rate_limit import RateLimiter, address_key

# RFC 7959 §2.5: a server may drop an unfinished upload well before EXCHANGE_LIFETIME; we keep
# one for MAX_TRANSMIT_WAIT (RFC 7252 §4.8.2, 93 s) after its latest block, as aiocoap does.
UPLOAD_LIFETIME = 93
# A device has one upload at a time per resource (RFC 7959 §2.5); a few leave room for NAT.
MAX_UPLOADS_PER_ADDRESS = 4
# The options of a held upload's first block, encoded: ample for a path, a query and a
# content format. Without a cap, thousands of empty options (each a Python object once
# decoded) would make one held upload cost a megabyte.
MAX_UPLOAD_OPTIONS = 256
# With max_payload 2048, at most 1024 x (2048 + 256) bytes of request, about 2.3 MiB (plus
# the objects that hold them).
MAX_UPLOADS = 1024


@dataclass(slots=True)
class _Upload:
    address: str  # address_key() of the sender
    touched: int  # when its latest block came in
    request: aiocoap.Message  # the first block, with every later block's payload appended


class BlockwiseUploads:
    """Partial request bodies in flight, least recently continued first."""

    def __init__(
        self,
        clock: Clock,
        max_payload: int,
        address_limits: RateLimiter | None,
        *,
        max_per_address: int = MAX_UPLOADS_PER_ADDRESS,
        max_uploads: int = MAX_UPLOADS,
        lifetime: int = UPLOAD_LIFETIME,
    ) -> None:
        self.clock = clock
        self.max_payload = max_payload
        self.address_limits = address_limits
        self.max_per_address = max_per_address
        self.max_uploads = max_uploads
        self.lifetime = lifetime
        self._uploads: OrderedDict[Hashable, _Upload] = OrderedDict()
        self._per_address: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._uploads)

    def from_address(self, host: str) -> int:
        """How many uploads from `host` (by its address_key) are held."""
        return self._per_address.get(address_key(host), 0)

    def feed(self, request: aiocoap.Message, host: str, key: Hashable) -> aiocoap.Message | None:
        """Take one Block1 fragment from `host`; `key` names its upload (sender endpoint and
        resource). Returns the assembled request after the last block, None while more are
        to come (answer 2.31 Continue).

        Raises TooManyRequests (4.29) past the per-address rate, which every fragment counts
        toward; PayloadTooLarge (4.13) past the size cap, or for a new upload from an address
        that already has max_per_address in flight (RFC 7959 §2.5: the server "does not
        currently have the resources to store blocks"); RequestEntityIncomplete (4.08) for a
        block that does not continue an upload held here (RFC 7959 §2.5, §2.9.2)."""
        block1 = request.opt.block1
        address = address_key(host)
        if self.address_limits is not None:
            self.address_limits.hit(address, "address")
        now = self.clock.now()
        self._drop_expired(now)
        # RFC 7959 §2.9.3: refused as soon as the blocks pass the cap, whatever is still to
        # come, before anything more is held.
        if (block1.block_number + 1) * block1.size > self.max_payload:
            self._drop(key)
            raise PayloadTooLarge(
                f"request payload larger than {self.max_payload} bytes", size1=self.max_payload
            )
        if block1.block_number == 0:
            # RFC 7959 §2.5: a new first block from the same endpoint replaces its old upload.
            self._drop(key)
            if not block1.more:
                return request  # all of it in one block: nothing to hold
            if len(request.payload) != block1.size:
                raise BadRequest("a block that is not the last must be of the Block1 size")
            if len(request.opt.encode()) > MAX_UPLOAD_OPTIONS:
                raise BadRequest("too many options for a block-wise upload")
            self._make_room(address)
            self._uploads[key] = _Upload(address, now, request)
            self._per_address[address] = self._per_address.get(address, 0) + 1
            return None
        held = self._uploads.get(key)
        if held is None or not _append(held.request, request):
            self._drop(key)
            raise RequestEntityIncomplete("no upload in progress that this block continues")
        if block1.more:
            held.touched = now
            self._uploads.move_to_end(key)
            return None
        self._drop(key)
        return held.request

    def _make_room(self, address: str) -> None:
        if self._per_address.get(address, 0) >= self.max_per_address:
            raise PayloadTooLarge(
                "too many block-wise uploads in progress from this address",
                size1=self.max_payload,
            )
        # In all, the least recently continued upload gives way. Refusing the new one instead
        # would let a slow flood of first blocks from many (spoofed) addresses, max_uploads
        # per lifetime (about 11 a second), lock every device out of block-wise uploads; to
        # push out an upload that is moving, a flood must outpace that upload's blocks.
        while len(self._uploads) >= self.max_uploads:
            self._drop(next(iter(self._uploads)))

    def _drop_expired(self, now: int) -> None:
        while self._uploads:
            key, oldest = next(iter(self._uploads.items()))
            if oldest.touched + self.lifetime > now:
                return
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        upload = self._uploads.pop(key, None)
        if upload is None:
            return
        remaining = self._per_address[upload.address] - 1
        if remaining:
            self._per_address[upload.address] = remaining
        else:
            del self._per_address[upload.address]


def _append(assembled: aiocoap.Message, fragment: aiocoap.Message) -> bool:
    """Append the next block to the upload; False if it is not the next one (a gap, an
    overlap, or a block short of its declared size that is not the last)."""
    block1 = fragment.opt.block1
    if block1.more and len(fragment.payload) != block1.size:
        return False
    if block1.start != len(assembled.payload):
        return False
    assembled.payload += fragment.payload
    # The assembled request answers as the last block: its message token and Block1 option.
    assembled.opt.block1 = block1
    assembled.token = fragment.token
    assembled.mid = fragment.mid
    if not block1.more and fragment.opt.block2 is not None:
        assembled.opt.block2 = fragment.opt.block2
    return True
