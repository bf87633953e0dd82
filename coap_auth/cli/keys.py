"""`coap-auth keys ...` and `coap-auth audit ...`: signing keys and the audit log."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

import cbor2

from coap_auth.cli.registry import operator_actor
from coap_auth.cli.runtime import print_rows, when, with_service
from coap_auth.errors import OperatorError
from coap_auth.service import AuthService
from coap_auth.service.admin import DEFAULT_FAMILY


def parse_kid(text: str) -> bytes:
    """The one text form of a kid: lowercase hex (as `keys list` prints it)."""
    if text != text.lower():
        raise OperatorError("a kid is written in lowercase hex, as `keys list` prints it")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise OperatorError("a kid is written in lowercase hex, as `keys list` prints it") from None


@with_service
async def cmd_keys_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = []
    for key in service.admin.list_keys(args.family):
        row = key.public_view()
        for name in ("created", "activated", "retired", "ended"):
            row[name] = when(row[f"{name}_at"])
        row["retire_until"] = when(key.retire_until)
        rows.append(row)
    print_rows(
        rows,
        args.json,
        [
            "kid",
            "family",
            "alg",
            "state",
            "created",
            "activated",
            "retired",
            "retire_until",
            "ended",
        ],
    )
    return 0


@with_service
async def cmd_keys_rotate(args: argparse.Namespace, service: AuthService) -> int:
    ring = await service.admin.rotate_keys(args.family, operator_actor(), force=args.force)
    next_key = ring.next
    print(
        f"family {args.family}: active key {ring.active.kid.hex()}; next key "
        f"{next_key.kid.hex() if next_key else '-'}"
    )
    return 0


@with_service
async def cmd_keys_revoke(args: argparse.Namespace, service: AuthService) -> int:
    kid = parse_kid(args.kid)
    ring = await service.admin.revoke_key(kid, operator_actor())
    print(f"key {args.kid} revoked; family {ring.family}: active key {ring.active.kid.hex()}")
    return 0


@with_service
async def cmd_keys_export(args: argparse.Namespace, service: AuthService) -> int:
    """Print a symmetric family's published keys for provisioning its audience."""
    if (args.family is None) == (args.family_option is None):
        raise OperatorError("name the family: keys export FAMILY")
    key_set = service.admin.export_keys(args.family or args.family_option)
    # A COSE_KeySet holding secret keys: printed for the operator to provision, never logged.
    print(base64.urlsafe_b64encode(cbor2.dumps(key_set)).decode("ascii"))
    return 0


@with_service
async def cmd_audit_verify(args: argparse.Namespace, service: AuthService) -> int:
    """The chain from its genesis to its head, every registry row's MAC, and the revocations
    the log records: each problem is one line on stderr, and the exit status 2."""
    report = await service.verify_audit()
    if not report.ok:
        for problem in report.problems():
            print(f"coap-auth: error: {problem}", file=sys.stderr)
        return 2
    print(report.chain.describe())
    print(report.registry.describe())
    print(report.revocation.describe())
    return 0


@with_service
async def cmd_audit_tail(args: argparse.Namespace, service: AuthService) -> int:
    if args.n < 1:
        raise OperatorError("-n must be at least 1")
    rows = [e.public_view() for e in await service.admin.audit_tail(args.n)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        details = " ".join(f"{k}={v}" for k, v in sorted(row["details"].items()))
        print(
            f"{row['seq']:>6}  {when(row['at'])}  {row['actor']:<10} {row['event']:<16}"
            f" {row['subject']}  {details}".rstrip()
        )
    return 0


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    keys = sub.add_parser("keys", help="signing keys")
    k_sub = keys.add_subparsers(metavar="ACTION", required=True)
    lst = k_sub.add_parser("list", parents=[common, listing], help="list keys, states and dates")
    lst.add_argument("--family", help="only this key family")
    lst.set_defaults(command_fn=cmd_keys_list)
    rot = k_sub.add_parser("rotate", parents=[common], help="rotate now: next key becomes active")
    rot.add_argument("--family", default=DEFAULT_FAMILY)
    rot.add_argument(
        "--force",
        action="store_true",
        help="even if the next key has been published for less than the pre-publication lead",
    )
    rot.set_defaults(command_fn=cmd_keys_rotate)
    rev = k_sub.add_parser(
        "revoke", parents=[common], help="compromised key: unpublish at once, stop trusting it"
    )
    rev.add_argument("kid", help="the kid in lowercase hex, as `keys list` prints it")
    rev.set_defaults(command_fn=cmd_keys_revoke)
    exp = k_sub.add_parser(
        "export",
        parents=[common],
        help="print a symmetric family's keys (base64url COSE_KeySet) to provision its audience",
    )
    exp.add_argument("family", nargs="?", help="the family (its audience's id)")
    exp.add_argument("--family", dest="family_option", help=argparse.SUPPRESS)
    exp.set_defaults(command_fn=cmd_keys_export)

    audit = sub.add_parser("audit", help="the hash-chained audit log")
    a_sub = audit.add_subparsers(metavar="ACTION", required=True)
    ver = a_sub.add_parser(
        "verify",
        parents=[common],
        help="check the chain to its head, and every client's and audience's MAC",
    )
    ver.set_defaults(command_fn=cmd_audit_verify)
    tail = a_sub.add_parser("tail", parents=[common, listing], help="show the latest events")
    tail.add_argument("-n", type=int, default=20, help="how many (default 20)")
    tail.set_defaults(command_fn=cmd_audit_tail)
