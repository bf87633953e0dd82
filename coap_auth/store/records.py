"""What the store keeps, as frozen value objects (shared by every Store implementation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TokenFormat = Literal["cwt", "jwt"]
TOKEN_FORMATS: tuple[TokenFormat, ...] = ("cwt", "jwt")


@dataclass(frozen=True, slots=True)
class Audience:
    audience_id: str
    token_format: TokenFormat
    lifetime: int
    created_at: int


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    audiences: tuple[str, ...]
    scope: tuple[str, ...]
    created_at: int
    # Exactly one of these authenticates the client.
    secret_digest: bytes | None = field(default=None, repr=False)
    public_key: dict[Any, Any] | None = field(default=None, compare=False)  # COSE_Key
    disabled: bool = False

    def public_view(self) -> dict[str, Any]:
        """What listings show: never the secret digest, never key material beyond its type."""
        return {
            "client_id": self.client_id,
            "audiences": list(self.audiences),
            "scope": " ".join(self.scope),
            "auth": "public-key" if self.public_key is not None else "secret",
            "disabled": self.disabled,
            "created_at": self.created_at,
        }
