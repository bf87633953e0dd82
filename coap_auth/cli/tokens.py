"""`coap-auth tokens ...`: refresh families and revocation of access tokens."""

from __future__ import annotations

import argparse
from typing import Any

from coap_auth.cli.runtime import print_rows, when, with_service
from coap_auth.errors import OperatorError
from coap_auth.service import AuthService

TOKEN_HASH_HEX = 66  # 0x01 || SHA-256: 33 bytes


@with_service
async def cmd_tokens_families(args: argparse.Namespace, service: AuthService) -> int:
    families = await service.store.list_families(args.client, service.clock.now())
    rows = [f.public_view() for f in families]
    for row in rows:
        row["last_used"] = when(row["last_used_at"])
        row["expires"] = when(row["expires_at"])
    print_rows(
        rows, args.json, ["family", "client_id", "audience", "scope", "last_used", "expires"]
    )
    return 0


async def _revoke_client(service: AuthService, client_id: str) -> int:
    if await service.store.get_client(client_id) is None:
        raise OperatorError(f"no client {client_id!r}")
    killed = await service.store.kill_families(
        client_id, "revoked by operator", service.clock.now()
    )
    print(f"{killed} refresh families of {client_id} revoked, with their access tokens")
    return 0


@with_service
async def cmd_tokens_revoke(args: argparse.Namespace, service: AuthService) -> int:
    if args.client is not None:
        return await _revoke_client(service, args.client)
    text = args.hash
    if len(text) != TOKEN_HASH_HEX or text != text.lower():
        raise OperatorError("--hash takes the 33-byte token hash in lowercase hex (66 digits)")
    try:
        hash_value = bytes.fromhex(text)
    except ValueError:
        raise OperatorError("--hash takes the 33-byte token hash in lowercase hex") from None
    if not await service.revoke_token_hash(hash_value):
        raise OperatorError("no live, unrevoked access token has that hash")
    print(f"access token {text} revoked")
    return 0


@with_service
async def cmd_tokens_revoke_family(args: argparse.Namespace, service: AuthService) -> int:
    return await _revoke_client(service, args.client)


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    tokens = sub.add_parser("tokens", help="refresh-token families and revocation")
    t_sub = tokens.add_subparsers(metavar="ACTION", required=True)
    fam = t_sub.add_parser("families", parents=[common, listing], help="list live families")
    fam.add_argument("--client", help="only this client's families")
    fam.set_defaults(command_fn=cmd_tokens_families)
    rev = t_sub.add_parser(
        "revoke", parents=[common], help="revoke one access token, or all of a client's tokens"
    )
    which = rev.add_mutually_exclusive_group(required=True)
    which.add_argument("--hash", help="the token hash (RFC 9770 §4) in lowercase hex")
    which.add_argument("--client", help="kill every refresh family of this client")
    rev.set_defaults(command_fn=cmd_tokens_revoke)
    fam_rev = t_sub.add_parser(
        "revoke-family",
        parents=[common],
        help="kill every refresh family of a client, revoking its tokens",
    )
    fam_rev.add_argument("--client", required=True)
    fam_rev.set_defaults(command_fn=cmd_tokens_revoke_family)
