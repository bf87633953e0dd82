"""`coap-auth audiences ...` and `coap-auth clients ...`: who tokens are for and who gets them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coap_auth.cli.runtime import print_rows, with_service
from coap_auth.errors import OperatorError
from coap_auth.service import AuthService
from coap_auth.service.admin import DEFAULT_FAMILY, KEY_ALGS, PROFILES, TOKEN_FORMATS
from coap_auth.tokens import cose_key_from_public


def operator_actor() -> str:
    """Who the audit log says acted, passed to every use case the CLI calls: "operator"; the
    one place to name the operator's login instead."""
    return "operator"


# Secure by default (design of issue 15): tokens bound to the client's EDHOC key.
DEFAULT_PROFILE = "edhoc_oscore"


def read_public_key(path: Path) -> dict[int, Any]:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
        return cose_key_from_public(key)  # type: ignore[arg-type]
    except OSError:
        raise OperatorError(f"cannot read public key file {path}") from None
    except (ValueError, TypeError, AttributeError):
        raise OperatorError(f"{path} is not a PEM P-256 or Ed25519 public key") from None


# -- audiences --------------------------------------------------------------------------------


@with_service
async def cmd_audiences_add(args: argparse.Namespace, service: AuthService) -> int:
    public_key = (
        None if args.introspect_public_key is None else read_public_key(args.introspect_public_key)
    )
    outcome = await service.admin.add_audience(
        args.id,
        operator_actor(),
        profile=args.profile,
        token_format=args.token_format,
        lifetime=args.lifetime,
        own_keys=args.own_keys,
        key_alg=args.key_alg,
        introspect_secret=args.introspect_secret,
        introspect_public_key=public_key,
    )
    audience = outcome.audience
    assert audience is not None
    print(
        f"audience {audience.audience_id} added ({audience.profile}, {audience.token_format},"
        f" {audience.lifetime} s tokens)"
    )
    if audience.key_family != DEFAULT_FAMILY:  # --own-keys
        print(f"key family {audience.key_family} ({audience.key_alg})")
    if audience.profile == "coap_oscore":
        print(f"provision its token key: coap-auth keys export {audience.key_family}")
    if outcome.introspection_secret is not None:
        # Printed once; only a keyed digest is stored.
        print(f"introspection secret: {outcome.introspection_secret}")
    return 0


@with_service
async def cmd_audiences_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = [a.public_view() for a in await service.admin.list_audiences()]
    columns = [
        "audience_id",
        "profile",
        "token_format",
        "lifetime",
        "key_family",
        "introspection",
    ]
    print_rows(rows, args.json, columns)
    return 0


# -- clients ----------------------------------------------------------------------------------


@with_service
async def cmd_clients_add(args: argparse.Namespace, service: AuthService) -> int:
    public_key = None if args.public_key is None else read_public_key(args.public_key)
    outcome = await service.admin.add_client(
        args.id,
        operator_actor(),
        audiences=args.audience,
        scope=args.scope,
        public_key=public_key,
    )
    print(f"client {outcome.client_id} added")
    if outcome.secret is not None:
        # Printed once; only a keyed digest is stored.
        print(f"secret: {outcome.secret}")
    return 0


@with_service
async def cmd_clients_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = [c.public_view() for c in await service.admin.list_clients()]
    print_rows(rows, args.json, ["client_id", "audiences", "scope", "auth", "disabled"])
    return 0


@with_service
async def cmd_clients_oscore(args: argparse.Namespace, service: AuthService) -> int:
    """Provision (or with --remove, withdraw) an OSCORE context for a registered client that
    cannot run EDHOC (coap_auth.secure.provisioned). Prints the device's side once, as JSON or
    as a libcoap `coap-client -E` configuration file."""
    from coap_auth.secure import provisioned

    data_dir = service.settings.data_dir
    if args.remove:
        await service.admin.withdraw_oscore(
            args.id, operator_actor(), lambda client_id: provisioned.remove(data_dir, client_id)
        )
        print(f"OSCORE context of client {args.id} removed")
        return 0
    device = await service.admin.provision_oscore(
        args.id,
        operator_actor(),
        lambda client: provisioned.provision(data_dir, client.client_id, client.created_at),
    )
    if args.json:
        print(json.dumps(device, indent=2))
        return 0
    # libcoap's coap-oscore-conf(5) format, the device's side.
    print(f"# OSCORE context of client {args.id}: shown once; keep it secret")
    print(f'master_secret,hex,"{device["master_secret"]}"')
    print(f'master_salt,hex,"{device["master_salt"]}"')
    print(f'sender_id,hex,"{device["sender_id"]}"')
    print(f'recipient_id,hex,"{device["recipient_id"]}"')
    print("replay_window,integer,32")
    print(f"aead_alg,integer,{device['aead_alg']}")
    print(f"hkdf_alg,integer,{device['hkdf_alg']}")
    return 0


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    # set/remove, disable/enable/remove/rotate-secret/set-key: imported here, as that module
    # uses this one.
    from coap_auth.cli.lifecycle import add_audience_parsers, add_client_parsers

    audiences = sub.add_parser("audiences", help="resource servers tokens are issued for")
    aud_sub = audiences.add_subparsers(metavar="ACTION", required=True)
    add = aud_sub.add_parser("add", parents=[common], help="register an audience")
    add.add_argument("id")
    add.add_argument(
        "--profile",
        choices=PROFILES,
        default=DEFAULT_PROFILE,
        help="how its tokens are bound: edhoc_oscore (default; to the client's EDHOC key),"
        " coap_oscore (RFC 9203; encrypted CWTs under its own AES keys, see `keys export`),"
        " bearer (no binding unless the client sends req_cnf)",
    )
    add.add_argument("--token-format", choices=TOKEN_FORMATS, default="cwt")
    add.add_argument("--lifetime", type=int, help="access-token lifetime in seconds")
    add.add_argument(
        "--own-keys",
        action="store_true",
        help="sign its tokens with a key family of its own (a compromise stays inside it)",
    )
    add.add_argument(
        "--key-alg",
        choices=KEY_ALGS,
        help="algorithm of its own family; HMAC256/64 and AES keys are never published",
    )
    rs_auth = add.add_mutually_exclusive_group()
    rs_auth.add_argument(
        "--introspect-secret",
        action="store_true",
        help="let it call /introspect with a generated secret (printed once)",
    )
    rs_auth.add_argument(
        "--introspect-public-key",
        type=Path,
        metavar="PEM",
        help="let it call /introspect with assertions signed by this P-256 or Ed25519 key",
    )
    add.set_defaults(command_fn=cmd_audiences_add)
    lst = aud_sub.add_parser("list", parents=[common, listing], help="list audiences")
    lst.set_defaults(command_fn=cmd_audiences_list)
    add_audience_parsers(aud_sub, common, listing)

    clients = sub.add_parser("clients", help="devices that request tokens")
    cl_sub = clients.add_subparsers(metavar="ACTION", required=True)
    add = cl_sub.add_parser("add", parents=[common], help="register a client")
    add.add_argument("id")
    add.add_argument(
        "--audience",
        action="append",
        required=True,
        help="audience the client may get tokens for (repeatable)",
    )
    add.add_argument("--scope", required=True, help='space-separated scopes, e.g. "temp:read"')
    auth = add.add_mutually_exclusive_group(required=True)
    auth.add_argument("--secret", action="store_true", help="generate a secret (printed once)")
    auth.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="the device's P-256 or Ed25519 public key, for signed assertions",
    )
    add.set_defaults(command_fn=cmd_clients_add)
    lst = cl_sub.add_parser("list", parents=[common, listing], help="list clients")
    lst.set_defaults(command_fn=cmd_clients_list)
    add_client_parsers(cl_sub, common, listing)
    osc = cl_sub.add_parser(
        "oscore",
        parents=[common, listing],
        help="provision an OSCORE context for a client that cannot run EDHOC (printed once)",
    )
    osc.add_argument("id")
    osc.add_argument("--remove", action="store_true", help="withdraw its context instead")
    osc.set_defaults(command_fn=cmd_clients_oscore)
