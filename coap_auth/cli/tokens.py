"""`coap-auth tokens ...`: refresh families and revocation of access tokens."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coap_auth.cli.registry import operator_actor
from coap_auth.cli.runtime import print_rows, when, with_service
from coap_auth.service import AuthService


@with_service
async def cmd_tokens_families(args: argparse.Namespace, service: AuthService) -> int:
    rows = [f.public_view() for f in await service.admin.list_families(args.client)]
    for row in rows:
        row["last_used"] = when(row["last_used_at"])
        row["expires"] = when(row["expires_at"])
    print_rows(
        rows, args.json, ["family", "client_id", "audience", "scope", "last_used", "expires"]
    )
    return 0


async def _revoke_client(args: argparse.Namespace, service: AuthService) -> int:
    killed = await service.admin.revoke_client_tokens(args.client, operator_actor())
    if args.json:
        print(json.dumps({"client_id": args.client, "killed_families": killed}, indent=2))
    else:
        print(f"{killed} refresh families of {args.client} revoked, with their access tokens")
    return 0


@with_service
async def cmd_tokens_revoke(args: argparse.Namespace, service: AuthService) -> int:
    if args.client is not None:
        return await _revoke_client(args, service)
    # The whole hash, or the prefix the access log prints (admin.hash_range checks it).
    revoked = await service.admin.revoke_token(args.hash, operator_actor())
    if args.json:
        print(json.dumps({"token_hash": revoked.hex(), "revoked": True}, indent=2))
    else:
        print(f"access token {revoked.hex()} revoked")
    return 0


@with_service
async def cmd_tokens_revoke_family(args: argparse.Namespace, service: AuthService) -> int:
    return await _revoke_client(args, service)


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    tokens = sub.add_parser("tokens", help="refresh-token families and revocation")
    t_sub = tokens.add_subparsers(metavar="ACTION", required=True)
    fam = t_sub.add_parser("families", parents=[common, listing], help="list live families")
    fam.add_argument("--client", help="only this client's families")
    fam.set_defaults(command_fn=cmd_tokens_families)
    rev = t_sub.add_parser(
        "revoke",
        parents=[common, listing],
        help="revoke one access token, or all of a client's tokens",
    )
    which = rev.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--hash",
        help="the token hash (RFC 9770 §4) in lowercase hex, or its first 16 or more digits"
        " (as the access log prints it)",
    )
    which.add_argument("--client", help="kill every refresh family of this client")
    rev.set_defaults(command_fn=cmd_tokens_revoke)
    fam_rev = t_sub.add_parser(
        "revoke-family",
        parents=[common, listing],
        help="kill every refresh family of a client, revoking its tokens",
    )
    fam_rev.add_argument("--client", required=True)
    fam_rev.set_defaults(command_fn=cmd_tokens_revoke_family)
