"""Signing keys in use: one `KeyRing` per family, the rotation schedule, revocation, export.

Every change goes through `Store.update_keys`, which re-reads the keys inside its transaction,
so a scheduled rotation racing an operator's (or another instance's) is applied once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from coap_auth.clock import Clock
from coap_auth.config import Settings
from coap_auth.errors import OperatorError
from coap_auth.keys import (
    ALG_NAMES,
    DEFAULT_FAMILY,
    KeyRing,
    KeyState,
    RotationPolicy,
    SigningKey,
    rings_by_family,
)
from coap_auth.metrics import Metrics, RotationTrigger
from coap_auth.store import Audience, Store
from coap_auth.tokens import VerificationKey
from coap_auth.wire import CoseAlg

log = logging.getLogger("coap_auth.keys")

# Longest Max-Age of /keys: a device that does not observe re-reads the set this often.
MAX_KEYS_MAX_AGE = 3600


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """What a family needs to exist: its name and algorithm."""

    family: str
    alg: CoseAlg


class KeyRollover:
    def __init__(
        self, store: Store, settings: Settings, clock: Clock, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics() if metrics is None else metrics
        self._rings: dict[str, KeyRing] = {}
        self._policies: dict[str, RotationPolicy] = {}
        # One load or change at a time: a load that read the store before a change must not
        # overwrite the rings of a load that read it after.
        self._lock = asyncio.Lock()
        # Families this instance created because the store had none (first start).
        self.created_families: list[str] = []

    # -- reading ------------------------------------------------------------------------------

    def ring(self, family: str = DEFAULT_FAMILY) -> KeyRing:
        try:
            return self._rings[family]
        except KeyError:
            raise RuntimeError(f"keys of family {family!r} not loaded") from None

    @property
    def rings(self) -> dict[str, KeyRing]:
        return dict(self._rings)

    def published(self) -> tuple[SigningKey, ...]:
        """Every key /keys publishes: the asymmetric families' next, active and retiring keys,
        the default family first. Symmetric keys are never published."""
        families = sorted(self._rings, key=lambda f: (f != DEFAULT_FAMILY, f))
        return tuple(
            key for family in families for key in self._rings[family].published if not key.symmetric
        )

    def lookup_in(self, family: str) -> Callable[[bytes], VerificationKey | None]:
        """Verification of a token for an audience: only its own family's published keys."""
        ring = self._rings.get(family)
        return ring.lookup if ring is not None else (lambda _kid: None)

    def mac_key(self, kid: bytes, family: str) -> bytes | None:
        """The secret of a published HMAC key of this family, to check a MACed token."""
        return self.secret_key(kid, family, CoseAlg.HMAC_256_64)

    def secret_key(self, kid: bytes, family: str, alg: CoseAlg) -> bytes | None:
        """The secret of a published symmetric key of this family and algorithm (HMAC, to
        check a MACed token; AES-CCM, to decrypt an encrypted one), else None."""
        ring = self._rings.get(family)
        key = ring.find(kid) if ring is not None else None
        if key is None or key.alg != alg or key not in ring.published:  # type: ignore[union-attr]
            return None
        return key.private_key if isinstance(key.private_key, bytes) else None

    def find(self, kid: bytes) -> SigningKey | None:
        for ring in self._rings.values():
            key = ring.find(kid)
            if key is not None:
                return key
        return None

    def next_change(self) -> int | None:
        """The next moment the schedule changes some family on its own."""
        moments = [
            ring.next_change(self._policies[family])
            for family, ring in self._rings.items()
            if family in self._policies
        ]
        due = [m for m in moments if m is not None]
        return min(due) if due else None

    def keys_max_age(self) -> int:
        """Max-Age of /keys: never past the next scheduled change of a published family."""
        now = self.clock.now()
        moments = [
            ring.next_change(self._policies[family])
            for family, ring in self._rings.items()
            if family in self._policies and not ring.active.symmetric
        ]
        due = [m - now for m in moments if m is not None]
        return max(0, min([MAX_KEYS_MAX_AGE, *due]))

    # -- loading and the schedule ---------------------------------------------------------------

    async def load(self) -> None:
        """Read every family; create the default family and any audience's own family that
        has no keys yet (first start, or an audience added by another process)."""
        async with self._lock:
            await self._load()

    async def _load(self) -> None:
        audiences = await self.store.list_audiences()
        specs = self._family_specs(audiences)
        now = self.clock.now()
        keys = await self.store.load_keys()
        if {s.family for s in specs} - {k.family for k in keys}:

            def create_missing(current: list[SigningKey]) -> list[SigningKey]:
                present = {k.family for k in current}
                return [
                    key
                    for spec in specs
                    if spec.family not in present
                    for key in KeyRing.initial(spec.alg, now, spec.family).keys
                ]

            created = await self.store.update_keys(create_missing, "service", now)
            self.created_families += sorted({k.family for k in created})
            keys = await self.store.load_keys()
        self._rings = rings_by_family(keys)
        self._policies = self._rotation_policies(audiences)

    async def ensure_families(self, audiences: list[Audience]) -> None:
        """Load (creating if need be) the key family of an audience added since the last load,
        e.g. by the CLI a moment ago."""
        if any(a.key_family not in self._rings for a in audiences):
            await self.load()

    async def advance(self) -> list[SigningKey]:
        """Apply what the schedule says is due now (rotations, removals); [] when nothing is."""
        due = self.next_change()
        now = self.clock.now()
        if due is None or due > now:
            return []
        async with self._lock:
            return await self._advance(now)

    async def _advance(self, now: int) -> list[SigningKey]:
        # Policies from the audiences as they are now: one added since the last load may
        # have a longer token lifetime, which a retiring key must outlive.
        await self._load()
        policies = self._policies

        def advance(current: list[SigningKey]) -> list[SigningKey]:
            changed: list[SigningKey] = []
            for family, ring in rings_by_family(current).items():
                if family in policies:
                    changed += ring.advance(now, policies[family])[1]
            return changed

        changed = await self.store.update_keys(advance, "scheduler", now)
        if changed:
            self._count_rotations(changed, RotationTrigger.SCHEDULED)
            log.info("scheduled key change: %s", _describe(changed))
        await self._load()
        return changed

    # -- operator actions -------------------------------------------------------------------------

    async def rotate(
        self, family: str = DEFAULT_FAMILY, *, actor: str, force: bool = False
    ) -> list[SigningKey]:
        async with self._lock:
            return await self._rotate(family, force, actor)

    async def _rotate(self, family: str, force: bool, actor: str) -> list[SigningKey]:
        await self._load()
        if family not in self._rings:
            raise OperatorError(f"no key family {family!r}")
        policy = self._policies.get(family)
        if policy is None:  # `audiences remove` ended its keys; a family is never revived
            raise OperatorError(f"key family {family!r} ended with its audience")
        now = self.clock.now()
        changed = await self.store.update_keys(
            _in_family(family, lambda ring: ring.rotate(now, policy, force=force)[1]), actor, now
        )
        await self._load()
        self._count_rotations(changed, RotationTrigger.MANUAL)
        log.info("keys rotated: %s", _describe(changed))
        return changed

    def _count_rotations(self, changed: list[SigningKey], trigger: RotationTrigger) -> None:
        """One rotation per family in which a key became active."""
        rotated = {k.family for k in changed if k.state == KeyState.ACTIVE}
        if rotated:
            self.metrics.key_rotations.labels(trigger).inc(len(rotated))

    async def revoke(self, kid: bytes, *, actor: str) -> list[SigningKey]:
        async with self._lock:
            return await self._revoke(kid, actor)

    async def _revoke(self, kid: bytes, actor: str) -> list[SigningKey]:
        await self._load()
        key = self.find(kid)
        if key is None:
            raise OperatorError(f"no key {kid.hex()}")
        now = self.clock.now()
        changed = await self.store.update_keys(
            _in_family(key.family, lambda ring: ring.revoke(kid, now)[1]), actor, now
        )
        await self._load()
        log.warning("key revoked: %s", _describe(changed))
        return changed

    # -- policies ---------------------------------------------------------------------------------

    def _family_specs(self, audiences: list[Audience]) -> list[FamilySpec]:
        specs = [FamilySpec(DEFAULT_FAMILY, ALG_NAMES[self.settings.signing_alg])]
        for audience in audiences:
            if audience.key_family != DEFAULT_FAMILY:
                alg = ALG_NAMES[audience.key_alg or self.settings.signing_alg]
                specs.append(FamilySpec(audience.key_family, alg))
        return specs

    def _rotation_policies(self, audiences: list[Audience]) -> dict[str, RotationPolicy]:
        lifetimes: dict[str, int] = {DEFAULT_FAMILY: self.settings.token_lifetime}
        symmetric: set[str] = set()
        for audience in audiences:
            family = audience.key_family
            lifetimes[family] = max(lifetimes.get(family, 0), audience.lifetime)
            if audience.symmetric:
                symmetric.add(family)
        return {
            family: RotationPolicy(
                # A symmetric family's keys reach its audience out of band: rotated by hand.
                period=None if family in symmetric else self.settings.key_rotation_period,
                lead=self.settings.key_prepublication_lead,
                retire_after=lifetime + self.settings.key_retire_leeway,
            )
            for family, lifetime in lifetimes.items()
        }


def _in_family(
    family: str, change: Callable[[KeyRing], list[SigningKey]]
) -> Callable[[list[SigningKey]], list[SigningKey]]:
    """A store transition applying `change` to one family's ring as it is in the store."""

    def transition(current: list[SigningKey]) -> list[SigningKey]:
        ring = rings_by_family(current).get(family)
        if ring is None:
            raise OperatorError(f"no key family {family!r}")
        return change(ring)

    return transition


def _describe(changed: list[SigningKey]) -> str:
    return ", ".join(f"{k.kid.hex()} ({k.family}) {k.state.value}" for k in changed)
