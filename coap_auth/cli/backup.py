"""`coap-auth backup` and `coap-auth restore`: a consistent copy of the state, and putting
one back."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    pass
