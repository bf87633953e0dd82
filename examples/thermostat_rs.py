#!/usr/bin/env python3
"""A thermostat: a resource server that verifies access tokens offline and follows the AS.

It serves /authz-info (RFC 9200 §5.10.1: devices POST their token there) and /temperature
(PUT needs scope temp:write, GET needs temp:read). Tokens are verified on the thermostat
itself against the AS's keys, which it observes at /keys, so a key rollover needs no
restart; it observes /revoke/trl as well, and drops a revoked token the moment the AS lists
it. It never asks the AS about a single token. The AS serves /revoke/trl only over its
protected channel, and only the tokens issued for the audience asking: the thermostat runs
EDHOC with the AS as its audience id, with its own P-256 key (registered as the audience's
introspection key), and reads the list over OSCORE. /keys is public: plain CoAP.

Run it on a Raspberry Pi against a remote coap-auth service
-----------------------------------------------------------
1. On the Pi (Python 3.11+), install the device side (aiocoap, cbor2, cryptography, PyJWT;
   no database drivers):

       python3 -m venv ~/coap-auth && ~/coap-auth/bin/pip install ./coap-auth   # a checkout

   and set the clock (NTP): token expiry is checked against it, with --leeway seconds of
   tolerance.

   The protected channel needs lakers-python (EDHOC): pip installs it on 64-bit Raspberry Pi
   OS (aarch64), but it has no wheel for 32-bit Raspberry Pi OS (armv7). There, run with
   --plain, against a service whose `require_oscore` is off (the list is then unfiltered).

2. Make the thermostat's key (kept on the Pi, mode 0600) and give its public key to the
   operator:

       ~/coap-auth/bin/python examples/thermostat_rs.py --generate-key \\
           --key ~/.local/state/thermostat.key --public-key-out thermostat.pem

3. On the service, the operator registers the audience with that key and prints the AS's
   EDHOC credential; copy it to the Pi:

       coap-auth audiences add thermostat --lifetime 3600 --introspect-public-key thermostat.pem
       coap-auth edhoc-credential --json > as-credential.json

4. Run it (as a systemd service, say, with `Restart=always`):

       ~/coap-auth/bin/python examples/thermostat_rs.py \\
           --as coap://auth.example.net --audience thermostat --port 5683 \\
           --key ~/.local/state/thermostat.key --as-credential as-credential.json

   --issuer must match the service's `issuer` setting (default `coap-auth`). The thermostat
   needs UDP to the service (it observes /keys and /revoke/trl) and devices need UDP to it.
   Devices reach the thermostat over plain CoAP (no OSCORE between device and resource
   server yet), so a token here is a bearer token tied to the sender's address: run it on a
   network you trust.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import aiocoap
from aiocoap import resource

from device_client import (
    ChannelUnavailable,
    DeviceKey,
    EdhocCredential,
    KeySet,
    KeySetWatcher,
    ResourceServer,
    RevocationList,
    TokenVerifier,
    TrlWatcher,
    VerifiedToken,
    WatchPolicy,
    create_client_context,
    create_server_context,
    load_as_credential,
    require_scope,
)
from device_client.verify import DEFAULT_MAX_LIFETIME, DEFAULT_MAX_STALENESS


def say(text: str) -> None:
    print(f"[thermostat] {text}", flush=True)


class Temperature(resource.Resource):
    """The room temperature: sensors PUT readings, anyone with temp:read GETs the last one."""

    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server
        self.reading = b"unknown"

    @require_scope("temp:read")
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.reading)

    @require_scope("temp:write")
    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        token = self.resource_server.token_for(request)
        self.reading = request.payload[:16]
        sender = token.claims.sub if token is not None else "?"
        say(f"reading {self.reading.decode(errors='replace')} C from {sender}")
        return aiocoap.Message(code=aiocoap.CHANGED)


def _kids(kids: frozenset[bytes]) -> str:
    return " ".join(sorted(k.hex() for k in kids)) or "-"


def generate_key(args: argparse.Namespace) -> int:
    """A new P-256 key in --key (mode 0600, never overwritten), its public key for the
    operator in --public-key-out (or on stdout)."""
    key = DeviceKey.generate(args.audience)
    try:
        fd = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        say(f"{args.key} exists; not overwriting it")
        return 2
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_pem())
    say(f"key written to {args.key}")
    if args.public_key_out:
        Path(args.public_key_out).write_bytes(key.public_pem())
        say(f"public key written to {args.public_key_out}")
    else:
        sys.stdout.write(key.public_pem().decode())
    say(f"register it: coap-auth audiences add {args.audience} --introspect-public-key <that file>")
    return 0


def protected_channel(args: argparse.Namespace) -> tuple[DeviceKey | None, EdhocCredential | None]:
    """TrlWatcher's identity and as_credential, from --key and --as-credential (none with
    --plain). The key's id is the audience id: the AS knows the key under it."""
    if args.plain:
        return None, None
    identity = DeviceKey.from_pem(args.audience, Path(args.key).read_bytes())
    return identity, load_as_credential(Path(args.as_credential).read_bytes())


async def run(args: argparse.Namespace) -> int:
    try:
        identity, as_credential = protected_channel(args)
    except (OSError, ValueError, ChannelUnavailable) as exc:
        say(f"cannot set up the protected channel: {exc}")
        return 2
    client_context = await create_client_context()
    known: list[frozenset[bytes]] = []
    resource_server: ResourceServer | None = None

    def keys_changed(key_set: KeySet) -> None:
        if not known:
            say(f"keys: {len(key_set.kids)} published keys: {_kids(key_set.kids)}")
        else:
            added, removed = key_set.kids - known[-1], known[-1] - key_set.kids
            say(f"keys: rollover seen: published {_kids(added)}, withdrawn {_kids(removed)}")
        known.append(key_set.kids)
        if resource_server is not None:
            for _, token in resource_server.purge():
                say(f"key withdrawn: dropped the token {token.token_hash[1:5].hex()}")

    def trl_changed(revocations: RevocationList, added: frozenset[bytes]) -> None:
        say(f"revocation list: {len(revocations)} hashes, {len(added)} new")
        if resource_server is None:
            return
        for _, token in resource_server.purge():
            why = "revoked" if revocations.is_revoked(token.token_hash) else "expired"
            say(
                f"revocation seen: dropped the {why} token {token.token_hash[1:5].hex()}"
                f" of {token.claims.sub}"
            )

    keys = KeySetWatcher(client_context, args.as_uri, on_change=keys_changed)
    try:
        trl = TrlWatcher(
            client_context,
            args.as_uri,
            on_change=trl_changed,
            identity=identity,
            as_credential=as_credential,
        )
    except ChannelUnavailable as exc:
        say(exc.description)
        await client_context.shutdown()
        return 2
    if trl.channel is not None:
        say(f"revocation list: over EDHOC + OSCORE as {trl.channel.subject}")
    else:
        say("revocation list: plain CoAP (the service's require_oscore must be off)")
    verifier = TokenVerifier(
        keys,
        issuer=args.issuer,
        audience=args.audience,
        revocations=trl,
        leeway=args.leeway,
        max_lifetime=args.max_lifetime,
        max_staleness=args.max_staleness,
    )

    def accepted(token: VerifiedToken, endpoint: str) -> None:
        say(
            f"authz-info: accepted token {token.token_hash[1:5].hex()} of {token.claims.sub}"
            f" signed by key {token.kid.hex()}, scope {token.claims.scope}"
        )

    resource_server = ResourceServer(verifier, as_uri=args.as_uri, on_token=accepted)
    site = resource.Site()
    site.add_resource(
        [".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader)
    )
    resource_server.add_to(site)
    site.add_resource(["temperature"], Temperature(resource_server))

    # Follow the AS in the background: the thermostat serves (and refuses tokens with unknown
    # keys) even while the AS is unreachable, and catches up when it comes back.
    await keys.start(wait=False)
    await trl.start(wait=False)
    server = await create_server_context(site, bind=(args.bind, args.port))
    say(f"ready on coap://{args.bind if ':' not in args.bind else f'[{args.bind}]'}:{args.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        say("stopping")
        await keys.stop()
        await trl.stop()
        await server.shutdown()
        await client_context.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--as", dest="as_uri", help="e.g. coap://auth.example.net")
    parser.add_argument("--audience", default="thermostat")
    parser.add_argument(
        "--key", help="the thermostat's P-256 key (PEM), registered as its introspection key"
    )
    parser.add_argument(
        "--as-credential",
        help="the AS's EDHOC credential: what `coap-auth edhoc-credential --json` printed",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="no protected channel: plain CoAP (a service with require_oscore off)",
    )
    parser.add_argument(
        "--generate-key",
        action="store_true",
        help="write a new key to --key and its public key to --public-key-out, then exit",
    )
    parser.add_argument("--public-key-out", help="with --generate-key: the public key PEM")
    parser.add_argument("--issuer", default="coap-auth", help="the service's `issuer` setting")
    parser.add_argument("--bind", default="::")
    parser.add_argument("--port", type=int, default=5683)
    parser.add_argument("--leeway", type=int, default=30, help="clock-skew tolerance (s)")
    parser.add_argument(
        "--max-staleness",
        type=int,
        default=DEFAULT_MAX_STALENESS,
        help="refuse every token when keys or TRL were last confirmed longer ago (s)",
    )
    parser.add_argument(
        "--max-lifetime",
        type=int,
        default=DEFAULT_MAX_LIFETIME,
        help="refuse tokens whose exp - iat is longer (s); the AS issues at most 24 h",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show device_client's log")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="[thermostat] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    logging.getLogger("coap-server").setLevel(logging.ERROR)
    # aiocoap's client side logs a line per stray datagram (a RST, an unmatched response)
    # that anyone can send to the watchers' port: keep its warnings only.
    logging.getLogger("coap").setLevel(logging.WARNING)
    if args.generate_key:
        if not args.key:
            parser.error("--generate-key needs --key")
        return generate_key(args)
    if not args.as_uri:
        parser.error("--as is required")
    if not args.plain and not (args.key and args.as_credential):
        parser.error("--key and --as-credential are required (or --plain)")
    if args.max_staleness <= WatchPolicy().check_interval:
        parser.error(f"--max-staleness must be above {WatchPolicy().check_interval} s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
