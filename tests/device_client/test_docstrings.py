"""Every public name of device_client (its `__all__`) and every public method of its classes has
a docstring, and each callable's says what it raises ("Raises nothing" where nothing), as
issue 15 asks; and the errors raised on the way to a host name it."""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Iterator

import pytest

import device_client

# "Raises X ...", "... or raises X", "Raises nothing".
SAYS_RAISES = re.compile(r"\b[Rr]aises?\b")
# Exports that are no class or function of their own: the alias of SecretCredentials |
# DeviceKey (both checked).
NOT_CALLABLE = {"Credentials"}


def _exports() -> Iterator[tuple[str, object]]:
    for name in device_client.__all__:
        if name not in NOT_CALLABLE:
            yield name, getattr(device_client, name)


def _is_error(member: object) -> bool:
    return isinstance(member, type) and issubclass(member, BaseException)


def _is_protocol(member: object) -> bool:
    return bool(getattr(member, "_is_protocol", False))


def _public_members() -> Iterator[tuple[str, object]]:
    """(Class.name, raw attribute) of every public method and property of the exported
    classes that device_client or coap_auth defines (not what aiocoap or object give them)."""
    for name, cls in _exports():
        if not isinstance(cls, type) or _is_error(cls):
            continue
        for attr in dir(cls):
            if attr.startswith("_"):
                continue
            owner = next((k for k in cls.__mro__ if attr in vars(k)), None)
            if owner is None or not owner.__module__.startswith(("device_client", "coap_auth")):
                continue
            raw = vars(owner)[attr]
            if isinstance(raw, types.FunctionType | classmethod | staticmethod | property):
                yield f"{name}.{attr}", raw


def _doc(raw: object) -> str:
    if isinstance(raw, classmethod | staticmethod):
        raw = raw.__func__
    return inspect.cleandoc(getattr(raw, "__doc__", None) or "")


def test_the_alias_is_what_it_says() -> None:
    assert NOT_CALLABLE <= set(device_client.__all__)
    assert set(device_client.Credentials.__args__) == {
        device_client.SecretCredentials,
        device_client.DeviceKey,
    }


@pytest.mark.parametrize("name", device_client.__all__)
def test_every_export_has_its_own_docstring(name: str) -> None:
    if name in NOT_CALLABLE:
        return
    member = getattr(device_client, name)
    # Its own: a class's __doc__ is never inherited, a function's is its own.
    assert (member.__doc__ or "").strip(), f"{name} has no docstring"


def test_callable_exports_say_what_they_raise() -> None:
    # Exceptions are what is raised; a Protocol's methods say it for every implementation.
    silent = [
        name
        for name, member in _exports()
        if not _is_error(member)
        and not _is_protocol(member)
        and not SAYS_RAISES.search(_doc(member))
    ]
    assert not silent, f"docstrings that do not say what they raise: {silent}"


def test_public_methods_have_docstrings_that_say_what_they_raise() -> None:
    members = dict(_public_members())
    assert "TokenClient.token" in members and "ResourceServer.accept" in members  # the walk works
    undocumented = sorted(name for name, raw in members.items() if not _doc(raw))
    assert not undocumented, f"public methods without a docstring: {undocumented}"
    # A property is read like an attribute: a docstring, and "Raises" only where it can.
    silent = sorted(
        name
        for name, raw in members.items()
        if not isinstance(raw, property) and not SAYS_RAISES.search(_doc(raw))
    )
    assert not silent, f"methods whose docstrings do not say what they raise: {silent}"


@pytest.mark.parametrize(
    "error",
    [
        device_client.ServiceUnreachable,
        device_client.TokenRequestRefused,
        device_client.ChannelRefused,
        device_client.ResourceRefused,
        device_client.ResourceUnreachable,
    ],
)
def test_errors_on_the_way_to_a_host_carry_it(error: type[Exception]) -> None:
    # Keyword-only and required: no raise site can leave the host out.
    parameter = inspect.signature(error).parameters.get("host")
    assert parameter is not None, f"{error.__name__} does not take the host"
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert parameter.default is inspect.Parameter.empty
