"""Persistence: the `Store` protocol, its records, and the embedded SQLite implementation."""

from coap_auth.store.audit import AuditEntry, AuditEvent, ChainReport, verify_chain
from coap_auth.store.base import Store
from coap_auth.store.master_key import MasterKey
from coap_auth.store.records import (
    TOKEN_FORMATS,
    Audience,
    ChangeCounters,
    Client,
    IssuedAccess,
    RefreshFamily,
    RefreshOutcome,
    TokenFormat,
    TrlUpdate,
)
from coap_auth.store.sqlite import SqliteStore

__all__ = [
    "TOKEN_FORMATS",
    "AuditEntry",
    "AuditEvent",
    "Audience",
    "ChainReport",
    "ChangeCounters",
    "Client",
    "IssuedAccess",
    "MasterKey",
    "RefreshFamily",
    "RefreshOutcome",
    "SqliteStore",
    "Store",
    "TokenFormat",
    "TrlUpdate",
    "verify_chain",
]
