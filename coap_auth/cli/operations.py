"""`coap-auth check`: whether the running service is healthy, for scripts and health checks."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    pass
