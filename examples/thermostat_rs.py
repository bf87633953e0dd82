#!/usr/bin/env python3
"""A thermostat: a resource server that takes requests only under proof of possession.

It serves /temperature (GET needs scope temp:read, PUT temp:write) over OSCORE only, each
request decided from the access token bound to the OSCORE security context it came under,
never from its source address: a token copied off the air is useless to anyone who does not
hold its key. Devices set the context up by one of the ACE OSCORE profiles (its audience's
profile, chosen by the operator; device_client.ResourceClient does either):

- edhoc_oscore (the default profile; draft-ietf-ace-edhoc-oscore-profile-11, code points
  provisional): the device runs EDHOC with the thermostat at /.well-known/edhoc, proving the
  key its token is bound to, the token inside the handshake (or POSTed to /authz-info first).
  The thermostat's EDHOC key is its own key (--key), the one the operator registered for the
  audience; the AS hands it to devices with their tokens (rs_cnf).
- coap_oscore (RFC 9203): the device POSTs its token with a nonce to /authz-info; the token is
  encrypted for the thermostat under the audience's own AES key, which the operator exports
  once (`coap-auth keys export AUDIENCE`) into --token-keys; the OSCORE keys come out of it.

Tokens are verified on the thermostat itself against the AS's keys, which it observes at
/keys, so a key rollover needs no restart, and it observes /revoke/trl: a revoked token, an
expired one, or one whose key the operator withdrew takes its security context with it. It
never asks the AS about a single token. The AS serves /revoke/trl only over its protected
channel, and only the tokens issued for the audience asking: the thermostat runs EDHOC with
the AS as its audience id with --key, and reads the list over OSCORE. /keys is public.
Bearer tokens (an audience of the bearer profile) are refused unless --allow-bearer; they
are then tied to the sender's address and port, which anyone on the path can forge.

It is no amplifier for a spoofed source address: an unprotected answer to an address not
yet verified is at most 3x the request, or else a 4.01 with an Echo option (RFC 9175 §2.4)
that device_client.ResourceClient returns by itself (libcoap's client too, since 4.3.1);
loopback counts as verified (--verified-networks).

Run it on a Raspberry Pi against a remote coap-auth service
-----------------------------------------------------------
1. On the Pi (Python 3.11+), install the device side (aiocoap, cbor2, cryptography, PyJWT,
   lakers-python; no database drivers):

       git clone <repository> ~/coap-auth && cd ~/coap-auth     # the checkout
       python3 -m venv ~/.venvs/coap-auth && ~/.venvs/coap-auth/bin/pip install .

   (32-bit Raspberry Pi OS builds cffi, maybe cryptography, from source: README
   "Deployment" names the packages to install first)

   and set the clock (NTP): token expiry is checked against it, with --leeway seconds of
   tolerance. lakers-python (EDHOC) has wheels for 64-bit Raspberry Pi OS (aarch64), not for
   32-bit (armv7): there, run with --plain (no EDHOC: the revocation list is then read over
   plain CoAP, from a service whose `require_oscore` is off) and --token-keys or
   --allow-bearer (OSCORE itself needs no lakers-python; not tested on armv7).

2. Make the thermostat's key (kept on the Pi, mode 0600) and give its public key to the
   operator:

       ~/.venvs/coap-auth/bin/python examples/thermostat_rs.py --generate-key \\
           --key ~/.local/state/thermostat.key --public-key-out thermostat.pem

3. On the service, the operator registers the audience with that key (its EDHOC key toward
   the AS, and toward devices: the AS sends it to them as rs_cnf) and prints the AS's EDHOC
   credential; copy it to the Pi:

       coap-auth audiences add thermostat --lifetime 3600 --introspect-public-key thermostat.pem
       coap-auth edhoc-credential --json > as-credential.json

   That is the edhoc_oscore profile. For coap_oscore, add `--profile coap_oscore`, then
   export the audience's AES keys and copy them to the Pi (mode 0600: they decrypt tokens):

       coap-auth keys export thermostat > thermostat-token-keys.txt

4. Run it (as a systemd service: deploy/coap-auth-thermostat.service, README "Deployment"):

       ~/.venvs/coap-auth/bin/python examples/thermostat_rs.py \\
           --as coap://auth.example.net --audience thermostat --port 5685 \\
           --key ~/.local/state/thermostat.key --as-credential as-credential.json
           # coap_oscore: also --token-keys thermostat-token-keys.txt

   --issuer must match the service's `issuer` setting (default `coap-auth`). The thermostat
   needs UDP to the service (it observes /keys and /revoke/trl) and devices need UDP to it
   (port 5685 by default: 5683 is the AS's, 5684 CoAP over DTLS's). After the operator
   withdraws an AES key (`coap-auth keys revoke KID`), export the family again into the
   --token-keys file and send the thermostat SIGHUP: it reloads the file, and the contexts
   of tokens under keys no longer listed end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aiocoap
from aiocoap import resource

from device_client import (
    ChannelUnavailable,
    Clock,
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
    load_as_credential,
    require_scope,
)
from device_client.rs import endpoint_of
from device_client.verify import DEFAULT_MAX_LIFETIME, DEFAULT_MAX_STALENESS

DEFAULT_PORT = 5685  # 5683 is the AS's (CoAP), 5684 CoAP over DTLS's


def say(text: str) -> None:
    print(f"[thermostat] {text}", flush=True)


class Temperature(resource.Resource):
    """The room temperature: sensors PUT readings, anyone with temp:read GETs the last one."""

    def __init__(self, resource_server: ResourceServer, report: Callable[[str], None]) -> None:
        super().__init__()
        self.resource_server = resource_server
        self.report = report
        self.reading = b"unknown"

    @require_scope("temp:read")
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.reading)

    @require_scope("temp:write")
    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        token = self.resource_server.token_for(request)
        self.reading = request.payload[:16]
        sender = f"{token.claims.sub} ({token.profile}" if token is not None else "? ("
        self.report(
            f"reading {self.reading.decode(errors='replace')} C from {sender},"
            f" {endpoint_of(request)})"
        )
        return aiocoap.Message(code=aiocoap.CHANGED)


def _kids(kids: frozenset[bytes]) -> str:
    return " ".join(sorted(k.hex() for k in kids)) or "-"


class Thermostat:
    """The thermostat's parts: watchers of the AS's /keys and /revoke/trl, the verifier, the
    ResourceServer and its site. `identity` (the thermostat's P-256 key, named after the
    audience) reads the TRL over EDHOC with the AS and is the EDHOC identity devices
    authenticate (edhoc_oscore); `token_keys` (`KeySet.from_export`) decrypt the tokens of a
    coap_oscore audience. `clock` and `policy` are for tests. Raises ChannelUnavailable when
    the identity cannot run EDHOC, ValueError for inconsistent bounds or a network in
    `verified_networks` (comma-separated, "" for none) that does not parse."""

    def __init__(
        self,
        client_context: aiocoap.Context,
        as_uri: str,
        *,
        audience: str = "thermostat",
        issuer: str = "coap-auth",
        identity: DeviceKey | None = None,
        as_credential: EdhocCredential | None = None,
        token_keys: KeySet | None = None,
        allow_bearer: bool = False,
        verified_networks: str = "127.0.0.0/8,::1/128",
        leeway: int = 30,
        max_lifetime: int = DEFAULT_MAX_LIFETIME,
        max_staleness: int = DEFAULT_MAX_STALENESS,
        clock: Clock | None = None,
        policy: WatchPolicy | None = None,
        report: Callable[[str], None] = say,
    ) -> None:
        self.report = report
        self.known: list[frozenset[bytes]] = []
        self.server: aiocoap.Context | None = None
        self.keys = KeySetWatcher(
            client_context, as_uri, clock=clock, policy=policy, on_change=self._keys_changed
        )
        self.trl = TrlWatcher(
            client_context,
            as_uri,
            clock=clock,
            policy=policy,
            on_change=self._trl_changed,
            identity=identity,
            as_credential=as_credential,
        )
        self.verifier = TokenVerifier(
            self.keys,
            issuer=issuer,
            audience=audience,
            revocations=self.trl,
            clock=clock,
            leeway=leeway,
            max_lifetime=max_lifetime,
            max_staleness=max_staleness,
            encryption_keys=token_keys.encryption if token_keys is not None else None,
        )
        self.resource_server = ResourceServer(
            self.verifier,
            as_uri=as_uri,
            identity=identity,
            allow_bearer=allow_bearer,
            on_token=self._accepted,
            verified_networks=verified_networks,
        )
        self.site = resource.Site()
        self.site.add_resource(
            [".well-known", "core"], resource.WKCResource(self.site.get_resources_as_linkheader)
        )
        self.temperature = Temperature(self.resource_server, report)
        self.site.add_resource(["temperature"], self.temperature)

    async def start(self, bind: tuple[str, int]) -> aiocoap.Context:
        """Follow the AS in the background (the thermostat serves, refusing tokens under
        unknown keys, even while the AS is unreachable) and serve on UDP at `bind`. Raises
        OSError when the address cannot be bound."""
        await self.keys.start(wait=False)
        await self.trl.start(wait=False)
        self.server = await self.resource_server.serve(self.site, bind)
        return self.server

    async def stop(self) -> None:
        await self.keys.stop()
        await self.trl.stop()
        await self.resource_server.close()

    def reload_token_keys(self, token_keys: KeySet) -> None:
        """Take a new export of the audience's AES keys; end the contexts of tokens under keys
        no longer in it."""
        self.verifier.set_encryption_keys(token_keys.encryption)
        self.report(f"token keys: {len(token_keys.encryption)} AES keys loaded")
        self._purge("token key withdrawn")

    def _purge(self, why: str) -> None:
        for where, token in self.resource_server.purge():
            ended = "its security context" if where.startswith("oscore:") else "the token"
            self.report(
                f"{why}: dropped {ended} (token {token.token_hash[1:5].hex()} of"
                f" {token.claims.sub})"
            )

    def _keys_changed(self, key_set: KeySet) -> None:
        if not self.known:
            self.report(f"keys: {len(key_set.kids)} published keys: {_kids(key_set.kids)}")
        else:
            added, removed = key_set.kids - self.known[-1], self.known[-1] - key_set.kids
            self.report(
                f"keys: rollover seen: published {_kids(added)}, withdrawn {_kids(removed)}"
            )
        self.known.append(key_set.kids)
        self._purge("key withdrawn")

    def _trl_changed(self, revocations: RevocationList, added: frozenset[bytes]) -> None:
        self.report(f"revocation list: {len(revocations)} hashes, {len(added)} new")
        self._purge("revocation seen")

    def _accepted(self, token: VerifiedToken, where: str) -> None:
        how = {"pop:": "held for EDHOC", "oscore:": "bound to a new OSCORE context"}
        state = next((v for k, v in how.items() if where.startswith(k)), f"kept for {where}")
        key = "encrypted under key" if token.profile == "coap_oscore" else "signed by key"
        self.report(
            f"authz-info: accepted token {token.token_hash[1:5].hex()} of {token.claims.sub}"
            f" {key} {token.kid.hex()}, scope {token.claims.scope}, {token.profile}: {state}"
        )


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
    """The thermostat's identity and the AS's credential, from --key and --as-credential (none
    with --plain). The key's id is the audience id: the AS knows the key under it."""
    if args.plain:
        return None, None
    identity = DeviceKey.from_pem(args.audience, Path(args.key).read_bytes())
    identity.edhoc_identity()  # ChannelUnavailable now for a key EDHOC cannot use
    return identity, load_as_credential(Path(args.as_credential).read_bytes())


def load_token_keys(path: str | None) -> KeySet | None:
    """--token-keys: what `coap-auth keys export AUDIENCE` printed. Raises OSError,
    ValueError."""
    if path is None:
        return None
    return KeySet.from_export(Path(path).read_text())


async def run(args: argparse.Namespace) -> int:
    try:
        identity, as_credential = protected_channel(args)
        token_keys = load_token_keys(args.token_keys)
    except (OSError, ValueError, ChannelUnavailable) as exc:
        say(f"cannot start: {exc}")
        return 2
    client_context = await create_client_context()
    try:
        thermostat = Thermostat(
            client_context,
            args.as_uri,
            audience=args.audience,
            issuer=args.issuer,
            identity=identity,
            as_credential=as_credential,
            token_keys=token_keys,
            allow_bearer=args.allow_bearer,
            verified_networks=args.verified_networks,
            leeway=args.leeway,
            max_lifetime=args.max_lifetime,
            max_staleness=args.max_staleness,
        )
    except ChannelUnavailable as exc:
        say(exc.description)
        await client_context.shutdown()
        return 2
    except ValueError as exc:
        say(f"cannot start: {exc}")
        await client_context.shutdown()
        return 2
    if thermostat.trl.channel is not None:
        say(f"revocation list: over EDHOC + OSCORE as {thermostat.trl.channel.subject}")
    else:
        say("revocation list: plain CoAP (the service's require_oscore must be off)")
    profiles = ["coap_oscore"] if token_keys is not None else []
    if identity is not None:
        profiles.insert(0, "edhoc_oscore")
    if args.allow_bearer:
        profiles.append("bearer")
    say(f"profiles: {', '.join(profiles) or 'none (give --key or --token-keys)'}")
    try:
        await thermostat.start((args.bind, args.port))
    except OSError as exc:  # e.g. "cannot serve on [::]:5683: another process is serving ..."
        say(str(exc))
        await thermostat.stop()
        await client_context.shutdown()
        return 2
    say(f"ready on coap://{args.bind if ':' not in args.bind else f'[{args.bind}]'}:{args.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def reload() -> None:
        try:
            reloaded = load_token_keys(args.token_keys)
        except (OSError, ValueError) as exc:
            say(f"token keys not reloaded: {exc}")
            return
        if reloaded is not None:
            thermostat.reload_token_keys(reloaded)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await stop.wait()
    finally:
        say("stopping")
        await thermostat.stop()
        await client_context.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--as", dest="as_uri", help="e.g. coap://auth.example.net")
    parser.add_argument("--audience", default="thermostat")
    parser.add_argument(
        "--key",
        help="the thermostat's P-256 key (PEM), registered as its audience's key: its EDHOC"
        " identity toward the AS and toward devices",
    )
    parser.add_argument(
        "--as-credential",
        help="the AS's EDHOC credential: what `coap-auth edhoc-credential --json` printed",
    )
    parser.add_argument(
        "--token-keys",
        help="a coap_oscore audience's AES keys: what `coap-auth keys export AUDIENCE` printed"
        " (reloaded on SIGHUP)",
    )
    parser.add_argument(
        "--allow-bearer",
        action="store_true",
        help="also accept bearer tokens (no proof of possession: tied to the sender's address)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="no EDHOC: the TRL over plain CoAP (require_oscore off), coap_oscore tokens only",
    )
    parser.add_argument(
        "--generate-key",
        action="store_true",
        help="write a new key to --key and its public key to --public-key-out, then exit",
    )
    parser.add_argument("--public-key-out", help="with --generate-key: the public key PEM")
    parser.add_argument("--issuer", default="coap-auth", help="the service's `issuer` setting")
    parser.add_argument("--bind", default="::")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--leeway", type=int, default=30, help="clock-skew tolerance (s)")
    parser.add_argument(
        "--verified-networks",
        default="127.0.0.0/8,::1/128",
        help="comma-separated networks whose source addresses need no Echo round trip before"
        ' an answer over 3x their request (RFC 9175 §2.4); "" for none',
    )
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
    if args.plain and not (args.token_keys or args.allow_bearer):
        parser.error("--plain serves coap_oscore tokens only: give --token-keys")
    if args.max_staleness <= WatchPolicy().check_interval:
        parser.error(f"--max-staleness must be above {WatchPolicy().check_interval} s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
