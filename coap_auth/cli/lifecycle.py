"""`coap-auth clients disable|enable|remove|rotate-secret|set-key` and `audiences set|remove`:
parse, call the service's Administration with the operator as actor, print (or --json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from coap_auth.cli.registry import operator_actor, read_public_key
from coap_auth.cli.runtime import when, with_service
from coap_auth.errors import OperatorError
from coap_auth.service import AuthService
from coap_auth.service.admin import TOKEN_FORMATS, AudienceOutcome, ClientOutcome

KILLED = "{} refresh families killed, their access tokens revoked"


def _show(args: argparse.Namespace, outcome: ClientOutcome | AudienceOutcome, *lines: str) -> int:
    if args.json:
        print(json.dumps(outcome.view(), indent=2))
    else:
        for line in lines:
            print(line)
    return 0


# -- clients ----------------------------------------------------------------------------------


@with_service
async def cmd_clients_disable(args: argparse.Namespace, service: AuthService) -> int:
    outcome = await service.admin.disable_client(args.id, operator_actor(), revoke=args.revoke)
    lines = [f"client {args.id} disabled"]
    if args.revoke:
        lines.append(KILLED.format(outcome.killed_families))
    return _show(args, outcome, *lines)


@with_service
async def cmd_clients_enable(args: argparse.Namespace, service: AuthService) -> int:
    outcome = await service.admin.enable_client(args.id, operator_actor())
    return _show(args, outcome, f"client {args.id} enabled")


@with_service
async def cmd_clients_remove(args: argparse.Namespace, service: AuthService) -> int:
    from coap_auth.secure import provisioned

    data_dir = service.settings.data_dir
    outcome = await service.admin.remove_client(
        args.id, operator_actor(), lambda client_id: provisioned.remove(data_dir, client_id)
    )
    lines = [f"client {args.id} removed; " + KILLED.format(outcome.killed_families)]
    if outcome.oscore_context_removed:
        lines.append(f"OSCORE context of client {args.id} withdrawn")
    return _show(args, outcome, *lines)


@with_service
async def cmd_clients_rotate_secret(args: argparse.Namespace, service: AuthService) -> int:
    outcome = await service.admin.rotate_secret(args.id, operator_actor(), args.overlap)
    assert outcome.client is not None and outcome.secret is not None
    until = outcome.client.previous_secret_until
    overlap = (
        f"the previous one works until {when(until)}"
        if until is not None
        else "the previous one no longer works"
    )
    # Printed once; only a keyed digest is stored.
    return _show(
        args, outcome, f"client {args.id}: secret rotated; {overlap}", f"secret: {outcome.secret}"
    )


@with_service
async def cmd_clients_set_key(args: argparse.Namespace, service: AuthService) -> int:
    outcome = await service.admin.set_client_key(
        args.id, operator_actor(), read_public_key(args.public_key)
    )
    lines = [f"client {args.id}: public key replaced"]
    if outcome.killed_families:
        lines.append(KILLED.format(outcome.killed_families) + " (bound to the old key)")
    return _show(args, outcome, *lines)


# -- audiences --------------------------------------------------------------------------------


@with_service
async def cmd_audiences_set(args: argparse.Namespace, service: AuthService) -> int:
    if args.profile is not None or args.own_keys or args.key_alg is not None:
        raise OperatorError(
            "an audience's profile and key family cannot change: add a new audience"
            " (audiences add) and move its clients to it"
        )
    introspection = None
    public_key = None
    if args.introspect_secret:
        introspection = "secret"
    elif args.introspect_public_key is not None:
        introspection, public_key = "public-key", read_public_key(args.introspect_public_key)
    elif args.no_introspection:
        introspection = "none"
    outcome = await service.admin.update_audience(
        args.id,
        operator_actor(),
        lifetime=args.lifetime,
        token_format=args.token_format,
        introspection=introspection,  # type: ignore[arg-type]
        introspect_public_key=public_key,
    )
    assert outcome.audience is not None
    audience = outcome.audience
    lines = [
        f"audience {args.id} changed ({audience.profile}, {audience.token_format},"
        f" {audience.lifetime} s tokens, introspection: {audience.public_view()['introspection']})"
    ]
    if outcome.introspection_secret is not None:
        # Printed once; only a keyed digest is stored.
        lines.append(f"introspection secret: {outcome.introspection_secret}")
    return _show(args, outcome, *lines)


@with_service
async def cmd_audiences_remove(args: argparse.Namespace, service: AuthService) -> int:
    outcome = await service.admin.remove_audience(args.id, operator_actor())
    lines = [f"audience {args.id} removed; " + KILLED.format(outcome.killed_families)]
    if outcome.ended_keys:
        lines.append(f"key family {args.id}: {outcome.ended_keys} keys ended (unpublished)")
    return _show(args, outcome, *lines)


# -- parsers ----------------------------------------------------------------------------------


def add_client_parsers(
    cl_sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    both = [common, listing]
    dis = cl_sub.add_parser("disable", parents=both, help="refuse a client from now on")
    dis.add_argument("id")
    dis.add_argument(
        "--revoke",
        action="store_true",
        help="also kill its refresh families and revoke their access tokens (TRL)",
    )
    dis.set_defaults(command_fn=cmd_clients_disable)
    ena = cl_sub.add_parser("enable", parents=both, help="let a disabled client in again")
    ena.add_argument("id")
    ena.set_defaults(command_fn=cmd_clients_enable)
    rem = cl_sub.add_parser(
        "remove",
        parents=both,
        help="revoke a client's tokens (as disable --revoke) and delete it",
    )
    rem.add_argument("id")
    rem.set_defaults(command_fn=cmd_clients_remove)
    rot = cl_sub.add_parser(
        "rotate-secret",
        parents=both,
        help="generate a new secret (printed once); the old one works for --overlap seconds",
    )
    rot.add_argument("id")
    rot.add_argument(
        "--overlap",
        type=int,
        metavar="S",
        help="seconds the previous secret keeps working (default: client_secret_overlap;"
        " 0 ends it now)",
    )
    rot.set_defaults(command_fn=cmd_clients_rotate_secret)
    key = cl_sub.add_parser(
        "set-key",
        parents=both,
        help="replace a client's public key (or its secret) with this P-256 or Ed25519 key",
    )
    key.add_argument("id")
    key.add_argument("public_key", type=Path, metavar="PEM")
    key.set_defaults(command_fn=cmd_clients_set_key)


def add_audience_parsers(
    aud_sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    both = [common, listing]
    upd = aud_sub.add_parser(
        "set", parents=both, help="change an audience's token lifetime, format or introspection"
    )
    upd.add_argument("id")
    upd.add_argument("--lifetime", type=int, help="access-token lifetime in seconds")
    upd.add_argument("--token-format", choices=TOKEN_FORMATS)
    rs_auth = upd.add_mutually_exclusive_group()
    rs_auth.add_argument(
        "--introspect-secret",
        action="store_true",
        help="a new generated /introspect secret (printed once), instead of its credential",
    )
    rs_auth.add_argument(
        "--introspect-public-key",
        type=Path,
        metavar="PEM",
        help="its /introspect (and EDHOC) key instead of its credential",
    )
    rs_auth.add_argument(
        "--no-introspection", action="store_true", help="withdraw its /introspect credential"
    )
    # Refused with a pointer to `audiences add`, rather than "unrecognized arguments".
    upd.add_argument("--profile", help=argparse.SUPPRESS)
    upd.add_argument("--own-keys", action="store_true", help=argparse.SUPPRESS)
    upd.add_argument("--key-alg", help=argparse.SUPPRESS)
    upd.set_defaults(command_fn=cmd_audiences_set)
    rem = aud_sub.add_parser(
        "remove",
        parents=both,
        help="revoke an audience's tokens and delete it (refused while clients name it)",
    )
    rem.add_argument("id")
    rem.set_defaults(command_fn=cmd_audiences_remove)
