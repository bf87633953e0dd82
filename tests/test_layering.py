"""DESIGN.md's dependency direction, checked by walking the import statements of every module.

coap/ -> service/ -> (tokens/, keys.py, store/) -> (wire, errors, clock). Nothing below
coap/ imports aiocoap; coap/ reaches the layers below the service only through it; tokens/ and
keys.py import no storage and read no clock.
Imports inside functions and under TYPE_CHECKING count too.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coap_auth", "device_client")


@dataclass(frozen=True)
class Module:
    path: str  # relative to the project root, with forward slashes
    name: str  # dotted module name
    imports: frozenset[str]  # every dotted name imported, with its parent packages


@dataclass(frozen=True)
class Rule:
    description: str
    applies_to: Callable[[Module], bool]
    forbidden: tuple[str, ...]

    def broken_by(self, module: Module) -> list[str]:
        if not self.applies_to(module):
            return []
        return sorted(
            name
            for name in module.imports
            if any(name == f or name.startswith(f + ".") for f in self.forbidden)
        )


def _imported_names(tree: ast.AST, module_name: str, is_package: bool) -> frozenset[str]:
    package = module_name.split(".") if is_package else module_name.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # `from coap_auth import store` imports the module coap_auth.store.
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    # Importing a.b.c runs a and a.b as well; rules name packages, so keep every prefix.
    parts = [n.split(".") for n in names if n]
    return frozenset(".".join(p[: i + 1]) for p in parts for i in range(len(p)))


def parse_module(path: str, source: str) -> Module:
    parts = path.removesuffix(".py").split("/")
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    name = ".".join(parts)
    return Module(path, name, _imported_names(ast.parse(source, path), name, is_package))


def scan(root: Path = ROOT) -> list[Module]:
    modules = []
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            relative = file.relative_to(root).as_posix()
            modules.append(parse_module(relative, file.read_text(encoding="utf-8")))
    return modules


def _under(*prefixes: str) -> Callable[[Module], bool]:
    return lambda m: any(m.path == p or m.path.startswith(p) for p in prefixes)


def _in_coap_auth_except(*allowed: str) -> Callable[[Module], bool]:
    return lambda m: m.path.startswith("coap_auth/") and not _under(*allowed)(m)


PURE = ("coap_auth/tokens/", "coap_auth/keys.py")

RULES = (
    Rule(
        "only coap_auth/coap/, coap_auth/cli/, coap_auth/udp.py, coap_auth/echo.py and the "
        "transport half of coap_auth/secure/ may import aiocoap",
        lambda m: (
            _in_coap_auth_except(
                "coap_auth/coap/",
                "coap_auth/cli/",
                "coap_auth/udp.py",
                "coap_auth/echo.py",
                "coap_auth/secure/",
            )(m)
            or _under("coap_auth/secure/credentials.py", "coap_auth/secure/__init__.py")(m)
        ),
        ("aiocoap",),
    ),
    Rule(
        "secure/, shared with devices, imports no store, service, keys, settings or CLI",
        _under("coap_auth/secure/"),
        (
            "coap_auth.store",
            "coap_auth.service",
            "coap_auth.coap",
            "coap_auth.config",
            "coap_auth.cli",
            "coap_auth.keys",
        ),
    ),
    Rule(
        "coap/ reaches store, keys and tokens only through the service, and never the CLI "
        "(COAP_ALLOWED lists what else it may use)",
        _under("coap_auth/coap/"),
        ("coap_auth.store", "coap_auth.keys", "coap_auth.tokens", "coap_auth.cli"),
    ),
    Rule(
        "service/ uses only the pure credentials of secure/, never its transport half",
        _under("coap_auth/service/"),
        ("coap_auth.secure.contexts", "coap_auth.secure.edhoc", "coap_auth.secure.site"),
    ),
    Rule(
        "metrics.py, health.py, setting_limits.py are leaves: no store, service, keys, CoAP, CLI",
        _under("coap_auth/metrics.py", "coap_auth/health.py", "coap_auth/setting_limits.py"),
        (
            "coap_auth.store",
            "coap_auth.service",
            "coap_auth.coap",
            "coap_auth.cli",
            "coap_auth.keys",
            "aiocoap",
        ),
    ),
    Rule(
        "coap_auth never imports device_client (the device side builds on it, not the reverse)",
        _under("coap_auth/"),
        ("device_client",),
    ),
    Rule(
        "udp.py and echo.py, shared with devices, import no store, service, keys, settings or CLI",
        _under(
            "coap_auth/udp.py",
            "coap_auth/echo.py",
            "coap_auth/exchanges.py",
            "coap_auth/server_socket.py",
        ),
        (
            "coap_auth.store",
            "coap_auth.service",
            "coap_auth.coap",
            "coap_auth.config",
            "coap_auth.cli",
            "coap_auth.keys",
        ),
    ),
    Rule(
        "tokens/ and keys.py are pure: no storage, service, transport, clock or settings",
        _under(*PURE),
        (
            "coap_auth.store",
            "coap_auth.service",
            "coap_auth.coap",
            "coap_auth.clock",
            "coap_auth.config",
            "coap_auth.cli",
        ),
    ),
    Rule(
        "tokens/ and keys.py read no clock: time is passed in", _under(*PURE), ("time", "datetime")
    ),
    Rule(
        "service/ knows nothing of CoAP or the command line",
        _under("coap_auth/service/"),
        ("coap_auth.coap", "coap_auth.cli"),
    ),
    Rule(
        "store/ sits below the service and the transport",
        _under("coap_auth/store/"),
        ("coap_auth.service", "coap_auth.coap", "coap_auth.cli"),
    ),
    Rule(
        "cli/ calls the service (service.admin): only runtime.py and backup.py, which open, copy"
        " and restore the store, import coap_auth.store or coap_auth.keys",
        lambda m: (
            _under("coap_auth/cli/")(m)
            and not _under("coap_auth/cli/runtime.py", "coap_auth/cli/backup.py")(m)
        ),
        ("coap_auth.store", "coap_auth.keys"),
    ),
    Rule(
        "device_client/ imports only coap_auth.wire, errors, tokens, udp, addresses and secure",
        _under("device_client/"),
        (
            "coap_auth.store",
            "coap_auth.service",
            "coap_auth.coap",
            "coap_auth.clock",
            "coap_auth.config",
            "coap_auth.cli",
            "coap_auth.keys",
        ),
    ),
)


def violations(modules: Iterable[Module]) -> list[str]:
    return [
        f"{module.path} imports {name}: breaks rule '{rule.description}'"
        for module in modules
        for rule in RULES
        for name in rule.broken_by(module)
    ]


# -- the check on the real tree -----------------------------------------------------------------


def test_scan_finds_the_modules() -> None:
    modules = scan()
    paths = {m.path for m in modules}

    assert len(modules) > 10, paths
    for expected in (
        "coap_auth/service/core.py",
        "coap_auth/keys.py",
        "coap_auth/cli/__init__.py",
        "coap_auth/tokens/cwt.py",
        "coap_auth/store/sqlite.py",
        "coap_auth/coap/server.py",
    ):
        assert expected in paths
    # Sanity: the parser sees real imports, or an empty rule check would prove nothing.
    by_path = {m.path: m for m in modules}
    assert "aiocoap" in by_path["coap_auth/coap/server.py"].imports
    assert "coap_auth.service" in by_path["coap_auth/coap/server.py"].imports


def test_dependency_direction() -> None:
    broken = violations(scan())
    assert not broken, "layering broken:\n" + "\n".join(broken)


# -- the checker itself catches what it should --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("coap_auth/service/core.py", "import aiocoap\n", "aiocoap"),
        ("coap_auth/store/sqlite.py", "from aiocoap import resource\n", "aiocoap.resource"),
        ("coap_auth/tokens/cwt.py", "import time\n", "time"),
        ("coap_auth/tokens/cwt.py", "from datetime import datetime\n", "datetime"),
        (
            "coap_auth/keys.py",
            "def f():\n    from coap_auth.clock import SystemClock\n",
            "coap_auth.clock",
        ),
        ("coap_auth/keys.py", "from coap_auth import store\n", "coap_auth.store"),
        ("coap_auth/tokens/jwt.py", "from ..config import Settings\n", "coap_auth.config"),
        ("coap_auth/tokens/__init__.py", "from .. import service\n", "coap_auth.service"),
        (
            "coap_auth/service/rollover.py",
            "from coap_auth.coap.server import Server\n",
            "coap_auth.coap.server",
        ),
        ("coap_auth/service/core.py", "from ..cli import main\n", "coap_auth.cli"),
        ("coap_auth/cli/registry.py", "from ..store.records import Client\n", "coap_auth.store"),
        ("coap_auth/store/base.py", "from ..service import AuthService\n", "coap_auth.service"),
        (
            "coap_auth/store/__init__.py",
            "import coap_auth.coap.resources\n",
            "coap_auth.coap.resources",
        ),
        ("device_client/client.py", "from coap_auth.store import SqliteStore\n", "coap_auth.store"),
        (
            "coap_auth/coap/server.py",
            "from coap_auth.store import ChangeCounters\n",
            "coap_auth.store",
        ),
        ("coap_auth/coap/resources.py", "from ..keys import cose_key_set\n", "coap_auth.keys"),
        ("coap_auth/coap/messages.py", "from coap_auth.tokens import Claims\n", "coap_auth.tokens"),
        (
            "coap_auth/coap/endpoint.py",
            "def f():\n    import coap_auth.cli.serve\n",
            "coap_auth.cli.serve",
        ),
    ],
)
def test_checker_reports_file_and_rule(path: str, source: str, expected: str) -> None:
    broken = violations([parse_module(path, source)])

    assert broken, f"{path}: {source!r} was not caught"
    assert any(line.startswith(f"{path} imports {expected}:") for line in broken), broken
    assert all("breaks rule" in line for line in broken)


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("coap_auth/coap/server.py", "import aiocoap\nfrom coap_auth.service import AuthService\n"),
        (
            "coap_auth/coap/messages.py",
            "from coap_auth.service import Claims\nfrom ..wire import AceParam\n"
            "from .. import errors\n",
        ),
        (
            "coap_auth/cli/__init__.py",
            "import aiocoap\nfrom coap_auth.coap.server import Server\n",
        ),
        ("coap_auth/tokens/cwt.py", "from .cose import x\nfrom coap_auth.wire import CoseAlg\n"),
        ("coap_auth/keys.py", "from coap_auth.tokens.cose_key import PrivateKey\nimport secrets\n"),
        (
            "coap_auth/service/core.py",
            "from coap_auth.store import Store\nfrom ..keys import KeyRing\n",
        ),
        ("coap_auth/store/sqlite.py", "from coap_auth.keys import SigningKey\n"),
        ("coap_auth/tokens/claims.py", "import timeit\nimport datetimes\n"),  # prefixes, not names
        ("device_client/client.py", "import aiocoap\nfrom coap_auth.tokens import verify_cwt\n"),
    ],
)
def test_checker_allows_the_intended_direction(path: str, source: str) -> None:
    assert violations([parse_module(path, source)]) == []


# -- coap/: an allowlist, not only a denylist ---------------------------------------------------

# Besides the service (its use cases and rate_limit), wire and errors, coap/ uses only what sits
# beside it in the transport and the process, never a business layer:
COAP_ALLOWED = (
    "coap_auth.service",
    "coap_auth.wire",
    "coap_auth.errors",
    "coap_auth.coap",  # itself
    "coap_auth.udp",  # UDP transport shared with devices: contexts, drop logs, error messages
    "coap_auth.echo",  # RFC 9175 Echo: amplification bound of unverified addresses
    "coap_auth.addresses",  # the one per-address key of rate limits and observer quotas
    "coap_auth.secure",  # EDHOC and OSCORE: the channel coap/ serves (DESIGN.md)
    "coap_auth.clock",  # the Clock type the service passes down; no clock is read here
    "coap_auth.config",  # settings the server is built from (trusted networks)
    "coap_auth.metrics",  # counters each request moves
    "coap_auth.health",  # /healthz and /metrics beside the CoAP server
    "coap_auth.text",  # log hygiene: what of a request's text may be logged
    "coap_auth.untagged",  # untrusted CBOR read without cbor2's tag decoders
)


def allowlist_violations(
    modules: Iterable[Module], under: str, allowed: Iterable[str]
) -> list[str]:
    """Every coap_auth name a module under `under` imports that is not in `allowed` (or the bare
    package those live in), so a new module is kept out by default."""
    allowed = tuple(allowed)
    return [
        f"{module.path} imports {name}"
        for module in modules
        if module.path.startswith(under)
        for name in sorted(module.imports)
        if name.startswith("coap_auth.")
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    ]


def test_coap_imports_only_the_service_and_transport_modules() -> None:
    modules = [m for m in scan() if m.path.startswith("coap_auth/coap/")]
    assert "coap_auth/coap/resources.py" in {m.path for m in modules}
    assert "coap_auth.service" in {n for m in modules for n in m.imports}  # the scan sees them
    assert allowlist_violations(modules, "coap_auth/coap/", COAP_ALLOWED) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from coap_auth.store import ChangeCounters\n", "coap_auth.store"),
        ("from coap_auth.keys import jwks\n", "coap_auth.keys"),
        ("from coap_auth.tokens import Claims\n", "coap_auth.tokens"),
        ("from coap_auth.cli import main\n", "coap_auth.cli"),
        ("from coap_auth.audit_log import x\n", "coap_auth.audit_log"),  # any new module too
    ],
)
def test_coap_allowlist_catches(source: str, expected: str) -> None:
    broken = allowlist_violations(
        [parse_module("coap_auth/coap/server.py", source)], "coap_auth/coap/", COAP_ALLOWED
    )
    assert f"coap_auth/coap/server.py imports {expected}" in broken, broken


# -- device_client: an allowlist, not only a denylist -------------------------------------------

DEVICE_ALLOWED = (
    "coap_auth.wire",
    "coap_auth.errors",
    "coap_auth.tokens",
    "coap_auth.udp",
    "coap_auth.echo",
    "coap_auth.exchanges",
    "coap_auth.secure",
    "coap_auth.addresses",
    "coap_auth.untagged",
)


def device_client_violations(modules: Iterable[Module]) -> list[str]:
    """Every coap_auth name a device_client module imports must be wire, errors, tokens, udp,
    addresses, untagged or secure (or the bare package those live in), so a new service module
    is kept out by default."""
    return allowlist_violations(modules, "device_client/", DEVICE_ALLOWED)


def test_device_client_imports_only_the_pure_parts_of_coap_auth() -> None:
    modules = [m for m in scan() if m.path.startswith("device_client/")]
    paths = {m.path for m in modules}
    for expected in ("device_client/client.py", "device_client/watch.py", "device_client/rs.py"):
        assert expected in paths
    assert "coap_auth.tokens" in {n for m in modules for n in m.imports}  # the scan sees them
    assert device_client_violations(modules) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from coap_auth.service import AuthService\n", "coap_auth.service"),
        ("from coap_auth.service.core import AuthService\n", "coap_auth.service.core"),
        ("import coap_auth.keys\n", "coap_auth.keys"),
        ("from coap_auth import config\n", "coap_auth.config"),
        ("from coap_auth.cli.registry import x\n", "coap_auth.cli.registry"),
        ("from coap_auth.coap.server import Server\n", "coap_auth.coap.server"),
        ("def f():\n    from coap_auth.store.sqlite import SqliteStore\n", "coap_auth.store"),
        ("from coap_auth.clock import SettableClock\n", "coap_auth.clock"),
        ("from coap_auth.audit_log import x\n", "coap_auth.audit_log"),  # any new module too
    ],
)
def test_device_client_allowlist_catches(source: str, expected: str) -> None:
    broken = device_client_violations([parse_module("device_client/watch.py", source)])
    assert f"device_client/watch.py imports {expected}" in broken, broken


def test_device_client_allowlist_allows() -> None:
    source = (
        "import aiocoap\nimport cbor2\nfrom coap_auth.wire import AceParam\n"
        "from coap_auth.errors import TokenError\nfrom coap_auth.tokens.cwt import verify_cwt\n"
        "from coap_auth import tokens\n"
    )
    assert device_client_violations([parse_module("device_client/x.py", source)]) == []
