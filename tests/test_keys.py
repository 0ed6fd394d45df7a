"""Keys and canonical JSON: pure, no database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from agent_ledger import InvalidArguments, compute_key, payload_hash
from agent_ledger._keys import canonical, diff_fields, normalise


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Item:
    sku: str
    qty: int


class Order(BaseModel):
    id: uuid.UUID
    total: Decimal


def test_normaliser_maps_the_documented_types() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    value = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2026, 1, 2),
        "id": u,
        "price": Decimal("10.50"),
        "color": Color.RED,
        "blob": b"\x00\xff",
        "tags": {"b", "a", "c"},
        "pair": (1, 2),
        "item": Item("x", 2),
        "order": Order(id=u, total=Decimal("3.5")),
        "big": 2**60,
    }
    assert normalise(value) == {
        "when": "2026-01-02T01:04:05Z",
        "day": "2026-01-02",
        "id": str(u),
        "price": "10.50",
        "color": "red",
        "blob": {"$bytes": "AP8="},
        "tags": ["a", "b", "c"],
        "pair": [1, 2],
        "item": {"sku": "x", "qty": 2},
        "order": {"id": str(u), "total": "3.5"},
        "big": {"$int": str(2**60)},
    }


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ({"a": float("nan")}, "args.a", "NaN"),
        ({"a": [float("-inf")]}, "args.a[0]", "infinities"),
        ({"a": {2: 1}}, "args.a", "dict keys must be strings"),
        ({"a": object()}, "args.a", "builtins.object"),
        ({"a": dt.datetime(2026, 1, 1)}, "args.a", "naive datetime"),
        ({"a": Decimal("NaN")}, "args.a", "no JSON form"),
    ],
)
def test_normaliser_refuses_with_the_path(value: Any, path: str, words: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        normalise(value)
    assert info.value.path == path and path in str(info.value) and words in str(info.value)


def test_key_is_versioned_sha256() -> None:
    key = compute_key("wf", "tool", {"a": 1})
    assert key.startswith("v1:") and len(key) == 3 + 64
    assert key == compute_key("wf", "tool", {"a": 1.0})  # RFC 8785: 1.0 is 1
    assert key != compute_key("wf2", "tool", {"a": 1})
    assert key != compute_key("wf", "tool2", {"a": 1})
    assert key != compute_key("wf", "tool", {"a": "1"})
    assert payload_hash("tool", {"a": 1}) != payload_hash("tool", {"a": 2})


def test_diff_fields_names_changed_added_and_removed() -> None:
    assert diff_fields({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == ["b", "c", "d"]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.randoms())
def test_key_ignores_dict_order(args: dict[str, Any], rnd: Any) -> None:
    items = list(args.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert compute_key("wf", "t", normalise(shuffled)) == compute_key("wf", "t", normalise(args))


@given(json_values)
def test_canonical_json_is_stable_under_normalisation(value: Any) -> None:
    once = normalise(value)
    assert canonical(normalise(once)) == canonical(once)


@given(st.sets(st.integers(-1000, 1000) | st.text(max_size=4), max_size=8))
def test_sets_key_the_same_in_any_order(items: set[Any]) -> None:
    assert canonical(normalise(items)) == canonical(normalise(set(reversed(list(items)))))


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.text(max_size=10), st.text(max_size=10))
def test_envelope_from_canonical_bytes_is_the_same_key(args: dict[str, Any], workflow: str, tool: str) -> None:
    from agent_ledger._keys import key_from_canonical, payload_from_canonical

    norm = normalise(args)
    assert key_from_canonical(workflow, tool, canonical(norm)) == compute_key(workflow, tool, norm)
    assert payload_from_canonical(tool, canonical(norm)) == payload_hash(tool, norm)


unicode_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)


@given(unicode_values)
def test_fast_canonical_encoding_is_rfc8785(value: Any) -> None:
    import rfc8785

    try:
        expected = rfc8785.dumps(value)
    except Exception:
        return  # values rfc8785 refuses are not produced by normalise()
    assert canonical(value) == expected
