"""`coap-auth check`: whether the running service is healthy, for scripts and health checks.

Exit 0 and one line when it is; 1 and one line naming what failed; 2 for bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from coap_auth.addresses import authority
from coap_auth.cli.runtime import coap_get, seconds
from coap_auth.config import Settings
from coap_auth.errors import OperatorError

DEFAULT_TIMEOUT = 3.0  # s, for each of the two probes
# What a wildcard bind is reached at from this host.
_LOCAL = {"::": "::1", "0.0.0.0": "127.0.0.1", "": "127.0.0.1"}


class CheckFailed(Exception):
    """One probe failed: its message is the line printed."""


def _reached_at(bind: str, port: int) -> str:
    """The authority the service bound to `bind` is reached at from this host."""
    return authority(_LOCAL.get(bind, bind), port)


async def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    timeout = args.timeout
    if settings.port == 0:
        raise OperatorError("check needs the service's port: port 0 names none")
    try:
        passed = []
        if settings.metrics_port:
            passed.append(await asyncio.to_thread(_check_health, settings, timeout))
        passed.append(await _check_coap(settings, timeout))
    except CheckFailed as failure:
        print(f"coap-auth check: FAILED: {failure}", flush=True)
        return 1
    print(f"coap-auth check: ok: {'; '.join(passed)}", flush=True)
    return 0


def _check_health(settings: Settings, timeout: float) -> str:
    """GET /healthz on the metrics listener (run in a thread: urllib blocks)."""
    url = f"http://{_reached_at(settings.metrics_bind, settings.metrics_port)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 (http only)
            body = answer.read(64 * 1024)
    except urllib.error.HTTPError as error:
        raise CheckFailed(f"{url} answered {error.code}: {_problems(error)}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise CheckFailed(f"nothing answers at {url} ({reason})") from None
    # Any 200 is not enough: something else listening there would pass (attack round 1).
    try:
        healthy = json.loads(body).get("status") == "ok"
    except (ValueError, AttributeError):
        healthy = False
    if not healthy:
        raise CheckFailed(f"{url} answered 200 but not coap-auth's health document")
    return f"{url} healthy"


def _problems(error: urllib.error.HTTPError) -> str:
    try:
        document = json.loads(error.read())
        return "; ".join(str(p) for p in document["problems"]) or "no reason given"
    except Exception:  # not our listener's answer
        return "not coap-auth's health document"


async def _check_coap(settings: Settings, timeout: float) -> str:
    """A plain CoAP GET of /.well-known/core on the service's port, answering its Echo
    challenge: from an address the service has not verified (a service bound to one of the
    host's public addresses), the answer is too large to send unasked."""
    url = f"coap://{_reached_at(settings.bind, settings.port)}/.well-known/core"
    try:
        response = await coap_get(url, timeout)
    except TimeoutError:
        raise CheckFailed(f"no CoAP answer from {url} within {timeout:g} s") from None
    except Exception as error:  # aiocoap's network errors: refused, unreachable, bad host
        raise CheckFailed(f"no CoAP answer from {url} ({type(error).__name__})") from None
    if not response.code.is_successful():
        raise CheckFailed(f"{url} answered {response.code}")
    if b"</token>" not in response.payload:  # another CoAP server there would pass
        raise CheckFailed(f"{url} answered, but lists no </token>: not coap-auth")
    return f"{url} answered {response.code}"


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    check = sub.add_parser(
        "check",
        parents=[common],
        help="check that the running service answers (and its /healthz, with metrics_port)",
    )
    check.add_argument("--bind", help="the service's bind address (default: the setting's)")
    check.add_argument("--port", type=int, help="the service's UDP port (default 5683)")
    check.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT:g})",
    )
    check.set_defaults(command_fn=cmd_check)
