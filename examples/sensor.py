#!/usr/bin/env python3
"""A temperature sensor that keeps an access token fresh and reports to a thermostat.

The device authenticates with its own P-256 key: it runs EDHOC with the AS (the key is its
credential, the AS's credential is provisioned) and asks for tokens over the OSCORE context
that yields, so no secret and no token crosses the network in the clear. It keeps its token
fresh ahead of expiry and PUTs a reading to the thermostat's /temperature every few seconds
under an OSCORE security context set up by the ACE profile of the token
(device_client.ResourceClient): EDHOC with the thermostat proving the key the token is bound
to (edhoc_oscore), or the RFC 9203 /authz-info exchange (coap_oscore). A token copied on the
way is useless without that key. Each new token gets a new context; when the thermostat
forgets the context (restart, revocation) the sensor sets it up again. Everything it must
remember (the AS and its credential, its key, the token and the refresh token) lives in one
state file, mode 0600, so a reboot resumes; after a reboot of the AS it runs EDHOC again by
itself. `run --bearer` is the old way, for a bearer audience and a thermostat run with
--allow-bearer: the token POSTed to /authz-info, readings in plain CoAP.

Run it on a Raspberry Pi against a remote coap-auth service
-----------------------------------------------------------
1. On the Pi (Raspberry Pi OS, Python 3.11+), install the device side: it needs only
   aiocoap, cbor2, cryptography and PyJWT, no database drivers:

       git clone <repository> ~/coap-auth && cd ~/coap-auth     # the checkout
       python3 -m venv ~/.venvs/coap-auth && ~/.venvs/coap-auth/bin/pip install .
       # or: ~/.venvs/coap-auth/bin/pip install coap_auth-0.1.0-py3-none-any.whl

   On 32-bit Raspberry Pi OS (armv7) cffi, and cryptography where piwheels has no wheel,
   build from source: install the packages README "Deployment" names first.

   Set the clock (NTP: `timedatectl status` shows "System clock synchronized: yes"):
   tokens carry absolute times.

   The protected channel needs lakers-python (EDHOC), which pip installs with the rest on
   64-bit Raspberry Pi OS (aarch64) but which has no wheel for 32-bit Raspberry Pi OS (armv7):
   there, provision with --plain, against a service whose `require_oscore` is off, and run
   with --bearer (ResourceClient needs lakers-python too; a bearer audience, a thermostat run
   with --allow-bearer).

2. On the service, the operator prints the AS's EDHOC credential; copy it to the Pi:

       coap-auth edhoc-credential --json > as-credential.json

3. Provision the device once. This creates the device key inside the state file, stores the
   AS's credential with it and writes the device's public key for the operator:

       ~/.venvs/coap-auth/bin/python examples/sensor.py provision \\
           --as coap://auth.example.net --client-id sensor-7 --audience thermostat \\
           --scope temp:write --state ~/.local/state/sensor-7.state \\
           --as-credential as-credential.json --public-key-out sensor-7.pem

   (--issuer must match the service's `issuer` setting; the default is `coap-auth`.)

4. On the service, the operator registers it (its key is also its EDHOC credential):

       coap-auth clients add sensor-7 --audience thermostat --scope temp:write \\
           --public-key sensor-7.pem

5. Run it (as a systemd service: deploy/coap-auth-sensor.service, README "Deployment"):

       ~/.venvs/coap-auth/bin/python examples/sensor.py run \\
           --state ~/.local/state/sensor-7.state --rs coap://thermostat.local:5685

   UDP must reach the service (5683) and the thermostat (5685). The reading is the Pi's SoC
   temperature (/sys/class/thermal/thermal_zone0/temp); elsewhere it is simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
from pathlib import Path

import aiocoap

from coap_auth.wire import AceProfile
from device_client import (
    AccessToken,
    ChannelUnavailable,
    DeviceKey,
    DeviceState,
    RefreshPolicy,
    ResourceClient,
    ResourceRefused,
    ResourceUnreachable,
    SecretCredentials,
    ServiceUnreachable,
    StateFile,
    StateFileError,
    SystemClock,
    TokenClient,
    TokenRequestRefused,
    create_client_context,
    load_as_credential,
)

CF_CWT = 61  # docs/protocol.md: application/cwt, the content format of /authz-info
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")


def say(text: str) -> None:
    print(f"[sensor] {text}", flush=True)


def read_temperature() -> float:
    try:
        return int(THERMAL_ZONE.read_text()) / 1000
    except (OSError, ValueError):
        return round(random.uniform(19.0, 23.0), 1)


def provision(args: argparse.Namespace) -> int:
    state_file = StateFile(args.state)
    if state_file.exists() and not args.replace:
        say(f"{args.state} exists; pass --replace to provision again")
        return 2
    if not args.plain and args.as_credential is None:
        say("--as-credential is needed (or --plain, for a service with require_oscore off)")
        return 2
    if args.secret_env:
        if not args.plain:
            say("a client secret cannot run EDHOC: use --plain with --secret-env")
            return 2
        secret = os.environ.get(args.secret_env)
        if not secret:
            say(f"environment variable {args.secret_env} is empty")
            return 2
        credentials: SecretCredentials | DeviceKey = SecretCredentials(args.client_id, secret)
    else:
        credentials = DeviceKey.generate(args.client_id, curve=args.curve)
    as_credential = None
    if not args.plain:
        try:
            as_credential = load_as_credential(Path(args.as_credential).read_bytes())
            if isinstance(credentials, DeviceKey):
                credentials.edhoc_identity()  # an Ed25519 key cannot: say so now
        except OSError as exc:
            say(f"cannot read {args.as_credential}: {exc.strerror}")
            return 2
        except ChannelUnavailable as exc:
            say(exc.description)
            return 2
    state_file.save(
        DeviceState(
            as_uri=args.as_uri,
            credentials=credentials,
            issuer=args.issuer,
            audience=args.audience,
            scope=args.scope,
            as_credential=as_credential,
        )
    )
    channel = "plain CoAP" if as_credential is None else f"EDHOC with {as_credential.subject}"
    say(f"provisioned {args.client_id} in {args.state} ({channel})")
    if isinstance(credentials, DeviceKey):
        public_pem = credentials.public_pem()
        if args.public_key_out:
            Path(args.public_key_out).write_bytes(public_pem)
            say(f"public key written to {args.public_key_out}")
        else:
            sys.stdout.write(public_pem.decode())
        say(
            f"register it: coap-auth clients add {args.client_id} --audience {args.audience}"
            f' --scope "{args.scope}" --public-key <that file>'
        )
    return 0


async def run(args: argparse.Namespace) -> int:
    context = await create_client_context()
    policy = RefreshPolicy(
        refresh_fraction=args.refresh_fraction, request_timeout=args.request_timeout
    )

    def announce(kind: str, token: AccessToken) -> None:
        lifetime = token.expires_at - token.received_at
        say(
            f"{kind}: new token {token.token_hash[1:5].hex()} for {token.audience},"
            f" expires in {lifetime} s, refresh in {token.refresh_at - token.received_at} s"
        )

    try:
        client = TokenClient.from_state_file(
            context, StateFile(args.state), policy=policy, on_token=announce
        )
    except (ChannelUnavailable, StateFileError) as exc:
        # A missing or damaged state file: one line, as every other refusal here.
        say(exc.description)
        await context.shutdown()
        return 2
    if client.channel is not None:
        say(f"protected channel: EDHOC + OSCORE with the AS as {client.client_id}")
    else:
        say("plain CoAP to the AS (its require_oscore must be off)")
    try:
        if args.bearer:
            await _run_bearer(args, context, client)
        else:
            await _run_protected(args, context, client)
    except ChannelUnavailable as exc:
        hint = "" if args.bearer else " (a bearer audience: `run --bearer`)"
        say(exc.description + hint)
        return 2
    finally:
        await context.shutdown()
    return 0


async def _token(client: TokenClient, clock: SystemClock) -> AccessToken | None:
    """The current token, or None after waiting out a failure."""
    try:
        return await client.token()
    except ServiceUnreachable as unreachable:
        wait = max(1, unreachable.retry_at - clock.now())
        say(f"no token ({unreachable.description}); retrying in {wait} s")
        await asyncio.sleep(wait)
    except TokenRequestRefused as refused:
        say(f"token refused: {refused.description}")
        await asyncio.sleep(max(1, (client.retry_at or clock.now()) - clock.now()))
    return None


async def _run_protected(
    args: argparse.Namespace, context: aiocoap.Context, client: TokenClient
) -> None:
    """Readings under the OSCORE context of the token's ACE profile (ResourceClient)."""
    clock = SystemClock()
    sent = 0
    async with ResourceClient(context, args.rs, client, timeout=args.request_timeout) as rs:
        while args.count is None or sent < args.count:
            if await _token(client, clock) is None:
                continue
            reading = read_temperature()
            handshakes = rs.handshakes
            try:
                response = await rs.request(aiocoap.PUT, "temperature", f"{reading:.1f}".encode())
            except (ServiceUnreachable, TokenRequestRefused):
                continue  # _token says why and waits, next time round
            except ResourceRefused as refused:
                say(f"the thermostat refused us: {refused.description}")
                if refused.coap_code in (0, int(aiocoap.UNAUTHORIZED)):
                    # It refused the token (in EDHOC, or at /authz-info): take another.
                    client.discard_access_token()
                await asyncio.sleep(args.interval)
                continue
            except ResourceUnreachable as unreachable:
                say(f"the thermostat did not answer: {unreachable.description}")
                await asyncio.sleep(args.interval)
                continue
            bound = rs.token
            if rs.handshakes != handshakes and bound is not None:
                say(
                    f"security context with the thermostat set up: {_profile(bound)}, token"
                    f" {bound.token_hash[1:5].hex()}"
                )
            say(f"reading {reading:.1f} C sent: {response.code}")
            sent += 1
            await asyncio.sleep(args.interval)


def _profile(token: AccessToken) -> str:
    names: dict[int | None, str] = {
        AceProfile.COAP_OSCORE: "coap_oscore",
        AceProfile.COAP_EDHOC_OSCORE: "edhoc_oscore",
    }
    return names.get(token.profile, f"profile {token.profile}")


async def _run_bearer(
    args: argparse.Namespace, context: aiocoap.Context, client: TokenClient
) -> None:
    """Before the profiles: the token POSTed to /authz-info, readings in plain CoAP (the
    thermostat ties the token to this address and port)."""
    clock = SystemClock()
    uploaded: bytes | None = None
    sent = 0
    while args.count is None or sent < args.count:
        token = await _token(client, clock)
        if token is None:
            continue
        if token.value != uploaded:
            response = await _send(
                context, aiocoap.POST, f"{args.rs}/authz-info", token.value, CF_CWT
            )
            th = token.token_hash[1:5].hex()
            say(f"token {th} uploaded to the thermostat: {response.code}")
            if response.code != aiocoap.CREATED:
                client.discard_access_token()
                await asyncio.sleep(args.interval)
                continue
            uploaded = token.value
        reading = read_temperature()
        response = await _send(
            context, aiocoap.PUT, f"{args.rs}/temperature", f"{reading:.1f}".encode()
        )
        if response.code == aiocoap.UNAUTHORIZED:
            # Expired or revoked (RFC 9200 §5.10.2): get another token and upload it.
            say(f"reading refused with {response.code}: getting a new token")
            client.discard_access_token()
            uploaded = None
            continue
        say(f"reading {reading:.1f} C sent: {response.code}")
        sent += 1
        await asyncio.sleep(args.interval)


async def _send(
    context: aiocoap.Context,
    code: aiocoap.Code,
    uri: str,
    payload: bytes,
    content_format: int | None = None,
) -> aiocoap.Message:
    message = aiocoap.Message(code=code, uri=uri, payload=payload)
    if content_format is not None:
        message.opt.content_format = content_format
    try:
        return await asyncio.wait_for(context.request(message).response, 30)
    except (TimeoutError, aiocoap.error.Error) as exc:
        return aiocoap.Message(code=aiocoap.SERVICE_UNAVAILABLE, payload=str(exc).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prov = sub.add_parser("provision", help="create the state file (device key or secret)")
    prov.add_argument("--as", dest="as_uri", required=True, help="e.g. coap://auth.example.net")
    prov.add_argument("--client-id", required=True)
    prov.add_argument("--audience", required=True)
    prov.add_argument("--scope", default="temp:write")
    prov.add_argument("--issuer", default="coap-auth", help="the service's `issuer` setting")
    prov.add_argument("--state", required=True, help="state file (created with mode 0600)")
    prov.add_argument(
        "--as-credential",
        help="the AS's EDHOC credential: what `coap-auth edhoc-credential --json` printed",
    )
    prov.add_argument(
        "--plain",
        action="store_true",
        help="no protected channel: plain CoAP (a service with require_oscore off)",
    )
    prov.add_argument(
        "--curve", choices=["P-256", "Ed25519"], default="P-256", help="Ed25519: --plain only"
    )
    prov.add_argument("--public-key-out", help="write the public key PEM here")
    prov.add_argument(
        "--secret-env",
        help="use a client secret from this environment variable instead of a key (--plain)",
    )
    prov.add_argument("--replace", action="store_true", help="overwrite an existing state file")
    go = sub.add_parser("run", help="keep a token fresh and report readings")
    go.add_argument("--state", required=True)
    go.add_argument("--rs", required=True, help="the thermostat, e.g. coap://thermostat.local:5685")
    go.add_argument("--interval", type=float, default=10.0, help="seconds between readings")
    go.add_argument("--count", type=int, help="stop after this many readings")
    go.add_argument("--refresh-fraction", type=float, default=0.75)
    go.add_argument("--request-timeout", type=float, default=30.0)
    go.add_argument(
        "--bearer",
        action="store_true",
        help="no OSCORE with the thermostat: upload the token, plain CoAP (bearer audiences)",
    )
    go.add_argument("-v", "--verbose", action="store_true", help="show device_client's log")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="[sensor] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    if args.command == "provision":
        return provision(args)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
