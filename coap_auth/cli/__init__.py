"""The `coap-auth` command: each group of subcommands lives in a module beside this one.

Every subcommand accepts --data-dir and --config; bad input exits 2 with one line on stderr
and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from coap_auth.cli import backup, keys, operations, registry, serve, show, tokens
from coap_auth.config import environment_warnings, load_settings
from coap_auth.errors import CoapAuthError


def version() -> str:
    """The installed distribution's version (pyproject.toml's, through the package metadata)."""
    try:
        return metadata.version("coap-auth")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command_fn"):
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "worker_pipe", None) is None:  # a worker's supervisor has warned
        for warning in environment_warnings():
            print(f"coap-auth: warning: {warning}", file=sys.stderr)
    try:
        flags = {
            name: getattr(args, name, None)
            for name in ("data_dir", "store", "bind", "port", "workers", "signing_alg")
        }
        settings = load_settings(args.config, flags=flags)
        return asyncio.run(args.command_fn(args, settings))
    except CoapAuthError as error:
        print(f"coap-auth: error: {error.description}", file=sys.stderr)
        return 2
    except OSError as error:  # the data directory (missing, read-only, full), a socket
        where = f": {error.filename}" if error.filename is not None else ""
        print(f"coap-auth: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- argument parsing -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="data directory (default ./coap-auth-data)")
    common.add_argument("--config", type=Path, help="TOML settings file")
    common.add_argument(
        "--store",
        metavar="URL",
        help="postgresql://... to share state between instances (default: SQLite in data dir)",
    )

    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON")

    parser = argparse.ArgumentParser(prog="coap-auth", description=__doc__)
    parser.add_argument("--version", action="version", version=f"coap-auth {version()}")
    sub = parser.add_subparsers(metavar="COMMAND")

    for module in (serve, registry, keys, tokens, backup, operations, show):
        module.add_parsers(sub, common, listing)
    return parser


if __name__ == "__main__":
    sys.exit(main())
