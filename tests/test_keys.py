"""Keys and canonical JSON: pure, no database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given
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


# Strings every backend can store: no NUL, no lone surrogates (normalise refuses those).
storable = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(storable, max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(storable, max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(storable, max_size=6), json_values, max_size=6), st.randoms())
def test_key_ignores_dict_order(args: dict[str, Any], rnd: Any) -> None:
    items = list(args.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert compute_key("wf", "t", normalise(shuffled)) == compute_key("wf", "t", normalise(args))


@given(json_values)
def test_canonical_json_is_stable_under_normalisation(value: Any) -> None:
    once = normalise(value)
    # Tagged forms ({"$int": ...}) are not plain JSON input: normalising them again escapes their keys.
    assume(b'"$' not in canonical(once))
    assert canonical(normalise(once)) == canonical(once)


@given(st.sets(st.integers(-1000, 1000) | st.text(storable, max_size=4), max_size=8))
def test_sets_key_the_same_in_any_order(items: set[Any]) -> None:
    assert canonical(normalise(items)) == canonical(normalise(set(reversed(list(items)))))


@given(
    st.dictionaries(st.text(storable, max_size=6), json_values, max_size=6), st.text(max_size=10), st.text(max_size=10)
)
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


# -- hostile arguments and the tagged forms (issue 11) ---------------------------------------------------


def _nested(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"n": 10**5000}, "more than 13000 bits"),
        ({"n": -(10**5000)}, "more than 13000 bits"),
        ({"deep": _nested(10_000, "list")}, "nests more than 100 levels"),
        ({"deep": _nested(10_000, "dict")}, "nests more than 100 levels"),
        ({"a": {"\ud800": 1}}, "lone surrogate"),
        ({"\udfff": 1}, "lone surrogate"),
        ({"a": ["x\ud800"]}, "lone surrogate"),
        ({"a": "x\x00"}, "NUL"),
        ({"a\x00": 1}, "NUL"),
    ],
    ids=[
        "big-int",
        "big-negative-int",
        "deep-list",
        "deep-dict",
        "surrogate-key",
        "surrogate-top-key",
        "surrogate-value",
        "nul-value",
        "nul-key",
    ],
)
def test_hostile_arguments_raise_invalid_arguments(value: Any, words: str) -> None:
    with pytest.raises(InvalidArguments, match=words):
        normalise(value)


def test_limits_are_not_off_by_much() -> None:
    assert normalise({"n": 10**3900}) == {"n": {"$int": str(10**3900)}}
    assert normalise({"deep": _nested(99, "list")})  # 100 levels with the top-level dict
    with pytest.raises(InvalidArguments):
        normalise({"deep": _nested(100, "list")})


def test_self_referencing_model_is_invalid_arguments() -> None:
    @dataclasses.dataclass
    class Node:
        child: Any = None

    node = Node()
    node.child = node
    with pytest.raises(InvalidArguments):
        normalise({"node": node})


@pytest.mark.parametrize(
    ("literal", "tagged"),
    [
        ({"$bytes": "AAA="}, b"\x00\x00"),
        ({"$int": str(2**60)}, 2**60),
        ({"$$bytes": "AAA="}, {"$bytes": "AAA="}),
    ],
)
def test_literal_dicts_never_share_a_key_with_tagged_values(literal: Any, tagged: Any) -> None:
    assert canonical(normalise({"v": literal})) != canonical(normalise({"v": tagged}))
    assert compute_key("w", "t", normalise({"v": literal})) != compute_key("w", "t", normalise({"v": tagged}))


def test_escaping_vectors() -> None:
    """Only tag names and keys starting with ``$$`` are escaped: ``{"$gt": 5}`` keys as before."""
    assert normalise({"$bytes": "x", "$int": "1", "$redacted": "r", "$$a": 1, "$gt": 5, "a$": 2}) == {
        "$$bytes": "x",
        "$$int": "1",
        "$$redacted": "r",
        "$$$a": 1,
        "$gt": 5,
        "a$": 2,
    }
    # Keys of arguments without such names are unchanged by the escaping (same bytes as before).
    assert compute_key("w", "t", normalise({"q": {"$gt": 5}})) == (
        "v1:" + __import__("hashlib").sha256(b'{"args":{"q":{"$gt":5}},"tool":"t","v":1,"workflow_id":"w"}').hexdigest()
    )


def _decode(value: Any) -> Any:
    """The inverse of normalise on None/bool/int/str/bytes/list/dict: proof that it is one to one."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and "$bytes" in value:
            import base64

            return base64.b64decode(value["$bytes"])
        if len(value) == 1 and "$int" in value:
            return int(value["$int"])
        assert not any(k in ("$bytes", "$int", "$redacted") for k in value), value
        return {(k[1:] if k.startswith("$$") else k): _decode(v) for k, v in value.items()}
    return value


tag_like_keys = st.sampled_from(["$bytes", "$int", "$redacted", "$$bytes", "$$int", "$$$x", "$$", "$", "$gt", "a"])
taggable = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.text(storable, max_size=6) | st.binary(max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(tag_like_keys | st.text(storable, max_size=4), children, max_size=3)
    ),
    max_leaves=15,
)


@given(taggable)
def test_normalise_is_one_to_one(value: Any) -> None:
    assert _decode(normalise(value)) == value


@given(taggable, taggable)
def test_different_values_have_different_canonical_json(a: Any, b: Any) -> None:
    assume(_decode(normalise(a)) != _decode(normalise(b)))
    assert canonical(normalise(a)) != canonical(normalise(b))
