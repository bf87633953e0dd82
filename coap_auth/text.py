"""Text that came off the wire: which characters may reach the store, and how any request-derived
text is written into a log line so that it stays one line.
"""

from __future__ import annotations

import json
import re

# Unicode category Cc: the C0 controls U+0000-U+001F, DEL U+007F and the C1 controls
# U+0080-U+009F. NUL is refused by PostgreSQL; CR, LF and NEL split log lines.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# What a log field may hold bare; anything else is quoted, so a space cannot forge a field.
_BARE = re.compile(r"[A-Za-z0-9._:@/+-]+")


def has_control_character(text: str) -> bool:
    return _CONTROL.search(text) is not None


def loggable(text: str) -> str:
    """`text` for a log line: every character that is not printable (controls, line and
    paragraph separators, format characters) and the backslash escaped as Python writes them
    (`\\n`, `\\x00`, `\\u2028`, `\\\\`), so nothing can start a forged line or hide in one."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        char if char.isprintable() and char != "\\" else char.encode("unicode_escape").decode()
        for char in text
    )


def log_field(text: str) -> str:
    """`text` as one unambiguous field of a log line: bare when it is a plain id, otherwise a
    JSON string (quoted, every quote, backslash, control and non-ASCII character escaped), so
    a value like `x caller=admin -> 2.01` cannot pass for more fields."""
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text)
