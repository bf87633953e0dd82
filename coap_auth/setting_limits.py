"""What a setting accepts: a number range with its unit, one of a few values, or text of a
given form; each describes itself in one line, for the error and for docs/configuration.md.

Pure: the standard library only. The table of every setting's limit is config.LIMITS.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# RFC 1123 §2.1 host name label; a name whose last label is all digits is a mistyped IPv4
# address, not a host name (RFC 3696 §2).
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _number(value: float, grouped: bool = True) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if grouped else str(value)


@dataclass(frozen=True, slots=True)
class Between:
    """A number from `low` to `high` inclusive, in `unit` (digits grouped unless it is a port
    number)."""

    low: float
    high: float
    unit: str = ""
    grouped: bool = True

    @property
    def text(self) -> str:
        return f"{_number(self.low, self.grouped)} to {_number(self.high, self.grouped)}"

    def accepts(self, value: Any) -> bool:
        return bool(self.low <= value <= self.high)

    def problem(self, name: str, value: Any) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{name} must be {self.text}{unit}, not {_number(value, self.grouped)}"


@dataclass(frozen=True, slots=True)
class OneOf:
    """One of a few values (text compared ignoring case when `fold_case`)."""

    values: tuple[Any, ...]
    unit: str = ""
    fold_case: bool = False

    @property
    def text(self) -> str:
        shown = [str(v).lower() if isinstance(v, bool) else str(v) for v in self.values]
        return ", ".join(shown[:-1]) + " or " + shown[-1]

    def accepts(self, value: Any) -> bool:
        if self.fold_case and isinstance(value, str):
            return value.upper() in (str(v).upper() for v in self.values)
        return value in self.values

    def problem(self, name: str, value: Any) -> str:
        return f"{name} must be {self.text}"


@dataclass(frozen=True, slots=True)
class Shape:
    """Text of a given form, described by `text`; the value is never echoed (a store URL can
    hold a password)."""

    text: str
    accepts: Callable[[Any], bool]
    unit: str = ""

    def problem(self, name: str, value: Any) -> str:
        return f"{name} must be {self.text}"


Limit = Between | OneOf | Shape


def is_host(text: str) -> bool:
    """Whether `text` is an IP address literal (IPv6 with an optional %zone) or has the syntax
    of a host name. Syntax only: whether the name resolves is learnt when binding."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    name = text.removesuffix(".")
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )
