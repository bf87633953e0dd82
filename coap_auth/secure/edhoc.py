"""EDHOC (RFC 9528) over CoAP (Appendix A.2), method 3, cipher suite 2, on lakers-python.

`Responder` is the server's side of `/.well-known/edhoc`: message_1 in, message_2 out;
message_3 in, an authenticated OSCORE context out. `establish` is a device's side.

What a stranger can make the responder hold is bounded: a pending handshake (sent message_2,
waiting for message_3) lives at most `handshake_timeout` seconds, at most `max_pending` exist,
and one address holds at most `per_address` of them (its own oldest goes first), so a flood
of message_1 from one address pushes out only its own; when all are taken, the address holding
the most loses its oldest. A context joins the table only after
message_3 authenticated its peer. Spoofed source addresses each holding one handshake would
all tie, and the oldest (a real device's, say) would go: so once half the table is taken
(`under_pressure`), the server's amplification guard sends message_1 from an address it has
not verified the Echo challenge first (RFC 9528 §9.7, RFC 9175 §2.4), and only proven
addresses add handshakes from then on.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth import untagged
from coap_auth.secure.contexts import (
    MASTER_SALT_BYTES,
    MASTER_SECRET_BYTES,
    MAX_ID_BYTES,
    ContextTable,
    OscoreContext,
)
from coap_auth.secure.credentials import (
    EDHOC_METHOD,
    EDHOC_SUITE,
    CredentialError,
    EdhocCredential,
    EdhocIdentity,
    PeerCredential,
    make_credential,
    parse_credential,
)
from coap_auth.text import has_control_character
from coap_auth.wire import ContentFormat

log = logging.getLogger("coap_auth.edhoc")

AEAD_TAG_BYTES = 8  # AES-CCM-16-64-128
# lakers-python 0.6 misreads a 2-byte bstr length (256 bytes or more) and panics; our largest
# message_3 (a credential by value, MAX_CCS_BYTES) is well under it.
MAX_CIPHERTEXT_3_BYTES = 256
# lakers-python 0.6 parses at most this many EAD items and ignores the rest (a critical one
# among them would go unseen, RFC 9528 §3.8).
MAX_EAD_ITEMS = 4
# The failures of message_3 that refuse the initiator (its credential), not its bytes.
_REFUSALS = frozenset({"message_3 not accepted", "message_3 does not verify"})
EDHOC_CBOR_SEQ = ContentFormat.EDHOC_CBOR_SEQ
CID_EDHOC_CBOR_SEQ = ContentFormat.CID_EDHOC_CBOR_SEQ
MESSAGE_1_PREFIX = b"\xf5"  # CBOR true: "this is message_1" (Appendix A.2.1)
# RFC 9528 §6: error codes.
ERR_UNSPECIFIED = 1
ERR_WRONG_SUITE = 2
# ID_CRED labels: kid (COSE header 4) and kccs (14).
ID_CRED_KID = 4
ID_CRED_KCCS = 14
_KCCS_PREFIX = bytes([0xA1, ID_CRED_KCCS])  # {14: ...}

# Resolve a registered id to the COSE_Keys registered under it (a client's, an audience's).
Resolver = Callable[[str], Awaitable[list[Any]]]
# An EAD item as the hook below sees it: label (positive), critical, value (or None).
EadItem = tuple[int, bool, bytes | None]


class HandshakeOutcome(StrEnum):
    """How a handshake at the responder ended: the `outcome` label of the EDHOC metric."""

    COMPLETED = "completed"
    FAILED = "failed"  # a message that could not be processed (an EDHOC error was sent)
    REFUSED = "refused"  # message_3 refused: its credential is not accepted, or it fails
    EVICTED = "evicted"  # an unfinished handshake pushed out by newer ones
    EXPIRED = "expired"  # an unfinished handshake that timed out


@dataclass(frozen=True, slots=True)
class Message3Binding:
    """What an `Ead3Handler` decided for one message_3: how to resolve the subject ID_CRED_I
    names to keys (for this handshake only), and `bind`, called with the authenticated context
    before it joins the table (it may attach what authorizes it; raising EdhocFailure refuses
    the handshake, and nothing is kept)."""

    resolve: Resolver
    bind: Callable[[OscoreContext], None]


# A resource server's say over message_3 (device_client.rs: the access token in EAD_3 of the
# EDHOC + OSCORE profile of ACE): called with every EAD_3 item once message_3 decrypted and
# before the initiator's credential is looked up; raises EdhocFailure to refuse (critical
# items it does not know included). Without one (the AS), a critical EAD_3 item is refused.
Ead3Handler = Callable[[list[EadItem]], Awaitable[Message3Binding]]


class EdhocFailure(Exception):
    """An EDHOC error message for the peer (RFC 9528 §6); `info` is what it says, and what
    the log line says. Never carries key material."""

    def __init__(self, info: str, code: int = ERR_UNSPECIFIED) -> None:
        super().__init__(info)
        self.code = code
        self.info = info

    def message(self, *, compact: bool = False) -> bytes:
        """The error message: ERR_CODE and ERR_INFO as a CBOR sequence; `compact` leaves the
        diagnostic text empty (the answer to a small request stays within 3x its size)."""
        detail: Any = (
            EDHOC_SUITE if self.code == ERR_WRONG_SUITE else ("" if compact else self.info)
        )
        return cbor2.dumps(self.code) + cbor2.dumps(detail)


@dataclass(slots=True)
class _Pending:
    responder: Any = field(repr=False)
    c_i: bytes
    address: str
    started: int


class Responder:
    def __init__(
        self,
        identity: EdhocIdentity,
        contexts: ContextTable,
        resolve: Resolver,
        now: Callable[[], int],
        *,
        max_pending: int = 256,
        per_address: int = 8,
        handshake_timeout: int = 10,
        ead_3: Ead3Handler | None = None,
        outcome: Callable[[HandshakeOutcome], None] = lambda outcome: None,
    ) -> None:
        self.identity = identity
        # Told how each handshake ended, for metrics: completed, refused (message_3 named
        # no registered credential or did not verify), failed (malformed, unknown C_R),
        # expired (no message_3 in time), evicted (pushed out by newer ones).
        self._outcome = outcome
        self._ead_3 = ead_3
        self.contexts = contexts
        self._resolve = resolve
        self._now = now
        self.max_pending = max_pending
        self.per_address = per_address
        self.handshake_timeout = handshake_timeout
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        # Verified against when ID_CRED_I names nobody (a key nobody holds).
        self._stand_in = make_credential("-", ec.generate_private_key(ec.SECP256R1()).public_key())
        self._by_address: dict[str, list[bytes]] = {}

    @property
    def pending(self) -> int:
        """How many handshakes wait for their message_3 (expired ones included until the
        next message arrives). Raises nothing."""
        return len(self._pending)

    @property
    def under_pressure(self) -> bool:
        """Whether the handshakes still pending (expired ones dropped first) take half of
        `max_pending` or more: a server then sends message_1 from an unverified address the
        Echo challenge before it is processed (module docstring). Raises nothing."""
        self._expire(self._now())
        return 2 * len(self._pending) >= self.max_pending

    def message_1(self, message_1: bytes, address: str) -> bytes:
        """Process message_1 (without its `true` prefix); returns message_2.
        Raises EdhocFailure."""
        try:
            return self._message_1(message_1, address)
        except EdhocFailure:
            self._outcome(HandshakeOutcome.FAILED)
            raise

    def _message_1(self, message_1: bytes, address: str) -> bytes:
        import lakers

        _check_message_1(message_1)
        responder = lakers.EdhocResponder(
            r=self.identity.private_scalar, cred_r=self.identity.credential.ccs
        )
        with _lakers_refusal(EdhocFailure("message_1 malformed")):
            c_i, ead_1 = responder.process_message_1(message_1)
        if any(item.is_critical() for item in ead_1 or ()):
            raise EdhocFailure("critical EAD item not supported")
        if not 0 < len(c_i) <= MAX_ID_BYTES:
            # C_I becomes our OSCORE sender id (RFC 9528 Appendix A.1), at most 7 bytes.
            raise EdhocFailure("C_I too long for an OSCORE sender id")
        now = self._now()
        self._expire(now)
        c_r = self.contexts.unused_id(lambda cid: cid in self._pending, avoid=c_i)
        with _lakers_refusal(EdhocFailure("message_1 malformed")):
            message_2 = responder.prepare_message_2(_by_reference(), c_r, None)
        self._hold(c_r, _Pending(responder, c_i, address, now))
        return bytes(message_2)

    async def message_3(self, payload: bytes) -> OscoreContext:
        """Process C_R followed by message_3; returns the new context, already in the table.
        Raises EdhocFailure (the handshake is over either way: a replayed message_3 finds
        nothing)."""
        try:
            context = await self._message_3(payload)
        except EdhocFailure as failure:
            self._outcome(
                HandshakeOutcome.REFUSED if failure.info in _REFUSALS else HandshakeOutcome.FAILED
            )
            raise
        self._outcome(HandshakeOutcome.COMPLETED)
        return context

    async def _message_3(self, payload: bytes) -> OscoreContext:
        if untagged.refused(payload):  # C_R, before cbor2's tag decoders see it
            raise EdhocFailure("no connection identifier before message_3")
        stream = io.BytesIO(payload)
        try:
            c_r = _decode_connection_id(cbor2.CBORDecoder(stream).decode())
        except Exception:  # cbor2 raises more than CBORDecodeError on odd tags
            raise EdhocFailure("no connection identifier before message_3") from None
        message_3 = stream.read()
        self._expire(self._now())
        pending = self._take(c_r, release=False)
        if pending is None:
            raise EdhocFailure("no handshake in progress for this connection identifier")
        try:
            return await self._finish(pending, c_r, message_3)
        finally:
            # C_R stayed reserved across the awaits below: no other handshake or RFC 9203
            # exchange was handed it meanwhile.
            self.contexts.release(c_r)

    async def _finish(self, pending: _Pending, c_r: bytes, message_3: bytes) -> OscoreContext:
        responder = pending.responder
        _check_message_3(message_3)
        with _lakers_refusal(EdhocFailure("message_3 does not verify")):
            id_cred_i, ead_3 = responder.parse_message_3(message_3)
        resolve, bind = self._resolve, None
        if self._ead_3 is not None:
            binding = await self._ead_3([_ead_item(item) for item in ead_3 or ()])
            resolve, bind = binding.resolve, binding.bind
        elif any(item.is_critical() for item in ead_3 or ()):
            raise EdhocFailure("critical EAD item not supported")
        # An unknown or refused credential is verified against a stand-in all the same, and
        # fails with the same error: the answer and its cost do not tell whether an id exists.
        credential = await self._credential(bytes(id_cred_i), resolve)
        refused = EdhocFailure("message_3 not accepted")
        with _lakers_refusal(refused):
            responder.verify_message_3((credential or self._stand_in).ccs)
        if credential is None:
            raise refused
        responder.completed_without_message_4()
        context = OscoreContext(
            bytes(responder.edhoc_exporter(0, [], MASTER_SECRET_BYTES)),
            bytes(responder.edhoc_exporter(1, [], MASTER_SALT_BYTES)),
            sender_id=pending.c_i,
            recipient_id=c_r,
            peer=PeerCredential(credential.subject, credential),
            now=self._now(),
        )
        if bind is not None:
            bind(context)
        self.contexts.add(context)
        return context

    async def _credential(
        self, id_cred: bytes, resolve: Resolver | None = None
    ) -> EdhocCredential | None:
        """The registered credential ID_CRED_I names (by kid, or a CCS by value), or None;
        `resolve` (default: the responder's) finds the keys registered under a subject."""
        resolve = self._resolve if resolve is None else resolve
        if id_cred.startswith(_KCCS_PREFIX):
            # By value: the CCS's own bytes, exactly as sent (the MAC covers them).
            try:
                offered = parse_credential(id_cred[len(_KCCS_PREFIX) :])
            except CredentialError:
                return None
            if not _usable_id(offered.subject):
                return None
            keys = await resolve(offered.subject)
            return offered if any(offered.same_key(key) for key in keys) else None
        try:
            named = untagged.loads(id_cred)
        except Exception:
            return None
        kid = named.get(ID_CRED_KID) if isinstance(named, dict) and len(named) == 1 else None
        if not isinstance(kid, bytes):
            return None
        try:
            subject = kid.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not _usable_id(subject):
            return None
        for key in await resolve(subject):
            try:
                registered = make_credential(subject, key)
            except CredentialError:
                continue
            if registered.kid == kid:
                return registered
        return None

    def _hold(self, c_r: bytes, pending: _Pending) -> None:
        mine = self._by_address.setdefault(pending.address, [])
        while len(mine) >= self.per_address:
            self._take(mine[0])
            self._outcome(HandshakeOutcome.EVICTED)
        while len(self._pending) >= self.max_pending:
            # Fair: the address holding the most handshakes loses its oldest, so a device
            # with one handshake in flight goes only when every address holds just one.
            busiest = max(self._by_address.values(), key=len)
            self._take(busiest[0])
            self._outcome(HandshakeOutcome.EVICTED)
        self._pending[c_r] = pending
        self._by_address.setdefault(pending.address, []).append(c_r)
        self.contexts.reserve(c_r)

    def _take(self, c_r: bytes, *, release: bool = True) -> _Pending | None:
        """The pending handshake of `c_r`, no longer pending; its C_R stays reserved in the
        context table only with `release=False` (message_3 releases it when done)."""
        pending = self._pending.pop(c_r, None)
        if pending is not None:
            ids = self._by_address[pending.address]
            ids.remove(c_r)
            if not ids:
                del self._by_address[pending.address]
            if release:
                self.contexts.release(c_r)
        return pending

    def _expire(self, now: int) -> None:
        while self._pending:
            c_r, oldest = next(iter(self._pending.items()))
            if now - oldest.started < self.handshake_timeout:
                break
            self._take(c_r)
            self._outcome(HandshakeOutcome.EXPIRED)


def _ead_item(item: Any) -> EadItem:
    value = item.value()
    return int(item.label()), bool(item.is_critical()), None if value is None else bytes(value)


def _by_reference() -> Any:
    import lakers

    return lakers.CredentialTransfer.ByReference


@contextlib.contextmanager
def _lakers_refusal(refusal: Exception) -> Iterator[None]:
    """Turn lakers' refusal of peer input into `refusal`: a ValueError, or a Rust panic
    (lakers-python 0.6 panics on some malformed input; pyo3's PanicException derives from
    BaseException and cannot be imported, so it is known by name)."""
    try:
        yield
    except ValueError:
        raise refusal from None
    except BaseException as error:
        if type(error).__name__ != "PanicException":
            raise
        raise refusal from None


def _usable_id(subject: str) -> bool:
    """Whether an id is one the registry could hold (no control characters: PostgreSQL
    refuses NUL, and none is ever registered)."""
    return bool(subject) and not has_control_character(subject)


def _check_message_1(message_1: bytes) -> None:
    """RFC 9528 §5.2.3: refuse another method, and a selected suite we do not support with
    ERR_CODE 2 naming ours (the initiator may retry with it); and, before lakers sees it, a
    G_X that is not the x-coordinate of a P-256 point (lakers 0.6 panics on one)."""
    if untagged.refused(message_1, sequence=True):  # before cbor2's tag decoders see it
        raise EdhocFailure("message_1 malformed")
    stream = io.BytesIO(message_1)
    decoder = cbor2.CBORDecoder(stream)
    try:
        method = decoder.decode()
        suites = decoder.decode()
    except Exception:  # cbor2 raises more than CBORDecodeError on odd tags
        raise EdhocFailure("message_1 malformed") from None
    if method != EDHOC_METHOD or isinstance(method, bool):
        raise EdhocFailure("only method 3 (static DH keys) is supported")
    offered = suites if isinstance(suites, list) else [suites]
    if not offered or not all(isinstance(s, int) and not isinstance(s, bool) for s in offered):
        raise EdhocFailure("message_1 malformed")
    if offered[-1] != EDHOC_SUITE:
        raise EdhocFailure("cipher suite not supported", ERR_WRONG_SUITE)
    try:
        g_x = decoder.decode()
    except Exception:  # cbor2 raises more than CBORDecodeError on odd tags
        raise EdhocFailure("message_1 malformed") from None
    if not _is_p256_x(g_x):
        raise EdhocFailure("message_1 malformed")
    # C_I, then EAD items: a label (negative: critical) and maybe a value (RFC 9528 §3.8).
    try:
        rest = []
        while stream.tell() < len(message_1):
            rest.append(decoder.decode())
    except Exception:  # cbor2 raises more than CBORDecodeError on odd tags
        raise EdhocFailure("message_1 malformed") from None
    if not _shortest(message_1, [method, suites, g_x, *rest]):
        raise EdhocFailure("message_1 malformed")
    labels = [item for item in rest[1:] if isinstance(item, int) and not isinstance(item, bool)]
    if any(label < 0 for label in labels):
        raise EdhocFailure("critical EAD item not supported")
    if len(labels) > MAX_EAD_ITEMS:
        raise EdhocFailure("too many EAD items")


def _check_message_3(message_3: bytes) -> None:
    """RFC 9528 §5.4.3: message_3 is one byte string, CIPHERTEXT_3, at least an AEAD tag
    long (and lakers 0.6 panics on a short or truncated one)."""
    if untagged.refused(message_3):  # before cbor2's tag decoders see it
        raise EdhocFailure("message_3 malformed")
    stream = io.BytesIO(message_3)
    try:
        ciphertext = cbor2.CBORDecoder(stream).decode()
    except Exception:  # cbor2 raises more than CBORDecodeError on odd tags
        raise EdhocFailure("message_3 malformed") from None
    if (
        not isinstance(ciphertext, bytes)
        or not AEAD_TAG_BYTES < len(ciphertext) < MAX_CIPHERTEXT_3_BYTES
        or not _shortest(message_3, [ciphertext])
    ):
        raise EdhocFailure("message_3 malformed")


def _shortest(message: bytes, items: list[Any]) -> bool:
    """Whether `message` is exactly `items` as a CBOR sequence with every head in its
    shortest form and no indefinite lengths (RFC 9528 §3.1 uses deterministic CBOR): cbor2
    reads other forms that lakers 0.6 panics on (a byte string's length in 2 bytes where 1
    would do, say), and nothing may follow."""
    try:
        return b"".join(cbor2.dumps(item) for item in items) == message
    except Exception:  # an item cbor2 read but cannot write back: not ours to pass on
        return False


def _check_message_2(message_2: bytes) -> bool:
    """Whether message_2 is one byte string starting with a P-256 G_Y (RFC 9528 §5.3.1);
    lakers 0.6 panics on an off-curve G_Y."""
    if untagged.refused(message_2):
        return False
    stream = io.BytesIO(message_2)
    try:
        body = cbor2.CBORDecoder(stream).decode()
    except Exception:  # cbor2 raises more than CBORDecodeError on odd tags
        return False
    return isinstance(body, bytes) and _shortest(message_2, [body]) and _is_p256_x(body[:32])


def _is_p256_x(value: Any) -> bool:
    if not isinstance(value, bytes) or len(value) != 32:
        return False
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x02" + value)
    except ValueError:
        return False
    return True


def _decode_connection_id(item: Any) -> bytes:
    """C_X as sent (RFC 9528 §3.3.2): a one-byte id may travel as a CBOR int -24..23."""
    if isinstance(item, bool):
        raise ValueError("not a connection identifier")
    if isinstance(item, int) and -24 <= item <= 23:
        return cbor2.dumps(item)
    if isinstance(item, bytes):
        return item
    raise ValueError("not a connection identifier")


def encode_connection_id(c_x: bytes) -> bytes:
    """The CBOR form of C_X, as `_decode_connection_id` reads it back."""
    if len(c_x) == 1 and (c_x[0] <= 0x17 or 0x20 <= c_x[0] <= 0x37):
        return c_x
    return cbor2.dumps(c_x)


class EdhocRefused(Exception):
    """The server answered a handshake message with an error (or not at all as EDHOC).
    `at_message_3`: the server had authenticated itself (message_2 verified) and refused our
    message_3 with an EDHOC error message; otherwise we do not know whom we spoke to, or what
    (if anything) it refused: an answer to message_3 that is no EDHOC error (an Echo
    challenge after the one answered, say) leaves it False."""

    def __init__(self, host: str, detail: str, *, at_message_3: bool = False) -> None:
        super().__init__(f"EDHOC with {host} failed: {detail}")
        self.host = host
        self.at_message_3 = at_message_3


async def establish(
    context: Any,
    base_uri: str,
    identity: EdhocIdentity,
    peer: EdhocCredential,
    *,
    ead_3: list[tuple[int, bool, bytes]] | None = None,
) -> OscoreContext:
    """Run EDHOC as initiator with the server at `base_uri` (coap://host:port) over an
    aiocoap client context, authenticating it by its provisioned credential `peer`; `ead_3`
    items (label, critical, value) go in message_3 (an access token, say).
    Returns the OSCORE context; raises EdhocRefused, or aiocoap's network errors."""
    import secrets

    import aiocoap
    import lakers

    from coap_auth.echo import request_answering_echo

    host = base_uri.split("://", 1)[-1]
    uri = base_uri.rstrip("/") + "/.well-known/edhoc"
    initiator = lakers.EdhocInitiator()
    c_i = secrets.token_bytes(2)
    message_1 = bytes(initiator.prepare_message_1(c_i=c_i, ead_1=None))

    async def post(payload: bytes, *, message_3: bool = False) -> bytes:
        def build() -> aiocoap.Message:
            return aiocoap.Message(
                code=aiocoap.POST, uri=uri, payload=payload, content_format=CID_EDHOC_CBOR_SEQ
            )

        # A server that has not verified our address may answer with an Echo challenge first
        # (RFC 9175 §2.4): when message_2 is large, or while it holds many handshakes.
        _, response = await request_answering_echo(context, build)
        if response.code != aiocoap.CHANGED:
            # Only an EDHOC error message is the server refusing message_3 (our credential,
            # the token in EAD_3); another answer (a second Echo challenge, say, which anyone
            # on the path can forge) says nothing about them.
            refused_3 = message_3 and _is_edhoc_error(response)
            raise EdhocRefused(host, _describe_error(response), at_message_3=refused_3)
        return bytes(response.payload)

    message_2 = await post(MESSAGE_1_PREFIX + message_1)
    refused = EdhocRefused(host, "message_2 does not verify against the server's credential")
    if not _check_message_2(message_2):
        raise refused
    with _lakers_refusal(refused):
        c_r, id_cred_r, _ead_2 = initiator.parse_message_2(message_2)
        checked = lakers.credential_check_or_fetch(id_cred_r, peer.ccs)
        initiator.verify_message_2(identity.private_scalar, identity.credential.ccs, checked)
        transfer = (
            lakers.CredentialTransfer.ByReference
            if identity.credential.by_reference
            else lakers.CredentialTransfer.ByValue
        )
        items = [lakers.EADItem(label, critical, value) for label, critical, value in ead_3 or ()]
        message_3, _prk_out = initiator.prepare_message_3(transfer, items or None)
    c_r = bytes(c_r)
    await post(encode_connection_id(c_r) + bytes(message_3), message_3=True)
    return initiator_context(initiator, c_i, c_r, peer)


def initiator_context(
    initiator: Any, c_i: bytes, c_r: bytes, peer: EdhocCredential
) -> OscoreContext:
    """The initiator's OSCORE context once its message_3 was accepted (RFC 9528 Appendix A.1:
    it sends with C_R, receives with C_I; no message_4)."""
    initiator.completed_without_message_4()
    return OscoreContext(
        bytes(initiator.edhoc_exporter(0, [], MASTER_SECRET_BYTES)),
        bytes(initiator.edhoc_exporter(1, [], MASTER_SALT_BYTES)),
        sender_id=c_r,
        recipient_id=c_i,
        peer=PeerCredential(peer.subject, peer),
    )


def _is_edhoc_error(response: Any) -> bool:
    """Whether `response` is an EDHOC error message (RFC 9528 §6, Appendix A.2.3): 4.00 with
    an integer ERR_CODE first, in application/edhoc+cbor-seq (or with no Content-Format: a
    lenient reading of a server that leaves it out)."""
    import aiocoap

    if response.code != aiocoap.BAD_REQUEST:
        return False
    if response.opt.content_format not in (None, EDHOC_CBOR_SEQ):
        return False
    if untagged.refused(bytes(response.payload), sequence=True):
        return False
    try:
        err_code = cbor2.CBORDecoder(io.BytesIO(bytes(response.payload))).decode()
    except Exception:  # cbor2 raises more than CBORDecodeError on odd input
        return False
    return isinstance(err_code, int) and not isinstance(err_code, bool)


def _describe_error(response: Any) -> str:
    code = str(response.code)
    if response.opt.content_format == EDHOC_CBOR_SEQ and not untagged.refused(
        bytes(response.payload), sequence=True
    ):
        try:
            stream = io.BytesIO(bytes(response.payload))
            decoder = cbor2.CBORDecoder(stream)
            err_code, err_info = decoder.decode(), decoder.decode()
            return f"{code}, EDHOC error {err_code}: {str(err_info)[:80]}"
        except Exception:
            pass
    return code
