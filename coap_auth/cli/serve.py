"""`coap-auth init`, `coap-auth serve` and `coap-auth edhoc-credential`: the data directory,
the running service, and the AS's credential for provisioning devices."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

from coap_auth.cli import workers
from coap_auth.cli.runtime import configure_logging, opened_service
from coap_auth.config import Settings
from coap_auth.udp import check_port_free


async def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Create the data directory, the master key, the store's schema (or migrate it) and the
    first keys; on an initialised store, change nothing but a pending schema migration."""
    where = settings.data_dir if not settings.store else f"{settings.data_dir} and the database"
    async with opened_service(settings, create=True) as service:
        active = service.key_ring.active
        created = service.admin.created_first_keys
    if not created:
        print(f"{where} already initialised; nothing changed")
    else:
        kid = active.kid.hex()
        print(f"initialised {where}: active key {kid} ({active.alg.name})")
    return 0


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM: this process, or `workers` processes on one port
    (coap_auth.cli.workers). Raises OperatorError, or BindError (one line naming
    address:port) when the port cannot be served, e.g. when another process serves it."""
    from coap_auth.coap.server import Server

    configure_logging(settings)
    worker_pipe: int | None = args.worker_pipe
    if settings.workers > 1 and worker_pipe is None:
        return await workers.supervise(args, settings)
    if worker_pipe is None:
        # Refused before anything is created or opened (the bind below is what counts).
        await check_port_free((settings.bind, settings.port), logging.getLogger("coap_auth"))
    else:
        settings = workers.worker_settings(settings, args.worker_index)
    async with opened_service(settings, create=True) as service:
        # A worker shares the port with its siblings; anything else refuses a port in use.
        server = Server(service, settings.bind, settings.port, reuse_port=worker_pipe is not None)
        try:
            await _serve_until_stopped(server, worker_pipe)
        finally:
            await server.stop()
    return 0


async def _serve_until_stopped(server: Any, worker_pipe: int | None) -> None:
    """Until SIGINT or SIGTERM, or (a worker) until its supervisor's pipe reaches its end."""
    await server.start()  # first: a serve that cannot bind says only that, in one line
    if not server.service.settings.require_oscore:
        logging.getLogger("coap_auth").warning(
            "require_oscore is off: /token, /introspect, /revoke and /revoke/trl accept plain "
            "CoAP, so secrets and tokens cross the network readable by anyone on the path "
            "(for labs only)"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if worker_pipe is not None:
        loop.add_reader(worker_pipe, stop.set)  # readable: at its end (nothing is written)
    print(f"coap-auth listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        if worker_pipe is not None:
            loop.remove_reader(worker_pipe)
    with contextlib.suppress(BrokenPipeError):  # whoever read our output may be gone
        print("coap-auth stopping", flush=True)


async def cmd_edhoc_credential(args: argparse.Namespace, settings: Settings) -> int:
    """The AS's EDHOC credential, for provisioning devices (docs/protocol.md "Protected
    channels"): a device needs it to authenticate the AS in EDHOC."""
    async with opened_service(settings) as service:
        credential = service.edhoc_identity.credential
    shown = credential.document()
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    print(f"EDHOC credential of {credential.subject} (method 3, cipher suite 2, P-256)")
    print(f"kid: {shown['kid']}")
    print(f"ccs: {shown['ccs']}")
    print(shown["public_key_pem"], end="")
    return 0


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    init = sub.add_parser("init", parents=[common], help="create the data directory and keys")
    init.add_argument("--signing-alg", choices=["ES256", "EdDSA"])
    init.set_defaults(command_fn=cmd_init)

    serve = sub.add_parser("serve", parents=[common], help="run the CoAP service")
    serve.add_argument("--bind", help="address to bind (default ::)")
    serve.add_argument("--port", type=int, help="UDP port (default 5683)")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (default 1; above 1 needs a fixed --port)",
    )
    # Internal: set by `serve --workers` on the processes it starts (coap_auth.cli.workers).
    serve.add_argument(workers.WORKER_OPTION, type=int, help=argparse.SUPPRESS)
    serve.add_argument(workers.WORKER_INDEX_OPTION, type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--signing-alg", choices=["ES256", "EdDSA"])
    serve.set_defaults(command_fn=cmd_serve)

    credential = sub.add_parser(
        "edhoc-credential",
        parents=[common, listing],
        help="show the AS's EDHOC credential (CCS) for provisioning devices",
    )
    credential.set_defaults(command_fn=cmd_edhoc_credential)
