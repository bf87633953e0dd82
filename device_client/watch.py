"""Observers of the AS: `KeySetWatcher` follows `/keys`, `TrlWatcher` follows `/revoke/trl`.

Both run the loop of observe.py: Observe (RFC 7641), re-registration when a notification is
overdue or the observation ends, exponential back-off with jitter while the AS is away.
`/keys` is public and read over plain CoAP; the AS serves `/revoke/trl` over the protected
channel, filtered to the hashes pertaining to the requester (RFC 9770 §5): a resource server
reads it with its own EDHOC identity and sees the tokens issued for its audience.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import aiocoap

from coap_auth.secure.credentials import EdhocCredential, EdhocIdentity
from coap_auth.tokens import VerificationKey
from coap_auth.wire import ContentFormat
from device_client.clock import Clock
from device_client.credentials import DeviceKey
from device_client.keyset import KeySet
from device_client.observe import Failure, Observer, WatchPolicy, expect
from device_client.secure_channel import SecureChannel
from device_client.trl import DiffSet, RevocationList, decode_diff_set, decode_full_set

log = logging.getLogger("device_client.watch")

__all__ = ["KeySetWatcher", "TrlWatcher", "WatchPolicy"]


class KeySetWatcher(Observer):
    """Keeps the AS's published keys (`/keys`, COSE_KeySet) current by observing them.

    `lookup` serves a `TokenVerifier`; on an unknown kid the verifier calls `refetch`, which
    fetches once per `min_refetch_interval` before the token is rejected. The constructor
    raises nothing and sends nothing: `start` (or `async with`) begins observing.
    """

    path = "keys"

    def __init__(
        self,
        context: aiocoap.Context,
        as_uri: str,
        *,
        clock: Clock | None = None,
        policy: WatchPolicy | None = None,
        rng: random.Random | None = None,
        on_change: Callable[[KeySet], None] | None = None,
    ) -> None:
        super().__init__(context, as_uri, clock=clock, policy=policy, rng=rng)
        self.key_set = KeySet()
        self.on_change = on_change
        self.fetches = 0  # unknown-kid fetches actually sent
        self._etag: bytes | None = None
        self._last_refetch: int | None = None
        self._refetch_lock = asyncio.Lock()

    def lookup(self, kid: bytes) -> VerificationKey | None:
        """The key named `kid` in the set held now, or None. Raises nothing."""
        return self.key_set.lookup(kid)

    async def refetch(self) -> bool:
        """Fetch `/keys` now unless one was fetched within `min_refetch_interval`.

        True if the set changed. A change we were not notified of means the observation is
        lost: the loop re-registers. Raises nothing for a failed fetch (it is logged, and the
        answer is False); what `on_change` raises propagates.
        """
        async with self._refetch_lock:
            now = self._clock.now()
            if (
                self._last_refetch is not None
                and now - self._last_refetch < self._policy.min_refetch_interval
            ):
                return False
            self._last_refetch = now
            self.fetches += 1
            try:
                response = await self._get(self.uri)
                changed = self._apply(response)
            except Failure as failure:
                log.warning("%s: fetch for an unknown kid failed: %s", self.uri, failure)
                return False
            if changed:
                self.reregister()
            return changed

    def _decorate(self, message: aiocoap.Message) -> None:
        message.opt.accept = ContentFormat.COSE_KEY_SET
        if self._etag is not None:
            # RFC 7252 §5.10.6: 2.03 Valid if our copy is current.
            message.opt.etags = (self._etag,)

    async def _registered(self, response: aiocoap.Message) -> None:
        self._apply(response)

    async def _notified(self, notification: aiocoap.Message) -> None:
        self._apply(notification)

    async def _check(self) -> bool:
        # With our ETag: 2.03 Valid (a few bytes) while the set is unchanged.
        return self._apply(await self._get(self.uri))

    def _apply(self, response: aiocoap.Message) -> bool:
        """Take a 2.05 (new set) or 2.03 (ours is current); True if the kids changed."""
        if (
            response.code == aiocoap.VALID
            and self._synced.is_set()
            and response.opt.etag == self._etag
        ):
            self._fresh_until(response)
            self._confirm()
            return False
        payload = expect(response, ContentFormat.COSE_KEY_SET, "/keys")
        try:
            key_set = KeySet.from_cose_key_set(payload)
        except ValueError as exc:
            raise Failure(str(exc)) from None
        self._etag = response.opt.etag
        self._fresh_until(response)
        changed = key_set.kids != self.key_set.kids
        self.key_set = key_set
        self._confirm()
        if changed:
            log.info("%s: key set now %s", self.uri, key_set.describe())
            if self.on_change is not None:
                self.on_change(key_set)
        return changed


class TrlWatcher(Observer):
    """Keeps the token revocation list current (RFC 9770): an observed diff query `?diff=N`
    (§7.2) after one full query (§7.1). Missed updates are fetched from the cursor (§9),
    or with a full query when the AS cannot serve them. `is_revoked` serves a verifier.

    With `identity` (the resource server's P-256 key, registered as its audience's
    introspection key, so its id is the audience id) and `as_credential` (the AS's EDHOC
    credential), every query goes over the protected channel, as an AS with require_oscore
    on demands; the list then holds the tokens issued for that audience.

    The constructor sends nothing (`start`, or `async with`, begins observing). Raises
    ValueError for `identity` without `as_credential` (or the reverse) or a `diff_window`
    below 1; with them, what SecureChannel's constructor raises (ChannelUnavailable when the
    channel cannot run here, TypeError for an `as_credential` that is no EdhocCredential).
    """

    path = "revoke/trl"
    # Cursor pages fetched in one catch-up before falling back to a full query.
    MAX_PAGES = 8

    def __init__(
        self,
        context: aiocoap.Context,
        as_uri: str,
        *,
        diff_window: int = 8,
        clock: Clock | None = None,
        policy: WatchPolicy | None = None,
        rng: random.Random | None = None,
        on_change: Callable[[RevocationList, frozenset[bytes]], None] | None = None,
        identity: DeviceKey | EdhocIdentity | None = None,
        as_credential: EdhocCredential | None = None,
    ) -> None:
        if (identity is None) != (as_credential is None):
            raise ValueError("the protected channel needs both identity and as_credential")
        policy = policy if policy is not None else WatchPolicy()
        channel = None
        if identity is not None and as_credential is not None:
            channel = SecureChannel(
                context, as_uri, identity, as_credential, timeout=policy.request_timeout
            )
        super().__init__(context, as_uri, clock=clock, policy=policy, rng=rng, channel=channel)
        if diff_window < 1:
            raise ValueError("diff_window must be at least 1")
        self.diff_window = diff_window
        self.revocations = RevocationList()
        self.on_change = on_change
        self.full_queries = 0
        self.cursor_queries = 0

    @property
    def channel(self) -> SecureChannel | None:
        """The protected channel the list is read over, if any."""
        return self._channel

    def is_revoked(self, token_hash: bytes) -> bool:
        """Whether `token_hash` is on the list held now. Raises nothing."""
        return token_hash in self.revocations

    def _observe_message(self) -> aiocoap.Message:
        return aiocoap.Message(
            code=aiocoap.GET,
            uri=f"{self.uri}?diff={self.diff_window}",
            observe=0,
            transport_tuning=self._tuning,
        )

    async def _registered(self, response: aiocoap.Message) -> None:
        diff_set = self._decode_diffs(response)
        if not self._synced.is_set():
            # After the registration, so the full set is at least as new as `diff_set`.
            await self._full_query(diff_set)
            applied = self.revocations.apply(diff_set)
            if applied is not None:
                self._replace(applied)
            self._confirm()
            return
        await self._take(diff_set)

    async def _notified(self, notification: aiocoap.Message) -> None:
        await self._take(self._decode_diffs(notification))

    async def _check(self) -> bool:
        before = self.revocations.hashes
        response = await self._get(f"{self.uri}?diff={self.diff_window}")
        await self._take(self._decode_diffs(response))
        return self.revocations.hashes != before

    async def _take(self, diff_set: DiffSet) -> None:
        applied = self.revocations.apply(diff_set)
        if applied is not None:
            self._replace(applied)
        if applied is None or diff_set.more:
            await self._catch_up(diff_set)
        # Only now is the list the AS's: a diff answer alone, with its catch-up lost, is not.
        self._confirm()

    async def _catch_up(self, latest: DiffSet) -> None:
        """RFC 9770 §9.2.3: ask for the updates after our cursor, page by page; a full
        query when there is no cursor or the AS no longer has them."""
        for _ in range(self.MAX_PAGES if self.revocations.cursor is not None else 0):
            self.cursor_queries += 1
            # diff=0: as many as the AS keeps (MAX_N), so one page usually does.
            response = await self._get(f"{self.uri}?diff=0&cursor={self.revocations.cursor}")
            if response.code != aiocoap.CONTENT:
                break  # e.g. 4.00 out-of-bound cursor: our series is not the AS's
            page = self._decode_diffs(response)
            applied = self.revocations.apply(page)
            if applied is None:
                break
            self._replace(applied)
            if not page.more:
                return
        log.info("%s: updates missed; full query", self.uri)
        await self._full_query(latest)

    def _decode_diffs(self, response: aiocoap.Message) -> DiffSet:
        payload = expect(response, ContentFormat.ACE_TRL_CBOR, "/revoke/trl?diff")
        try:
            diff_set = decode_diff_set(payload)
        except ValueError as exc:
            raise Failure(str(exc)) from None
        self._fresh_until(response)
        return diff_set

    async def _full_query(self, latest: DiffSet) -> None:
        self.full_queries += 1
        response = await self._get(self.uri)
        payload = expect(response, ContentFormat.ACE_TRL_CBOR, "/revoke/trl")
        try:
            full = decode_full_set(payload)
        except ValueError as exc:
            raise Failure(str(exc)) from None
        self._replace(RevocationList.from_full_set(full, latest))

    def _replace(self, revocations: RevocationList) -> None:
        added = revocations.hashes - self.revocations.hashes
        changed = revocations.hashes != self.revocations.hashes
        self.revocations = revocations
        if changed:
            log.info("%s: %d token hashes listed (%d new)", self.uri, len(revocations), len(added))
            if self.on_change is not None:
                self.on_change(revocations, frozenset(added))
