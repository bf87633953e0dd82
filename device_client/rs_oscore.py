"""The OSCORE profile of ACE (RFC 9203) at the resource server: the /authz-info exchange and
the context it derives (§4.2, §4.3), and the update of access rights over that context.

RFC 9203 relies on N2 (the RS's fresh nonce) for a fresh context. The RS also remembers the
last nonce1 values per input material (bounded: `NonceMemory`) and refuses a reused one with
4.01, as coap-auth's issue 15 asks: a replayed /authz-info request then derives nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import aiocoap
import cbor2

from coap_auth import untagged
from coap_auth.errors import BadRequest, CoapAuthError, MalformedToken, TokenError
from coap_auth.secure.ace_oscore import check_nonce, check_recipient_id, derive_context, new_nonce
from coap_auth.secure.contexts import OscoreContext
from coap_auth.secure.credentials import PeerCredential
from coap_auth.wire import AceParam, ContentFormat
from device_client.rs_common import bad_parameter, refusal
from device_client.verify import VerifiedToken

if TYPE_CHECKING:
    from device_client.rs import ResourceServer

log = logging.getLogger("device_client.rs")


def read_ace_map(payload: bytes) -> dict[Any, Any]:
    """An application/ace+cbor body: one CBOR map with an access_token. Raises BadRequest."""
    try:
        body = untagged.loads(payload)
    except Exception:  # cbor2 raises more than CBORDecodeError on odd input
        raise BadRequest("payload is not an application/ace+cbor map") from None
    if not isinstance(body, dict):
        raise BadRequest("payload is not an application/ace+cbor map")
    token = body.get(AceParam.ACCESS_TOKEN)
    if not isinstance(token, bytes) or not token:
        raise BadRequest("access_token missing or not a byte string")
    return body


def _parameters(body: dict[Any, Any]) -> tuple[bytes, bytes]:
    """nonce1 and ace_client_recipientid (RFC 9203 §4.1), or BadRequest."""
    id1 = body.get(AceParam.ACE_CLIENT_RECIPIENTID)
    try:
        nonce1 = check_nonce(body.get(AceParam.NONCE1), "nonce1")
        if id1 is None:
            raise MalformedToken("ace_client_recipientid missing")
        return nonce1, check_recipient_id(id1, "ace_client_recipientid")
    except MalformedToken as error:
        raise bad_parameter(error) from None


async def post_oscore(rs: ResourceServer, payload: bytes) -> aiocoap.Message:
    """RFC 9203 §4.2: verify, derive, answer 2.01 {nonce2, ace_server_recipientid}; or 4.00
    (parameters), 4.01 (token, reused nonce1), 4.03 (another audience). Keeps nothing on a
    refusal."""
    try:
        body = read_ace_map(payload)
        nonce1, id1 = _parameters(body)
        verified = await rs.verifier.verify(body[AceParam.ACCESS_TOKEN])
        material = verified.claims.cnf_osc
        if material is None or verified.material_id is None:
            raise BadRequest("token is not of the OSCORE profile (no cnf osc)")
        if rs.nonces.seen(verified.material_id, nonce1):
            raise TokenError("nonce1 already used with this token")
        nonce2 = new_nonce()
        id2 = rs.contexts.unused_id(lambda _: False, avoid=id1)
        try:
            context = derive_context(
                material,
                nonce1,
                nonce2,
                sender_id=id1,
                recipient_id=id2,
                peer=PeerCredential(verified.claims.sub, None),
                now=rs.verifier.clock.now(),
            )
        except MalformedToken as error:  # an AEAD, HKDF or contextId we cannot derive with
            raise bad_parameter(error) from None
    except CoapAuthError as error:
        log.info("authz-info: refused an OSCORE-profile request: %s", error.description)
        return refusal(error)
    context.access_token = verified
    rs.nonces.remember(verified.material_id, nonce1)
    rs.bindings.add_derived(context, verified.material_id)
    log.info(
        "authz-info: OSCORE context for %s (scope %s)", verified.claims.sub, verified.claims.scope
    )
    if rs.on_token is not None:
        rs.on_token(verified, f"oscore:{id2.hex()}")
    answer = {AceParam.NONCE2: nonce2, AceParam.ACE_SERVER_RECIPIENTID: id2}
    return aiocoap.Message(
        code=aiocoap.CREATED, payload=cbor2.dumps(answer), content_format=ContentFormat.ACE_CBOR
    )


def same_binding(context: OscoreContext, old: Any, new: VerifiedToken) -> bool:
    """Whether `new` may supersede the token of `context` (an update of access rights): the
    same client (sub), and the same OSCORE input material id (RFC 9203 §4.2), or a cnf naming
    the key EDHOC authenticated (draft-ietf-ace-edhoc-oscore-profile-11 §4.6.1). Raises
    nothing."""
    if not isinstance(old, VerifiedToken) or new.claims.sub != old.claims.sub:
        # The same client only: two clients registered with one key (or a req_cnf naming
        # another's key) must not hand each other their rights (outsider round 2).
        return False
    if old.material_id is not None:
        return new.material_id == old.material_id
    credential = context.peer.credential
    key = new.claims.cnf_key
    return credential is not None and key is not None and credential.same_key(dict(key))
