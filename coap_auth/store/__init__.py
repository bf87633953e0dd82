"""Persistence: the `Store` protocol, its records, and the embedded SQLite implementation."""

from coap_auth.store.audit import (
    AuditEntry,
    AuditEvent,
    AuditReport,
    AuditSnapshot,
    ChainReport,
    verify_chain,
    verify_log,
)
from coap_auth.store.base import Store
from coap_auth.store.master_key import MasterKey
from coap_auth.store.records import (
    PROFILES,
    TOKEN_FORMATS,
    Audience,
    ChangeCounters,
    Client,
    IssuedAccess,
    Profile,
    RefreshFamily,
    RefreshOutcome,
    TokenFormat,
    TrlUpdate,
)
from coap_auth.store.registry_mac import RegistryFault, RegistryReport
from coap_auth.store.sqlite import SqliteStore

__all__ = [
    "PROFILES",
    "TOKEN_FORMATS",
    "AuditEntry",
    "AuditEvent",
    "AuditReport",
    "AuditSnapshot",
    "Audience",
    "ChainReport",
    "ChangeCounters",
    "Client",
    "IssuedAccess",
    "MasterKey",
    "Profile",
    "RefreshFamily",
    "RefreshOutcome",
    "RegistryFault",
    "RegistryReport",
    "SqliteStore",
    "Store",
    "TokenFormat",
    "TrlUpdate",
    "verify_chain",
    "verify_log",
]
