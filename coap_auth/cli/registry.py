"""`coap-auth audiences ...` and `coap-auth clients ...`: who tokens are for and who gets them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coap_auth.cli.runtime import print_rows, with_service
from coap_auth.errors import OperatorError
from coap_auth.keys import ALG_NAMES, DEFAULT_FAMILY
from coap_auth.service import AuthService
from coap_auth.service.admin import new_secret
from coap_auth.store import PROFILES, TOKEN_FORMATS, Audience, AuditEvent, Client
from coap_auth.store.records import OSCORE_TOKEN_ALG
from coap_auth.text import has_control_character
from coap_auth.tokens import cose_key_from_public
from coap_auth.wire import MAX_TOKEN_LIFETIME

KEY_ALGS = tuple(ALG_NAMES)  # ES256, EdDSA, HMAC256/64, AES-CCM-16-64-128
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


def wire_text(value: str, what: str) -> str:
    """An id or scope as devices will send it: the service refuses control characters on the
    wire, so one registered with them could never be used."""
    if not value or has_control_character(value):
        raise OperatorError(f"{what} must be non-empty text without control characters")
    return value


# -- audiences --------------------------------------------------------------------------------


@with_service
async def cmd_audiences_add(args: argparse.Namespace, service: AuthService) -> int:
    lifetime = args.lifetime if args.lifetime is not None else service.settings.token_lifetime
    if not 1 <= lifetime <= MAX_TOKEN_LIFETIME:
        # Resource servers refuse longer-lived tokens (device_client's max_lifetime).
        raise OperatorError(f"--lifetime must be 1 to {MAX_TOKEN_LIFETIME} seconds")
    key_alg = args.key_alg
    own_keys = args.own_keys
    if args.profile == "coap_oscore":
        # RFC 9203 §3.2: its tokens carry a master secret, encrypted under keys it alone
        # shares with the AS.
        if key_alg not in (None, OSCORE_TOKEN_ALG):
            raise OperatorError(f"a coap_oscore audience's keys are {OSCORE_TOKEN_ALG}")
        if args.token_format == "jwt":
            raise OperatorError("a coap_oscore audience takes encrypted CWTs, not JWTs")
        key_alg, own_keys = OSCORE_TOKEN_ALG, True
    elif key_alg == OSCORE_TOKEN_ALG:
        raise OperatorError(f"{OSCORE_TOKEN_ALG} keys are for --profile coap_oscore")
    if key_alg is not None and not own_keys:
        raise OperatorError("--key-alg needs --own-keys")
    if key_alg == "HMAC256/64" and args.token_format == "jwt":
        raise OperatorError("an HMAC256/64 audience takes MACed CWTs, not JWTs")
    secret = new_secret() if args.introspect_secret else None
    public_key = (
        None if args.introspect_public_key is None else read_public_key(args.introspect_public_key)
    )
    await _id_is_free(service, args.id, "audience")
    if own_keys and args.id in service.keys.rings:
        # Its keys ended with it (audiences remove); a family is never brought back to life.
        raise OperatorError(
            f"key family {args.id} belonged to a removed audience: choose another id"
        )
    audience = Audience(
        wire_text(args.id, "the audience id"),
        args.token_format,
        lifetime,
        service.clock.now(),
        key_family=args.id if own_keys else DEFAULT_FAMILY,
        key_alg=key_alg or (service.settings.signing_alg if own_keys else None),
        introspect_secret_digest=None if secret is None else service.secret_digest(secret),
        introspect_public_key=public_key,
        profile=args.profile,
    )
    await service.store.add_audience(audience)
    await service.load_keys()  # creates the audience's own key family
    print(
        f"audience {audience.audience_id} added ({audience.profile}, {audience.token_format},"
        f" {lifetime} s tokens)"
    )
    if own_keys:
        print(f"key family {audience.key_family} ({audience.key_alg})")
    if audience.profile == "coap_oscore":
        print(f"provision its token key: coap-auth keys export {audience.key_family}")
    if secret is not None:
        # Printed once; only a keyed digest is stored.
        print(f"introspection secret: {secret}")
    return 0


@with_service
async def cmd_audiences_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = [a.public_view() for a in await service.store.list_audiences()]
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
    scope = tuple(dict.fromkeys(wire_text(s, "a scope") for s in args.scope.split()))
    if not scope:
        raise OperatorError("--scope must name at least one scope")
    await _id_is_free(service, args.id, "client")
    secret = None
    public_key = None
    if args.public_key is not None:
        public_key = read_public_key(args.public_key)
    else:
        secret = new_secret()
    client = Client(
        client_id=wire_text(args.id, "the client id"),
        audiences=tuple(dict.fromkeys(wire_text(a, "an audience") for a in args.audience)),
        scope=scope,
        created_at=service.clock.now(),
        secret_digest=service.secret_digest(secret) if secret is not None else None,
        public_key=public_key,
    )
    await service.store.add_client(client)
    print(f"client {client.client_id} added")
    if secret is not None:
        # Printed once; only a keyed digest is stored.
        print(f"secret: {secret}")
    return 0


@with_service
async def cmd_clients_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = [c.public_view() for c in await service.store.list_clients()]
    print_rows(rows, args.json, ["client_id", "audiences", "scope", "auth", "disabled"])
    return 0


async def _id_is_free(service: AuthService, wanted: str, kind: str) -> None:
    """EDHOC names a peer by its id alone, so clients, audiences and the AS itself share one
    name space: an id taken by the other kind (or the issuer id) is refused."""
    if wanted == service.settings.issuer:
        raise OperatorError(f"{wanted!r} is the AS's own issuer id")
    taken = (
        await service.store.get_audience(wanted)
        if kind == "client"
        else await service.store.get_client(wanted)
    )
    if taken is not None:
        other = "an audience" if kind == "client" else "a client"
        raise OperatorError(f"{wanted!r} is already {other} id (one name space for EDHOC peers)")


@with_service
async def cmd_clients_oscore(args: argparse.Namespace, service: AuthService) -> int:
    """Provision (or with --remove, withdraw) an OSCORE context for a registered client that
    cannot run EDHOC (coap_auth.secure.provisioned). Prints the device's side once, as JSON or
    as a libcoap `coap-client -E` configuration file."""
    from coap_auth.secure import provisioned

    data_dir = service.settings.data_dir
    now = service.clock.now()
    if args.remove:
        if not provisioned.remove(data_dir, args.id):
            raise OperatorError(f"no OSCORE context provisioned for {args.id!r}")
        await service.store.append_audit(
            [AuditEvent(now, "operator", "client.oscore_removed", args.id)]
        )
        print(f"OSCORE context of client {args.id} removed")
        return 0
    client = await service.store.get_client(args.id)
    if client is None or client.disabled:
        raise OperatorError(f"no enabled client {args.id!r}")
    device = provisioned.provision(data_dir, args.id, client.created_at)
    await service.store.append_audit(
        [AuditEvent(now, "operator", "client.oscore_provisioned", args.id)]
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
