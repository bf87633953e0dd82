"""The documentation holds to the code: docs/configuration.md to config.py's settings, defaults
and ranges; docs/protocol.md to coap_auth.wire's numbers and the limits the service enforces;
every README link into docs/ resolves.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import pytest

from coap_auth import echo, exchanges
from coap_auth.coap import blockwise, messages, observers
from coap_auth.config import ENV_PREFIX, LIMITS, NOT_SETTINGS, Settings, load_settings
from coap_auth.errors import OperatorError, ServiceUnavailable
from coap_auth.secure import contexts, credentials, edhoc, site
from coap_auth.service import grants, minting, rollover
from coap_auth.wire import (
    CLIENT_ASSERTION,
    TOKEN_FORMAT,
    AceErrorCode,
    AceParam,
    CoapCode,
    ContentFormat,
    TrlErrorId,
    TrlParam,
)
from device_client import rs_common

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
PROTOCOL = ROOT / "docs" / "protocol.md"


def table_rows(text: str) -> list[list[str]]:
    """The body rows of every Markdown table in `text` (the row above a |---| line is a
    header), as stripped cells."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            rows.pop()  # the header
        elif line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def section(text: str, heading: str) -> str:
    """From the heading line that starts with `heading` to the next heading of its level."""
    level = heading.split(" ")[0]
    start = text.index("\n" + heading) + 1
    following = re.search(rf"^{level} ", text[start + len(heading) :], re.MULTILINE)
    return text[start : start + len(heading) + following.start()] if following else text[start:]


def section_table(text: str, heading: str) -> list[list[str]]:
    return table_rows(section(text, heading))


def flat(text: str) -> str:
    """The text with every run of white space as one space (sentences wrap)."""
    return re.sub(r"\s+", " ", text)


def unquote(cell: str) -> str:
    return cell.removeprefix("`").removesuffix("`")


def dotted(code: int) -> str:
    return f"{code >> 5}.{code & 31:02d}"


# -- docs/configuration.md ----------------------------------------------------------------------


def settings_rows() -> dict[str, list[str]]:
    rows = [row for row in table_rows(CONFIGURATION.read_text()) if row[0].startswith("`")]
    by_name = {unquote(row[0]): row for row in rows}
    assert len(by_name) == len(rows), "a setting documented twice"
    return by_name


def test_every_setting_is_documented_and_nothing_else() -> None:
    assert sorted(settings_rows()) == sorted(f.name for f in fields(Settings))


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_documented_default_range_unit_and_environment(name: str) -> None:
    _, environment, default, allowed, unit, meaning = settings_rows()[name]
    limit = LIMITS[name]

    assert environment == f"`{ENV_PREFIX}{name.upper()}`"
    documented = tomllib.loads(f"value = {unquote(default)}")["value"]
    expected = getattr(Settings(), name)
    assert documented == (str(expected) if isinstance(expected, Path) else expected)
    # A path is documented as text, and so is a choice (a StrEnum, e.g. log_format).
    assert type(documented) is type(expected) or isinstance(expected, Path | StrEnum)
    assert allowed == limit.text
    assert unit == limit.unit
    assert meaning


def test_the_example_file_loads(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", CONFIGURATION.read_text(), re.DOTALL)
    assert example is not None
    path = tmp_path / "coap-auth.toml"
    path.write_text(example.group(1))

    settings = load_settings(path, env={})

    assert settings.log_format == "json"
    assert settings.refresh_grace == 45


@pytest.mark.parametrize(
    ("values", "document"),
    [
        ({"port": 99999}, CONFIGURATION),
        ({"refresh_grace": -3}, CONFIGURATION),
        ({"port": 99999}, README),
        ({"refresh_grace": -3}, README),
    ],
)
def test_quoted_error_lines_are_what_the_command_says(
    values: dict[str, Any], document: Path
) -> None:
    with pytest.raises(OperatorError) as raised:
        load_settings(env={}, flags=values)
    assert f"coap-auth: error: {raised.value.description}\n" in document.read_text()


def test_the_names_that_are_not_settings_are_documented() -> None:
    for text in (CONFIGURATION.read_text(), README.read_text()):
        for name in NOT_SETTINGS:
            assert f"`{name}`" in text


# -- docs/protocol.md: the tables agree with coap_auth.wire -------------------------------------


def protocol() -> str:
    return PROTOCOL.read_text()


def test_content_formats() -> None:
    rows = section_table(protocol(), "## Content formats")
    ids = [int(row[1]) for row in rows]
    assert sorted(ids) == sorted(int(f) for f in ContentFormat)


# Answered under aiocoap's own names (aiocoap.CHANGED, aiocoap.CONTINUE), not wire.CoapCode's.
AIOCOAP_CODES = {"2.04", "2.31"}


def test_response_codes() -> None:
    rows = section_table(protocol(), "## Response codes")
    documented = [row[0] for row in rows]
    assert len(documented) == len(set(documented))
    assert set(documented) == {dotted(c) for c in CoapCode} | AIOCOAP_CODES


def enum_table(rows: list[list[str]], enum: type[IntEnum]) -> None:
    documented = {row[0].replace(" ", "_").lower(): int(row[1]) for row in rows}
    assert documented == {member.name.lower(): int(member) for member in enum}


def test_ace_parameters() -> None:
    enum_table(section_table(protocol(), "## ACE parameters"), AceParam)
    assert f'`"{CLIENT_ASSERTION}"`' in protocol()
    assert f'`"{TOKEN_FORMAT}"`' in protocol()


def test_ace_error_codes() -> None:
    rows = section_table(protocol(), "### Errors of `/token`")
    enum_table(rows, AceErrorCode)


def test_trl_error_ids_and_parameters() -> None:
    rows = section_table(protocol(), "### `/revoke/trl`")
    documented = {int(row[0]): row[1].replace(" ", "_").upper() for row in rows}
    assert documented == {int(member): member.name for member in TrlErrorId}
    parameters = ", ".join(f"{member.name.lower()} {int(member)}" for member in TrlParam)
    assert f"({'RFC 9770 §12'}): {parameters}." in flat(protocol())


def test_every_resource_of_the_service_is_listed() -> None:
    from coap_auth.coap.resources import KeysResource, TokenResource, WellKnownCore
    from coap_auth.coap.revocation import IntrospectResource, RevokeResource, TrlResource

    rows = section_table(protocol(), "## Resources of the authorization server")
    paths = {unquote(row[0]) for row in rows}
    resources = (TokenResource, IntrospectResource, RevokeResource, TrlResource, KeysResource)
    assert paths == {r.path for r in (*resources, WellKnownCore)} | {"/.well-known/edhoc"}


# -- docs/protocol.md: the numbers the service enforces -----------------------------------------


FIXED_NUMBERS = [
    f"at most {messages.MAX_TEXT} characters",
    f"nests at most {messages.MAX_DEPTH} levels deep",
    f"when an address already has {blockwise.MAX_UPLOADS_PER_ADDRESS} uploads in flight",
    f"more than {blockwise.MAX_UPLOAD_OPTIONS} bytes of options",
    f"dropped {blockwise.UPLOAD_LIFETIME} s (MAX_TRANSMIT_WAIT)",
    f"at most {blockwise.MAX_UPLOADS:,} are held in all",
    f"5.03 with Max-Age {ServiceUnavailable.retry_after}",
    f"at most {exchanges.MAX_REMEMBERED_PER_SOURCE:,} exchanges per source address and "
    f"{exchanges.MAX_REMEMBERED_EXCHANGES:,} in all",
    f"The Echo value is {echo.ECHO_VALUE_BYTES} bytes: a {echo.TIMESTAMP_BYTES}-byte timestamp "
    f"and {echo.MAC_BYTES} bytes of HMAC-SHA-256",
    f"It is good for {echo.ECHO_VALUE_LIFETIME} s",
    f"{echo.MAX_VERIFIED_PER_PREFIX} per IPv6 /64",
    f"at most {echo.AMPLIFICATION_FACTOR} times the request",
    f"is at most {rollover.MAX_KEYS_MAX_AGE:,} s",
    f"Opaque, {grants.REFRESH_TOKEN_BYTES} random bytes",
    f"cti 7 (bstr, {minting.CTI_BYTES} random bytes)",
    f"{contexts.MASTER_SECRET_BYTES}-byte master secret, {contexts.MASTER_SALT_BYTES}-byte salt, "
    f"sender and recipient ids up to {contexts.MAX_ID_BYTES} bytes, "
    f"replay window {contexts.REPLAY_WINDOW}",
    f"when it is at most {credentials.MAX_KID_BYTES} bytes",
    f"at most {credentials.MAX_CCS_BYTES} bytes",
    f"Method {credentials.EDHOC_METHOD} ",
    f"cipher suite {credentials.EDHOC_SUITE} ",
    f"at most {edhoc.MAX_EAD_ITEMS} EAD items",
    f"CIPHERTEXT_3 is under {edhoc.MAX_CIPHERTEXT_3_BYTES} bytes",
    f"a Partial IV over {site.MAX_PIV_BYTES} bytes",
    "at most once a minute each",  # observers.PROBE_INTERVAL, below
    f"largest token it takes, {rs_common.MAX_TOKEN_BYTES:,} bytes by default",
]


@pytest.mark.parametrize("phrase", FIXED_NUMBERS)
def test_fixed_numbers(phrase: str) -> None:
    assert phrase in flat(protocol())


def test_probe_interval_is_a_minute() -> None:
    assert observers.PROBE_INTERVAL == 60  # "at most once a minute each"


def test_every_quoted_setting_default_is_the_default() -> None:
    quoted = re.findall(r"`(\w+)`,? \(?default ([\d,.]+|`[^`]*`)", flat(protocol()))
    assert len(quoted) > 25
    defaults = Settings()
    for name, value in quoted:
        expected = getattr(defaults, name)
        shown = value.strip("`").rstrip(",.")
        forms = {str(expected), str(expected).lower()}
        if isinstance(expected, int | float) and not isinstance(expected, bool):
            forms.add(f"{expected:,}")
        assert shown in forms, (name, value, expected)


# -- links ---------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)}


LINK = re.compile(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#([\w-]+))?\)")


@pytest.mark.parametrize("document", [README, CONFIGURATION, PROTOCOL], ids=lambda p: p.name)
def test_links_resolve(document: Path) -> None:
    links = LINK.findall(document.read_text())
    if document == README:
        assert {target for target, _ in links} >= {"docs/protocol.md", "docs/configuration.md"}
    for target, anchor in links:
        path = (document.parent / target).resolve()
        assert path.is_file(), target
        if anchor:
            assert anchor in anchors(path), (target, anchor)


def test_readme_points_at_no_contract_outside_the_repository() -> None:
    assert "PROTOCOL.md" not in README.read_text()
    assert "../shared" not in README.read_text()
