"""`coap-auth show`: the service's key set and revocation list as text."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    pass
