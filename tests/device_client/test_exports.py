"""The public API of device_client is what __all__ says (httpx's test_exported_members), and
importing it pulls in nothing of the service (no store, no database driver)."""

from __future__ import annotations

import subprocess
import sys

import device_client


def test_all_lists_every_public_name_exactly_once() -> None:
    public = {
        name
        for name, value in vars(device_client).items()
        if not name.startswith("_") and not isinstance(value, type(sys))
    }
    assert sorted(device_client.__all__) == device_client.__all__, "keep __all__ sorted"
    assert len(set(device_client.__all__)) == len(device_client.__all__)
    assert set(device_client.__all__) == public


def test_every_export_is_defined_where_it_is_documented() -> None:
    for name in device_client.__all__:
        member = getattr(device_client, name)
        if name == "Credentials":  # a type alias: SecretCredentials | DeviceKey
            assert set(member.__args__) == {
                device_client.SecretCredentials,
                device_client.DeviceKey,
            }
            continue
        module = member.__module__
        assert module.startswith(
            (
                "device_client.",
                "coap_auth.errors",
                "coap_auth.udp",
                "coap_auth.secure.credentials",
                "typing",
            )
        ), (name, module)
        if module.startswith("device_client."):
            assert member.__doc__, f"{name} has no docstring"


def test_import_needs_only_the_pure_parts_of_coap_auth() -> None:
    probe = (
        "import sys, device_client\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('coap_auth')"
        " or m in ('sqlite3', 'aiosqlite', 'asyncpg'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(result.stdout.split())
    assert "coap_auth.tokens" in loaded  # the probe does see coap_auth modules
    # udp: the fixed UDP transport both sides use (and the Clock protocol it takes);
    # secure.credentials: EDHOC credentials, pure (EDHOC itself loads with a channel's first
    # handshake); addresses: a source address as a budget key, the standard library only;
    # echo: Echo values and the amplification guard (RFC 9175), both sides; server_socket:
    # how udp binds a server socket (SO_REUSEPORT only when asked), the standard library only;
    # untagged: untrusted CBOR read without cbor2's tag decoders, cbor2 only.
    allowed = {
        "coap_auth.untagged",
        "coap_auth.server_socket",
        "coap_auth.echo",
        "coap_auth.exchanges",
        "coap_auth.addresses",
        "coap_auth",
        "coap_auth.wire",
        "coap_auth.errors",
        "coap_auth.udp",
        "coap_auth.clock",
        "coap_auth.secure",
        "coap_auth.secure.credentials",
    }
    unexpected = {m for m in loaded if m not in allowed and not m.startswith("coap_auth.tokens")}
    assert not unexpected, unexpected
