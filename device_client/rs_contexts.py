"""The resource server's OSCORE contexts, each bound to the access token that authorizes it
(`context.access_token`), in a bounded coap_auth.secure.contexts.ContextTable.

A context dies with its token: `drop` withdraws it, so an answer still being rendered under it
goes out unprotected (4.01, RFC 9203 §4.3). RFC 9203 contexts are also kept per OSCORE input
material: a new /authz-info exchange for a material replaces the material's previous context
not yet used, and the first authorized request under a context replaces the material's older
ones (RFC 9203 §6: "successfully replaced"), so a token reposted by someone who copied it
cannot push out the context its holder is using.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from coap_auth.tokens import same_public_key
from device_client.rs_common import NonceMemory
from device_client.verify import VerifiedToken

if TYPE_CHECKING:
    from coap_auth.secure.contexts import OscoreContext


class ContextBindings:
    """`table` (the contexts, at most `max_contexts`, `per_subject` per token subject, gone
    after `idle_timeout` s unused) and `nonces` (the RFC 9203 nonce1 memory). Raises
    ValueError for a bound below 1."""

    def __init__(
        self,
        now: Callable[[], int],
        *,
        max_contexts: int,
        per_subject: int,
        idle_timeout: int,
        max_nonces: int,
    ) -> None:
        if not 1 <= per_subject <= max_contexts:
            raise ValueError("need 1 <= contexts_per_subject <= max_contexts")
        from coap_auth.secure.contexts import ContextTable  # aiocoap.oscore: only when used

        self.table = ContextTable(
            now, max_contexts=max_contexts, idle_timeout=idle_timeout, per_peer=per_subject
        )
        self.nonces = NonceMemory(max_nonces)
        # RFC 9203: material id -> the recipient id of its newest context not yet used.
        self._unconfirmed: dict[bytes, bytes] = {}

    def bind(self, context: OscoreContext, verified: VerifiedToken) -> None:
        """Attach `verified` to `context` (not yet in the table) and drop the other contexts
        bound to the same token (draft-ietf-ace-edhoc-oscore-profile-11 §4.2) or to another
        token of the same subject and PoP key (§12)."""
        context.access_token = verified
        key = verified.claims.cnf_key
        for other in self.table.contexts():
            bound = _token(other)
            if bound is None:
                continue
            # One token per client and PoP key (draft-11 §12): a handshake under a newer
            # token of the same key ends the contexts of the older ones.
            same_key = (
                key is not None
                and bound.claims.cnf_key is not None
                and bound.claims.sub == verified.claims.sub
                and same_public_key(bound.claims.cnf_key, key)
            )
            if bound.token_hash == verified.token_hash or same_key:
                self.drop(other)

    def add_derived(self, context: OscoreContext, material_id: bytes) -> None:
        """Add an RFC 9203 context (its token already attached): the previous context not yet
        used of the same material, or of the same subject, goes."""
        previous = self._unconfirmed.pop(material_id, None)
        if previous is not None:
            self.table.remove(previous)
        # At most one unused context per subject: tokens copied off the air and reposted
        # (each a new unused context) never count against the subject's share of contexts
        # its holder is using (outsider round on issue 15, finding F5).
        unused = set(self._unconfirmed.values())
        for other in self.table.contexts():
            if other.peer.id == context.peer.id and other.recipient_id in unused:
                self.table.remove(other.recipient_id)
        self.table.add(context)
        self._unconfirmed[material_id] = context.recipient_id
        for mid, rid in list(self._unconfirmed.items()):
            if rid not in self.table:
                del self._unconfirmed[mid]

    def confirm(self, context: OscoreContext) -> None:
        """A request under `context` was authorized: for an RFC 9203 context its client holds
        the keys, so the material's other contexts go (the newest unused one stays)."""
        verified = _token(context)
        mid = None if verified is None else verified.material_id
        if mid is None:
            return
        if self._unconfirmed.get(mid) == context.recipient_id:
            del self._unconfirmed[mid]
        for other in self.table.contexts():
            bound = _token(other)
            if (
                other is not context
                and bound is not None
                and bound.material_id == mid
                and self._unconfirmed.get(mid) != other.recipient_id
            ):
                self.drop(other)

    def drop(self, context: OscoreContext) -> None:
        """Forget `context` and withdraw it (whether or not the table still held it)."""
        self.table.remove(context.recipient_id)
        context.withdrawn = True

    def drop_invalid(
        self, valid: Callable[[VerifiedToken], bool]
    ) -> list[tuple[str, VerifiedToken]]:
        """Drop the contexts whose token `valid` refuses; what was dropped, as
        ("oscore:<recipient id hex>", token). `valid` may raise (nothing more is dropped)."""
        dropped = []
        for context in self.table.contexts():
            bound = _token(context)
            if bound is not None and not valid(bound):
                self.drop(context)
                dropped.append((f"oscore:{context.recipient_id.hex()}", bound))
        return dropped


def _token(context: OscoreContext) -> VerifiedToken | None:
    bound = context.access_token
    return bound if isinstance(bound, VerifiedToken) else None
