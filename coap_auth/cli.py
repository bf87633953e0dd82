"""The `coap-auth` command: init, serve, and the operator's clients/audiences/keys commands.

Every subcommand accepts --data-dir and --config; bad input exits 2 with one line on stderr
and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from coap_auth.clock import SystemClock
from coap_auth.config import Settings, load_settings
from coap_auth.errors import CoapAuthError, OperatorError
from coap_auth.service import AuthService
from coap_auth.store import TOKEN_FORMATS, Audience, Client, MasterKey, SqliteStore
from coap_auth.store.sqlite import DB_FILE
from coap_auth.tokens import cose_key_from_public, kid_text

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]
SECRET_BYTES = 24  # 192 bits, printed as base64url text


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command_fn"):
        parser.print_help(sys.stderr)
        return 2
    try:
        flags = {
            name: getattr(args, name, None) for name in ("data_dir", "bind", "port", "signing_alg")
        }
        settings = load_settings(args.config, flags=flags)
        return asyncio.run(args.command_fn(args, settings))
    except CoapAuthError as error:
        print(f"coap-auth: error: {error.description}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- plumbing ---------------------------------------------------------------------------------


async def _open_service(settings: Settings, *, create: bool = False) -> AuthService:
    data_dir = settings.data_dir
    if not (data_dir / DB_FILE).exists():
        if not create:
            raise OperatorError(f"{data_dir} is not initialised: run `coap-auth init` first")
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    master_key = MasterKey.load(data_dir, create=create)
    store = SqliteStore.in_data_dir(data_dir, master_key)
    await store.open()
    service = AuthService(store, master_key, settings, SystemClock())
    try:
        await service.load_keys()
    except BaseException:
        await store.close()
        raise
    return service


def _with_service(fn: Callable[[argparse.Namespace, AuthService], Awaitable[int]]) -> Command:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        service = await _open_service(settings)
        try:
            return await fn(args, service)
        finally:
            await service.store.close()

    return run


def _when(timestamp: int | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


# -- init and serve ---------------------------------------------------------------------------


async def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    existed = (settings.data_dir / DB_FILE).exists()
    service = await _open_service(settings, create=True)
    try:
        active = service.key_ring.active
    finally:
        await service.store.close()
    if existed:
        print(f"{settings.data_dir} already initialised; nothing changed")
    else:
        kid = kid_text(active.kid)
        print(f"initialised {settings.data_dir}: active key {kid} ({active.alg.name})")
    return 0


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from coap_auth.coap.server import Server

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("coap-server").setLevel(logging.WARNING)
    service = await _open_service(settings, create=True)
    server = Server(service, settings.bind, settings.port)
    try:
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"coap-auth listening on {server.url}", flush=True)
        await stop.wait()
        print("coap-auth stopping", flush=True)
    finally:
        await server.stop()
        await service.store.close()
    return 0


# -- audiences --------------------------------------------------------------------------------


@_with_service
async def cmd_audiences_add(args: argparse.Namespace, service: AuthService) -> int:
    lifetime = args.lifetime if args.lifetime is not None else service.settings.token_lifetime
    if lifetime <= 0:
        raise OperatorError("--lifetime must be a positive number of seconds")
    audience = Audience(args.id, args.token_format, lifetime, service.clock.now())
    await service.store.add_audience(audience)
    print(f"audience {audience.audience_id} added ({audience.token_format}, {lifetime} s tokens)")
    return 0


@_with_service
async def cmd_audiences_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = [
        {
            "audience_id": a.audience_id,
            "token_format": a.token_format,
            "lifetime": a.lifetime,
            "created_at": a.created_at,
        }
        for a in await service.store.list_audiences()
    ]
    _print_rows(rows, args.json, ["audience_id", "token_format", "lifetime"])
    return 0


# -- clients ----------------------------------------------------------------------------------


def _read_public_key(path: Path) -> dict[int, Any]:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
        return cose_key_from_public(key)  # type: ignore[arg-type]
    except OSError:
        raise OperatorError(f"cannot read public key file {path}") from None
    except (ValueError, TypeError, AttributeError):
        raise OperatorError(f"{path} is not a PEM P-256 or Ed25519 public key") from None


@_with_service
async def cmd_clients_add(args: argparse.Namespace, service: AuthService) -> int:
    scope = tuple(dict.fromkeys(args.scope.split()))
    if not scope:
        raise OperatorError("--scope must name at least one scope")
    secret = None
    public_key = None
    if args.public_key is not None:
        public_key = _read_public_key(args.public_key)
    else:
        secret = secrets.token_urlsafe(SECRET_BYTES)
    client = Client(
        client_id=args.id,
        audiences=tuple(dict.fromkeys(args.audience)),
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


@_with_service
async def cmd_clients_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = [c.public_view() for c in await service.store.list_clients()]
    _print_rows(rows, args.json, ["client_id", "audiences", "scope", "auth", "disabled"])
    return 0


@_with_service
async def cmd_clients_disable(args: argparse.Namespace, service: AuthService) -> int:
    if not await service.store.disable_client(args.id):
        raise OperatorError(f"no client {args.id!r}")
    print(f"client {args.id} disabled")
    return 0


# -- keys -------------------------------------------------------------------------------------


@_with_service
async def cmd_keys_list(args: argparse.Namespace, service: AuthService) -> int:
    rows = [
        {
            "kid": kid_text(k.kid),
            "alg": k.alg.name,
            "state": k.state.value,
            "created": _when(k.created_at),
            "activated": _when(k.activated_at),
            "retire_until": _when(k.retire_until),
        }
        for k in service.key_ring.keys
    ]
    _print_rows(rows, args.json, ["kid", "alg", "state", "created", "activated", "retire_until"])
    return 0


@_with_service
async def cmd_keys_rotate(args: argparse.Namespace, service: AuthService) -> int:
    await service.rotate_keys()
    ring = service.key_ring
    next_key = ring.next
    print(
        f"active key {kid_text(ring.active.kid)}; next key "
        f"{kid_text(next_key.kid) if next_key else '-'}"
    )
    return 0


# -- refresh families -------------------------------------------------------------------------


@_with_service
async def cmd_tokens_families(args: argparse.Namespace, service: AuthService) -> int:
    families = await service.store.list_families(args.client, service.clock.now())
    rows = [f.public_view() for f in families]
    for row in rows:
        row["last_used"] = _when(row["last_used_at"])
        row["expires"] = _when(row["expires_at"])
    _print_rows(
        rows, args.json, ["family", "client_id", "audience", "scope", "last_used", "expires"]
    )
    return 0


@_with_service
async def cmd_tokens_revoke_family(args: argparse.Namespace, service: AuthService) -> int:
    if await service.store.get_client(args.client) is None:
        raise OperatorError(f"no client {args.client!r}")
    killed = await service.store.kill_families(
        args.client, "revoked by operator", service.clock.now()
    )
    print(f"{killed} refresh families of {args.client} revoked")
    return 0


# -- argument parsing -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="data directory (default ./coap-auth-data)")
    common.add_argument("--config", type=Path, help="TOML settings file")

    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON")

    parser = argparse.ArgumentParser(prog="coap-auth", description=__doc__)
    sub = parser.add_subparsers(metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create the data directory and keys")
    init.add_argument("--signing-alg", choices=["ES256", "EdDSA"])
    init.set_defaults(command_fn=cmd_init)

    serve = sub.add_parser("serve", parents=[common], help="run the CoAP service")
    serve.add_argument("--bind", help="address to bind (default ::)")
    serve.add_argument("--port", type=int, help="UDP port (default 5683)")
    serve.add_argument("--signing-alg", choices=["ES256", "EdDSA"])
    serve.set_defaults(command_fn=cmd_serve)

    audiences = sub.add_parser("audiences", help="resource servers tokens are issued for")
    aud_sub = audiences.add_subparsers(metavar="ACTION", required=True)
    add = aud_sub.add_parser("add", parents=[common], help="register an audience")
    add.add_argument("id")
    add.add_argument("--token-format", choices=TOKEN_FORMATS, default="cwt")
    add.add_argument("--lifetime", type=int, help="access-token lifetime in seconds")
    add.set_defaults(command_fn=cmd_audiences_add)
    lst = aud_sub.add_parser("list", parents=[common, listing], help="list audiences")
    lst.set_defaults(command_fn=cmd_audiences_list)

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
    dis = cl_sub.add_parser("disable", parents=[common], help="refuse a client from now on")
    dis.add_argument("id")
    dis.set_defaults(command_fn=cmd_clients_disable)

    keys = sub.add_parser("keys", help="signing keys")
    k_sub = keys.add_subparsers(metavar="ACTION", required=True)
    lst = k_sub.add_parser("list", parents=[common, listing], help="list keys and their states")
    lst.set_defaults(command_fn=cmd_keys_list)
    rot = k_sub.add_parser("rotate", parents=[common], help="rotate now: next key becomes active")
    rot.set_defaults(command_fn=cmd_keys_rotate)

    tokens = sub.add_parser("tokens", help="refresh-token families and revocation")
    t_sub = tokens.add_subparsers(metavar="ACTION", required=True)
    fam = t_sub.add_parser("families", parents=[common, listing], help="list live families")
    fam.add_argument("--client", help="only this client's families")
    fam.set_defaults(command_fn=cmd_tokens_families)
    rev = t_sub.add_parser(
        "revoke-family",
        parents=[common],
        help="kill every refresh family of a client, revoking its tokens",
    )
    rev.add_argument("--client", required=True)
    rev.set_defaults(command_fn=cmd_tokens_revoke_family)
    return parser


if __name__ == "__main__":
    sys.exit(main())
