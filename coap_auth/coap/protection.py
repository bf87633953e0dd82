"""Who a request comes from, as the protected channel (EDHOC + OSCORE) authenticated it."""

from __future__ import annotations

from typing import Any

from coap_auth.secure.credentials import PeerCredential


def peer(request: Any) -> PeerCredential | None:
    """The peer EDHOC authenticated for the OSCORE context this request arrived under, or
    None for an unprotected request."""
    found = getattr(getattr(request, "remote", None), "peer", None)
    return found if isinstance(found, PeerCredential) else None


def peer_id(request: Any) -> str | None:
    """The registered id (client or audience) of `peer(request)`, or None when unprotected
    (only possible with `require_oscore = false`)."""
    found = peer(request)
    return None if found is None else found.id
