"""Core deterministic CBOR (RFC 8949 §4.2.1): the encoder against the RFC's own examples, and
the check that refuses every other form of the same data."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest

from coap_auth.errors import MalformedToken
from coap_auth.tokens import deterministic
from tests.conftest import VECTORS

DOCUMENT = json.loads((VECTORS / "rfc8949_deterministic.json").read_text())
ENCODED = DOCUMENT["vectors"]
NOT_DETERMINISTIC = DOCUMENT["not_deterministic"]


def _key(encoded_hex: str) -> Any:
    key = cbor2.loads(bytes.fromhex(encoded_hex))
    return tuple(key) if isinstance(key, list) else key  # a list cannot be a dict key


@pytest.mark.parametrize("vector", ENCODED, ids=[v["title"] for v in ENCODED])
def test_rfc8949_example_encodes_and_checks(vector: dict[str, Any]) -> None:
    encoded = bytes.fromhex(vector["hex"])
    assert deterministic.dumps(vector["value"]) == encoded
    assert deterministic.loads(encoded, "item") == vector["value"]


@pytest.mark.parametrize("vector", NOT_DETERMINISTIC, ids=[v["title"] for v in NOT_DETERMINISTIC])
def test_other_forms_are_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(MalformedToken, match="^item is not"):
        deterministic.loads(bytes.fromhex(vector["hex"]), "item")


def test_map_keys_sort_bytewise_not_length_first() -> None:
    """RFC 8949 §4.2.1's example keys, given in reverse: they come out in its order, which
    is not cbor2's `canonical=True` order (RFC 7049 §3.9, length first)."""
    order = DOCUMENT["map_key_order"]["keys_in_order_hex"]
    keys = [_key(k) for k in order]
    value = {key: i for i, key in enumerate(reversed(keys))}
    encoded = deterministic.dumps(value)

    expected = bytes([0xA0 | len(keys)]) + b"".join(
        bytes.fromhex(k) + cbor2.dumps(len(keys) - 1 - i) for i, k in enumerate(order)
    )
    assert encoded == expected
    assert deterministic.loads(encoded, "map") == value

    length_first = cbor2.dumps(value, canonical=True)
    assert length_first != encoded  # if cbor2 changes its order, this test says so
    assert sorted(length_first) == sorted(encoded)  # the same entries, in another order
    with pytest.raises(MalformedToken, match="deterministic"):
        deterministic.loads(length_first, "map")


def test_two_keys_where_the_orders_differ() -> None:
    """24 (0x18 0x18) before -1 (0x20) bytewise; length-first puts -1 first."""
    value = {-1: "b", 24: "a"}
    assert deterministic.dumps(value) == bytes.fromhex("a2 1818 6161 20 6162")
    assert cbor2.dumps(value, canonical=True) == bytes.fromhex("a2 20 6162 1818 6161")


def test_nested_maps_are_sorted_too() -> None:
    value = {"b": {3: 1, 1: 2}, "a": [{"y": 0, "x": 0}]}
    encoded = deterministic.dumps(value)
    expected = "a2 6161 81 a2 6178 00 6179 00 6162 a2 0102 0301"
    assert encoded == bytes.fromhex(expected)
    assert deterministic.loads(encoded, "map") == value


def test_nan_has_one_form() -> None:
    assert deterministic.dumps(float("nan")) == bytes.fromhex("f97e00")


@pytest.mark.parametrize(
    "value",
    [set(), cbor2.undefined, cbor2.CBORSimpleValue(16), object()],
    # Not ids=repr: an object()'s repr holds its address, which differs between pytest-xdist's
    # workers, and they must all collect the same tests.
    ids=["set()", "undefined", "CBORSimpleValue(value=16)", "object()"],
)
def test_values_a_token_never_holds_are_not_encoded(value: Any) -> None:
    with pytest.raises(TypeError):
        deterministic.dumps(value)


def test_deep_nesting_is_refused_not_crashing() -> None:
    deep = b"\x81" * 5000 + b"\x00"
    with pytest.raises(MalformedToken):
        deterministic.loads(deep, "item")
