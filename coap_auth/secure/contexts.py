"""OSCORE security contexts made by EDHOC, and the bounded table the server finds them in.

A context lives in memory only and is never persisted: its keys come from one EDHOC run, so
a restarted process has none, can reuse no nonce under them, and has no replay window to
recover (RFC 8613 Appendix B.1 is about contexts that outlive a reboot; these do not). A
device whose context is gone gets 4.01 and runs EDHOC again.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiocoap import oscore

from coap_auth.secure.credentials import PeerCredential

if TYPE_CHECKING:
    from coap_auth.secure.provisioned import ProvisionedContext

log = logging.getLogger("coap_auth.oscore")

# Suite 2 (RFC 9528 §3.6): AES-CCM-16-64-128 and SHA-256; the master salt is 8 bytes
# (RFC 9528 Appendix A.1).
AEAD = "AES-CCM-16-64-128"
MASTER_SECRET_BYTES = 16
MASTER_SALT_BYTES = 8
REPLAY_WINDOW = 32
# RFC 8613 §5: with a 13-byte nonce an OSCORE id is at most 7 bytes.
MAX_ID_BYTES = 7


class OscoreContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """One peer's OSCORE context (no ID Context). `peer` is who EDHOC authenticated."""

    def __init__(
        self,
        master_secret: bytes,
        master_salt: bytes,
        *,
        sender_id: bytes,
        recipient_id: bytes,
        peer: PeerCredential,
        now: int = 0,
    ) -> None:
        if sender_id == recipient_id:
            raise ValueError("OSCORE sender and recipient ids must differ")
        self.alg_aead = oscore.algorithms[AEAD]
        self.hashfun = oscore.hashfunctions["sha256"]
        self.id_context = None
        self.sender_id = sender_id
        self.recipient_id = recipient_id
        self.derive_keys(master_salt, master_secret)
        self.sender_sequence_number = 0
        self.recipient_replay_window = oscore.ReplayWindow(REPLAY_WINDOW, lambda: None)
        self.recipient_replay_window.initialize_empty()
        self.echo_recovery = None
        self.peer = peer
        self.authenticated_claims = [peer.id]
        self.last_used = now
        # What the server authorizes requests under this context with (an ACE access token,
        # device_client.rs); None for the AS's own contexts.
        self.access_token: Any = None
        # Set by ContextTable.remove: nothing more is protected under this context.
        self.withdrawn = False

    def __repr__(self) -> str:  # never the keys
        return (
            f"<OscoreContext peer={self.peer.id!r} sender_id={self.sender_id.hex()} "
            f"recipient_id={self.recipient_id.hex()}>"
        )

    def post_seqnoincrease(self) -> None:
        """Nothing to persist: the context dies with the process (module docstring)."""

    def protect(self, *args: Any, **kwargs: Any) -> Any:
        """aiocoap's protect; raises RuntimeError once the context was withdrawn (the server
        then answers unprotected, coap_auth.secure.site)."""
        if self.withdrawn:
            raise RuntimeError("OSCORE context withdrawn")
        return super().protect(*args, **kwargs)


class ContextTable:
    """The server's contexts by recipient id: a dict lookup, never a scan.

    Bounded: at most `max_contexts` (the least recently used of the peer holding the most
    goes first) and at most `per_peer` per authenticated peer (its oldest goes first); a
    context unused for `idle_timeout` seconds is gone. Only authenticated contexts are ever
    added (EDHOC's pending handshakes are held apart, coap_auth.secure.edhoc).
    """

    def __init__(
        self,
        now: Callable[[], int],
        *,
        max_contexts: int,
        idle_timeout: int,
        per_peer: int = 4,
    ) -> None:
        self._now = now
        self.max_contexts = max_contexts
        self.idle_timeout = idle_timeout
        self.per_peer = per_peer
        self._by_id: OrderedDict[bytes, OscoreContext] = OrderedDict()
        # Recipient ids per peer, oldest first.
        self._by_peer: dict[str, list[bytes]] = {}
        # Recipient ids promised but not yet in the table (an EDHOC handshake's C_R from
        # message_2 until its message_3 is done): unused_id never hands them out again.
        self._reserved: set[bytes] = set()
        # Operator-provisioned contexts (coap_auth.secure.provisioned): never evicted.
        self._provisioned: dict[bytes, ProvisionedContext] = {}

    def __len__(self) -> int:
        """How many EDHOC-made contexts are held (provisioned ones apart)."""
        return len(self._by_id)

    def __contains__(self, recipient_id: bytes) -> bool:
        return recipient_id in self._by_id

    @property
    def provisioned(self) -> dict[bytes, ProvisionedContext]:
        return dict(self._provisioned)

    def set_provisioned(self, contexts: list[ProvisionedContext]) -> None:
        """Hold exactly these provisioned contexts (closing the ones no longer listed); an
        EDHOC context with the same recipient id gives way."""
        wanted = {c.recipient_id: c for c in contexts}
        for rid, old in list(self._provisioned.items()):
            if wanted.get(rid) is not old:
                del self._provisioned[rid]
                try:
                    old.close()
                except Exception:  # noqa: BLE001 (it is dropped whatever its files say)
                    log.warning("provisioned OSCORE context of %s not saved", old.peer.id)
        for rid, context in wanted.items():
            if rid in self._by_id:
                self._remove(rid)
            self._provisioned[rid] = context

    def close(self) -> None:
        """Persist and release the provisioned contexts (a clean stop); forget the rest."""
        self.set_provisioned([])
        self._by_id.clear()
        self._by_peer.clear()

    def reserve(self, recipient_id: bytes) -> None:
        """Keep `recipient_id` (from unused_id) from being handed out again until released.
        Raises nothing."""
        self._reserved.add(recipient_id)

    def release(self, recipient_id: bytes) -> None:
        """End a reservation (the context is added, or will never be). Raises nothing."""
        self._reserved.discard(recipient_id)

    def add(self, context: OscoreContext) -> None:
        """Hold `context`, evicting as the bounds say. Raises ValueError when its recipient id
        is already held: a context is never silently replaced under another's id."""
        if context.recipient_id in self._by_id or context.recipient_id in self._provisioned:
            raise ValueError("OSCORE recipient id already in use")
        now = self._now()
        self._expire(now)
        context.last_used = now
        mine = self._by_peer.get(context.peer.id, [])
        for old in mine[: max(0, len(mine) - self.per_peer + 1)]:
            self._remove(old)
        while len(self._by_id) >= self.max_contexts:
            self._remove(self._eviction_victim())
        self._by_id[context.recipient_id] = context
        self._by_peer.setdefault(context.peer.id, []).append(context.recipient_id)

    def _eviction_victim(self) -> bytes:
        """Whom a full table drops: the least recently used context of the peer holding the
        most (plain LRU while every peer holds one), so no peer, however many names it
        registers handshakes under, pushes out a peer holding fewer."""
        most = max(len(ids) for ids in self._by_peer.values())
        if most == 1:
            return next(iter(self._by_id))
        return next(rid for rid, c in self._by_id.items() if len(self._by_peer[c.peer.id]) == most)

    def find_oscore(self, unprotected: dict[Any, Any]) -> OscoreContext | ProvisionedContext:
        """aiocoap's lookup: the context for a request's kid (and no kid context), or
        KeyError."""
        recipient_id = unprotected.get(oscore.COSE_KID)
        if not isinstance(recipient_id, bytes) or oscore.COSE_KID_CONTEXT in unprotected:
            raise KeyError("no such context")
        provisioned = self._provisioned.get(recipient_id)
        if provisioned is not None:
            return provisioned
        context = self._by_id.get(recipient_id)
        if context is None:
            raise KeyError("no such context")
        now = self._now()
        if now - context.last_used > self.idle_timeout:
            self._remove(recipient_id)
            raise KeyError("context expired")
        return context

    def used(self, context: Any) -> None:
        """A request under `context` decrypted: it is in use (idle timer, LRU order). Only
        then: garbage sent under a kid seen on the wire must not keep a context alive."""
        held = self._by_id.get(context.recipient_id)
        if held is not None and held is context:
            held.last_used = self._now()
            self._by_id.move_to_end(held.recipient_id)

    def contexts(self) -> list[OscoreContext]:
        """The EDHOC-made (or derived) contexts held, least recently used first."""
        return list(self._by_id.values())

    def remove(self, recipient_id: bytes) -> OscoreContext | None:
        """Forget the context for `recipient_id` and withdraw it: an answer still being
        rendered under it goes out unprotected (4.01), as RFC 9203 §4.3 asks of a context
        whose token expired. Returns it, or None when not held."""
        context = self._by_id.get(recipient_id)
        if context is None:
            return None
        self._remove(recipient_id)
        context.withdrawn = True
        return context

    def drop_peer(self, peer_id: str) -> int:
        """Forget every context of a peer (its registration changed); returns how many."""
        gone = list(self._by_peer.get(peer_id, ()))
        for rid in gone:
            self._remove(rid)
        return len(gone)

    def unused_id(self, taken: Callable[[bytes], bool], avoid: bytes) -> bytes:
        """A fresh recipient id: random, two bytes while those are plentiful, longer after."""
        for length in (2, 2, 2, 3, 3, 4, 5, 6, MAX_ID_BYTES):
            candidate = secrets.token_bytes(length)
            if (
                candidate != avoid
                and candidate not in self._by_id
                and candidate not in self._reserved
                and candidate not in self._provisioned
                and not taken(candidate)
            ):
                return candidate
        raise RuntimeError("no free OSCORE recipient id")  # 2^56 ids: not reachable

    def _expire(self, now: int) -> None:
        # The dict is in order of last use: the idle ones are at the front.
        while self._by_id:
            oldest = next(iter(self._by_id.values()))
            if now - oldest.last_used <= self.idle_timeout:
                break
            self._remove(oldest.recipient_id)

    def _remove(self, recipient_id: bytes) -> None:
        context = self._by_id.pop(recipient_id)
        ids = self._by_peer[context.peer.id]
        ids.remove(recipient_id)
        if not ids:
            del self._by_peer[context.peer.id]
