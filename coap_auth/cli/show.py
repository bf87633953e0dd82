"""`coap-auth show`: the service's key set and revocation list as text, for operators: /keys
read over CoAP from the running service, the TRL from the store (or over CoAP in lab mode).

CBOR is printed in RFC 8949 §8 diagnostic notation by a small printer here rather than the
`cbor-diag` package: that is Rust with no wheel for 32-bit ARM (a Raspberry Pi may run the
service), for a display aid of some forty lines over values cbor2 has already decoded.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from typing import Any

import aiocoap
import cbor2

from coap_auth.addresses import authority
from coap_auth.cli.runtime import coap_get, print_rows, seconds, when, with_service
from coap_auth.config import Settings
from coap_auth.errors import OperatorError
from coap_auth.service import AuthService
from coap_auth.wire import CoseAlg, CoseCurve, CoseKeyOp, CoseKeyParam, TrlParam

DEFAULT_TIMEOUT = 10.0  # s: an answer, Echo round trip and block-wise transfer included

# Readable names of COSE values (RFC 9053 §2, §7; RFC 9052 Table 5), as operators write them.
_KTY = {1: "OKP", 2: "EC2", 4: "Symmetric"}
_ALG = {
    CoseAlg.ES256: "ES256",
    CoseAlg.EDDSA: "EdDSA",
    CoseAlg.HMAC_256_64: "HMAC 256/64",
    CoseAlg.AES_CCM_16_64_128: "AES-CCM-16-64-128",
}
_CRV = {CoseCurve.P256: "P-256", CoseCurve.ED25519: "Ed25519"}
_KEY_OPS = {CoseKeyOp.SIGN: "sign", CoseKeyOp.VERIFY: "verify"}


# -- CBOR diagnostic notation ------------------------------------------------------------------


def diagnostic(value: Any) -> str:
    """`value` (as cbor2 decodes it) in CBOR diagnostic notation (RFC 8949 §8), on one line."""
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if value is cbor2.undefined:
        return "undefined"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, bytes):
        return f"h'{value.hex()}'"
    if isinstance(value, str):
        # Escaped, every control and format character too (C1, DEL, bidi overrides): a
        # hostile server's text reaches a terminal.
        return "".join(
            c if c.isprintable() else json.dumps(c)[1:-1]
            for c in json.dumps(value, ensure_ascii=False)
        )
    if isinstance(value, cbor2.CBORTag):
        return f"{value.tag}({diagnostic(value.value)})"
    if isinstance(value, cbor2.CBORSimpleValue):
        return f"simple({value.value})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(diagnostic(item) for item in value) + "]"
    return repr(value)  # what cbor2 decodes a semantic tag into (datetime, Decimal, ...)


# -- CoAP ------------------------------------------------------------------------------------


def _uri(host: str, port: int, path: str) -> str:
    return f"coap://{authority(host, port)}{path}"


async def _get(uri: str, timeout: float) -> aiocoap.Message:
    """GET `uri` (coap_get); OperatorError, in one line, unless the answer is 2.05."""
    try:
        response = await coap_get(uri, timeout)
    except TimeoutError:
        raise OperatorError(f"no answer from {uri} within {timeout:g} s") from None
    except (OSError, aiocoap.error.Error) as exc:
        # aiocoap's NetworkError carries the socket's error (ECONNREFUSED: nothing listens).
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        reason = getattr(cause, "strerror", None) or type(exc).__name__
        raise OperatorError(f"cannot reach {uri}: {reason}") from None
    if response.code != aiocoap.CONTENT:
        raise OperatorError(f"{uri} answered {response.code}{_refusal_hint(response)}")
    return response


def _refusal_hint(response: aiocoap.Message) -> str:
    if response.code == aiocoap.UNAUTHORIZED:
        return (
            " (OSCORE required: read the list from the store with `coap-auth show trl`;"
            " over plain CoAP only while require_oscore is off)"
        )
    return ""


def _decode(response: aiocoap.Message, uri: str) -> Any:
    try:
        return cbor2.loads(response.payload)
    except Exception:  # cbor2 raises several kinds; any of them means "not CBOR"
        raise OperatorError(f"{uri} answered something that is not CBOR") from None


# -- show keys -------------------------------------------------------------------------------


def key_view(cose_key: Any) -> dict[str, Any]:
    """One COSE_Key of /keys with names and hex instead of labels and bytes. Whatever is not
    a known label or value is shown in diagnostic notation, escaped: what a server sends
    never reaches the terminal raw. Raises ValueError, TypeError or RecursionError for what
    cannot be shown at all (a huge integer, a cyclic structure)."""
    if not isinstance(cose_key, Mapping):
        return {"unreadable": diagnostic(cose_key)}
    view: dict[str, Any] = {}
    rest = dict(cose_key)
    kty = rest.pop(CoseKeyParam.KTY, None)
    view["kid"] = _hex(rest.pop(CoseKeyParam.KID, None))
    view["kty"] = _named(_KTY, kty)
    view["alg"] = _named(_ALG, rest.pop(CoseKeyParam.ALG, None))
    if CoseKeyParam.KEY_OPS in rest:
        ops = rest.pop(CoseKeyParam.KEY_OPS)
        view["key_ops"] = (
            [_named(_KEY_OPS, op) for op in ops] if isinstance(ops, list) else [diagnostic(ops)]
        )
    if kty in (1, 2):  # the curve and coordinates of OKP and EC2 keys (RFC 9053 §7.1, §7.2)
        view["crv"] = _named(_CRV, rest.pop(CoseKeyParam.CRV, None))
        view["x"] = _hex(rest.pop(CoseKeyParam.X, None))
        if CoseKeyParam.Y in rest:
            y = rest.pop(CoseKeyParam.Y)
            view["y"] = y if isinstance(y, bool) else _hex(y)  # a bool: point compression
    for label, value in rest.items():  # anything else, as it came
        view[diagnostic(label)] = diagnostic(value)
    return view


def _named(names: Mapping[Any, str], value: Any) -> str:
    """The readable name of a known COSE value, else the value in diagnostic notation."""
    if isinstance(value, int) and not isinstance(value, bool) and value in names:
        return names[value]
    return diagnostic(value)


def _hex(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) else diagnostic(value)


async def cmd_show_keys(args: argparse.Namespace, settings: Settings) -> int:
    uri = _uri(args.host, settings.port, "/keys")
    response = await _get(uri, args.timeout)
    key_set = _decode(response, uri)
    if args.diag:
        try:
            print(diagnostic(key_set))
        except (ValueError, RecursionError):
            raise OperatorError(f"{uri} answered CBOR that cannot be shown") from None
        return 0
    try:
        if not isinstance(key_set, list):
            raise OperatorError(f"{uri} answered no COSE_KeySet: {diagnostic(key_set)[:60]}")
        views = [key_view(cose_key) for cose_key in key_set]
    except (ValueError, TypeError, RecursionError):
        # A huge integer (str() refuses), a cyclic value (shared references), a bad key type.
        raise OperatorError(f"{uri} answered a key set that cannot be shown") from None
    if args.json:
        print(json.dumps(views, indent=2))
        return 0
    print(f"{uri}: {len(views)} keys (COSE_KeySet, {len(response.payload)} bytes)")
    for view in views:
        head = ("kid", "kty", "alg", "crv", "key_ops")
        print(
            "  ".join(
                f"{name} {','.join(view[name]) if name == 'key_ops' else view[name]}"
                for name in head
                if name in view
            )
        )
        for name, value in view.items():
            if name not in head:
                print(f"    {name} {value}")
    return 0


# -- show trl --------------------------------------------------------------------------------


@with_service
async def _show_trl_from_store(args: argparse.Namespace, service: AuthService) -> int:
    """The operator's view: every listed hash, in the form `tokens revoke --hash` takes, with
    the number of the update that listed it (while the store keeps that update)."""
    listing = await service.admin.revocation_listing()
    first, last = listing.first, listing.last
    rows = [
        {"hash": listed.token_hash.hex(), "update": listed.update, "listed": when(listed.at)}
        for listed in listing.hashes
    ]
    if args.json:
        print(json.dumps({"updates": [first, last], "hashes": rows}, indent=2))
        return 0
    kept = f"updates {first}-{last} kept" if last else "no updates kept"
    print(f"revocation list: {len(rows)} hashes, latest update {last} ({kept})")
    if rows:
        for row in rows:
            row["update"] = "-" if row["update"] is None else row["update"]
        print_rows(rows, False, ["hash", "update", "listed"])
    return 0


async def _show_trl_over_coap(args: argparse.Namespace, settings: Settings) -> int:
    uri = _uri(args.host, settings.port, "/revoke/trl")
    response = await _get(uri, args.timeout)
    answer = _decode(response, uri)
    if args.diag:
        print(diagnostic(answer))
        return 0
    full_set = answer.get(TrlParam.FULL_SET) if isinstance(answer, Mapping) else None
    if not isinstance(full_set, list):
        raise OperatorError(f"{uri} answered no full TRL: {diagnostic(answer)[:60]}")
    hashes = [_hex(item) for item in full_set]
    cursor = answer.get(TrlParam.CURSOR)
    if args.json:
        print(json.dumps({"cursor": cursor, "hashes": hashes}, indent=2))
        return 0
    print(f"{uri}: {len(hashes)} hashes, cursor {diagnostic(cursor)}")
    for token_hash in hashes:
        print(token_hash)
    return 0


async def cmd_show_trl(args: argparse.Namespace, settings: Settings) -> int:
    if args.coap:
        return await _show_trl_over_coap(args, settings)
    if args.diag:
        raise OperatorError("--diag shows what came over CoAP: use it with --coap")
    return await _show_trl_from_store(args, settings)


# -- parsers ---------------------------------------------------------------------------------


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    coap = argparse.ArgumentParser(add_help=False)
    coap.add_argument(
        "--host", default="localhost", help="where the service runs (default localhost)"
    )
    coap.add_argument("--port", type=int, help="its UDP port (default: the `port` setting)")
    coap.add_argument(
        "--timeout", type=seconds, default=DEFAULT_TIMEOUT, help="seconds to wait (default 10)"
    )
    coap.add_argument(
        "--diag", action="store_true", help="print the CBOR answer in diagnostic notation"
    )

    show = sub.add_parser("show", help="the key set and the revocation list as text")
    s_sub = show.add_subparsers(metavar="WHAT", required=True)
    keys = s_sub.add_parser(
        "keys", parents=[common, listing, coap], help="GET /keys from the running service"
    )
    keys.set_defaults(command_fn=cmd_show_keys)
    trl = s_sub.add_parser(
        "trl",
        parents=[common, listing, coap],
        help="the revocation list: from the store, or with --coap from the running service",
    )
    trl.add_argument(
        "--coap",
        action="store_true",
        help="GET /revoke/trl over plain CoAP (only while require_oscore is off)",
    )
    trl.set_defaults(command_fn=cmd_show_trl)
