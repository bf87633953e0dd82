"""Checks every store makes on an operator's change of a client or audience, written once:
a change keeps the record's identity, an audience named by a client stays, and the registry it
changes is the one the audit head records."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from coap_auth.errors import OperatorError
from coap_auth.store.records import Audience, Client, RegistryChange
from coap_auth.store.rows import client_names

R = TypeVar("R", Client, Audience)


def checked_change(stored: R, change: RegistryChange[R], record_id: str) -> RegistryChange[R]:
    """`change` itself, if it keeps what a record may never change in place: its id and kind,
    its creation time, and for an audience its profile and key family (those make a new
    audience). A change that breaks this is a bug in the caller: AssertionError."""
    record = change.record
    assert type(record) is type(stored), "a change keeps the record's kind"
    if isinstance(record, Client):
        assert record.client_id == record_id and record.created_at == stored.created_at
    else:
        assert isinstance(stored, Audience)
        assert record.audience_id == record_id and record.created_at == stored.created_at
        assert (record.profile, record.key_family, record.key_alg) == (
            stored.profile,
            stored.key_family,
            stored.key_alg,
        ), "profile and key family are changed by adding a new audience"
    return change


def refuse_if_named(audience_id: str, client_audiences: Iterable[str]) -> None:
    """Raises OperatorError when any client row (each row's `audiences` column, as stored:
    also a row whose MAC does not verify) names the audience."""
    naming = sum(audience_id in client_names(text) for text in client_audiences)
    if naming:
        clients = "1 client still names" if naming == 1 else f"{naming} clients still name"
        raise OperatorError(f"{clients} audience {audience_id}; remove those clients first")


def refuse_unless_intact(matches_head: bool) -> None:
    """Raises OperatorError, changing nothing, when the client and audience rows are not the
    ones the audit head records (audit.registry_matches): a change would record them as they
    are, sealing rows put back to older copies outside coap-auth into the head."""
    if not matches_head:
        raise OperatorError(
            "the client and audience rows are not the ones the audit log's head records"
            " (changed outside coap-auth?): `coap-auth audit verify` shows how; restore a"
            " backup before changing clients or audiences"
        )
