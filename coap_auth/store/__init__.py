"""Persistence: the `Store` protocol, its records, and the embedded SQLite implementation."""

from coap_auth.store.base import Store
from coap_auth.store.master_key import MasterKey
from coap_auth.store.records import (
    TOKEN_FORMATS,
    Audience,
    Client,
    IssuedAccess,
    RefreshFamily,
    RefreshOutcome,
    TokenFormat,
)
from coap_auth.store.sqlite import SqliteStore

__all__ = [
    "TOKEN_FORMATS",
    "Audience",
    "Client",
    "IssuedAccess",
    "MasterKey",
    "RefreshFamily",
    "RefreshOutcome",
    "SqliteStore",
    "Store",
    "TokenFormat",
]
