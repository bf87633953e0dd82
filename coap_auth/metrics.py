"""The service's Prometheus metrics: one registry per service instance (never the library's
global one: several servers share a test process), and the measuring proxy around its Store.

Every label takes values from a small fixed set (resource paths, CoAP codes, outcomes, store
method names): never a client id, token, secret or address. Hot-path children are looked up
once and kept, so a request costs a few counter increments and one histogram observation.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coap_auth.errors import CoapAuthError, OperatorError, StoreUnavailable

# A request is answered in about a millisecond; a store write waits for a durable commit.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class GrantKind(StrEnum):
    """The `grant_type` label of coap_auth_grants."""

    CLIENT_CREDENTIALS = "client_credentials"
    REFRESH_TOKEN = "refresh_token"


class KillCause(StrEnum):
    """The `reason` label of coap_auth_family_kills."""

    REUSE = "reuse"
    CLIENT_REVOKE = "client_revoke"


class RotationTrigger(StrEnum):
    """The `trigger` label of coap_auth_key_rotations."""

    SCHEDULED = "scheduled"
    MANUAL = "manual"


class StoreErrorKind(StrEnum):
    """The `error` label of coap_auth_store_errors."""

    UNAVAILABLE = "unavailable"  # the store's condition (5.03)
    FAULT = "fault"  # anything else (5.00)


# Store methods that run for the store's lifetime (a change listener), not one operation.
UNTIMED_STORE_METHODS = frozenset({"watch_changes"})
S = TypeVar("S")


class Metrics:
    """Every metric of one service (and the server running it), in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "coap_auth_requests",
            "CoAP requests answered, by resource and response code",
            ["resource", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "coap_auth_request_duration_seconds",
            "Time from receiving a request to its answer, by resource",
            ["resource"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.grants = Counter(
            "coap_auth_grants",
            "Access tokens issued, by grant type and token format",
            ["grant_type", "token_format"],
            registry=r,
        )
        self.refreshes = Counter(
            "coap_auth_refreshes",
            "Refresh-token presentations, by outcome (rotated, grace, reused, unknown, dead,"
            " expired)",
            ["outcome"],
            registry=r,
        )
        self.reuse_detections = Counter(
            "coap_auth_refresh_reuse_detections",
            "Refresh tokens presented again after rotation (their family was killed)",
            registry=r,
        )
        self.family_kills = Counter(
            "coap_auth_family_kills",
            "Refresh families ended early, by reason",
            ["reason"],
            registry=r,
        )
        self.key_rotations = Counter(
            "coap_auth_key_rotations",
            "Signing-key rotations made by this server, scheduled or manual",
            ["trigger"],
            registry=r,
        )
        self.key_set_changes = Counter(
            "coap_auth_key_set_changes",
            "Changes of the stored key set this server picked up (from any instance or the CLI)",
            registry=r,
        )
        self.observers = Gauge(
            "coap_auth_observers",
            "Observe registrations held, by resource",
            ["resource"],
            registry=r,
        )
        self.trl_hashes = Gauge(
            "coap_auth_trl_hashes",
            "Token hashes on the revocation list (as of the server's last read of it)",
            registry=r,
        )
        self.store_duration = Histogram(
            "coap_auth_store_operation_duration_seconds",
            "Store operation latency, by operation",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "coap_auth_store_errors",
            "Store operations that failed: unavailable (answered 5.03) or fault (5.00)",
            ["operation", "error"],
            registry=r,
        )
        self.edhoc_handshakes = Counter(
            "coap_auth_edhoc_handshakes",
            "EDHOC handshakes at /.well-known/edhoc, by outcome",
            ["outcome"],
            registry=r,
        )
        self.oscore_contexts = Gauge(
            "coap_auth_oscore_contexts",
            "OSCORE security contexts held (made by EDHOC; provisioned ones apart)",
            registry=r,
        )
        # Children by label values, looked up once (labels() takes a lock and builds a key).
        self._request_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._store_children: dict[str, Any] = {}
        # When (injected clock) the store last answered and last failed: read by /healthz.
        self.store_answered_at: int | None = None
        self.store_failed_at: int | None = None

    def request(self, resource: str, code: str, seconds: float) -> None:
        """One answered request (`resource` is the endpoint's path: a fixed set)."""
        children = self._request_children.get((resource, code))
        if children is None:
            children = (
                self.requests.labels(resource, code),
                self.request_duration.labels(resource),
            )
            self._request_children[(resource, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def store_operation(self, operation: str) -> Any:
        child = self._store_children.get(operation)
        if child is None:
            child = self._store_children[operation] = self.store_duration.labels(operation)
        return child

    def grant(self, grant_type: GrantKind, token_format: str) -> None:
        """One token issued: `token_format` as the service minted it ("cwt" or "jwt")."""
        self.grants.labels(grant_type, token_format).inc()


class MeasuredStore:
    """The Store with every coroutine method timed and its failures counted; anything else
    passes through. Generic, so a method added to the Store protocol is measured too."""

    def __init__(self, store: Any, metrics: Metrics, now: Callable[[], int]) -> None:
        self.inner = store
        self._metrics = metrics
        self._now = now

    def __getattr__(self, name: str) -> Any:
        # Only called for names the proxy itself lacks: the store's.
        attribute = getattr(self.inner, name)
        if name in UNTIMED_STORE_METHODS or not inspect.iscoroutinefunction(attribute):
            return attribute
        wrapped = self._measured(name)
        # Found on the instance from now on: __getattr__ is not called for it again.
        setattr(self, name, wrapped)
        return wrapped

    def _measured(self, name: str) -> Callable[..., Any]:
        metrics, now = self._metrics, self._now
        histogram = metrics.store_operation(name)
        method = getattr(self.inner, name)

        async def measured(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await method(*args, **kwargs)
            except (CoapAuthError, OperatorError) as error:
                # A refusal decided inside a transaction (a reused refresh token, a bad key
                # transition) is an answer from the store, not its failure; StoreUnavailable
                # is one.
                if not isinstance(error, StoreUnavailable):
                    metrics.store_answered_at = now()
                    raise
                metrics.store_errors.labels(name, StoreErrorKind.UNAVAILABLE).inc()
                metrics.store_failed_at = now()
                raise
            except Exception:
                metrics.store_errors.labels(name, StoreErrorKind.FAULT).inc()
                metrics.store_failed_at = now()
                raise
            histogram.observe(time.perf_counter() - started)
            metrics.store_answered_at = now()
            return result

        return measured


def measured_store(store: S, metrics: Metrics, now: Callable[[], int]) -> S:
    """`store` measured into `metrics`, standing in for it (a store already measured for
    another service is unwrapped first: each service counts into its own registry)."""
    inner = store.inner if isinstance(store, MeasuredStore) else store
    return cast(S, MeasuredStore(inner, metrics, now))
