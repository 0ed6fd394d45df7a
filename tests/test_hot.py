"""The hot path's own value conversions agree with the dialect processors the Core path uses."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from agent_ledger import Ledger, ToolCall
from agent_ledger._fast import _bind_processor, _result_processor
from agent_ledger._schema import UTCDateTime, json_type

DIALECT = sqlite.dialect()

aware = st.datetimes(
    min_value=dt.datetime(1, 1, 2),
    max_value=dt.datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [dt.timezone.utc, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-8))]
    ),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@given(aware)
def test_sqlite_datetimes_are_stored_and_read_as_the_dialect_does(value: dt.datetime) -> None:
    t = UTCDateTime()
    ours_bind, theirs_bind = _bind_processor(t, DIALECT), t._cached_bind_processor(DIALECT)
    ours_result, theirs_result = _result_processor(t, DIALECT), t._cached_result_processor(DIALECT, None)
    assert ours_bind is not theirs_bind and ours_result is not theirs_result  # the fast ones are in use
    assert ours_bind is not None and theirs_bind is not None
    assert ours_result is not None and theirs_result is not None
    stored = theirs_bind(value)
    assert ours_bind(value) == stored
    assert ours_result(stored) == theirs_result(stored) == value
    assert ours_result(stored).tzinfo == dt.timezone.utc


def test_sqlite_naive_datetimes_are_refused_like_the_dialect_does() -> None:
    bind = _bind_processor(UTCDateTime(), DIALECT)
    assert bind is not None
    with pytest.raises(ValueError, match="aware datetimes only"):
        bind(dt.datetime(2026, 1, 1))


@given(json_values)
def test_sqlite_json_is_stored_and_read_as_the_dialect_does(value: Any) -> None:
    t = json_type()
    ours_bind, theirs_bind = _bind_processor(t, DIALECT), t._cached_bind_processor(DIALECT)
    ours_result, theirs_result = _result_processor(t, DIALECT), t._cached_result_processor(DIALECT, None)
    assert ours_bind is not None and theirs_bind is not None
    assert ours_result is not None and theirs_result is not None
    stored = theirs_bind(value)
    assert ours_bind(value) == stored
    assert ours_result(stored) == theirs_result(stored) == value
    assert ours_result(None) is theirs_result(None) is None


def test_hot_and_core_paths_read_the_same_row(make_ledger: Any) -> None:
    """A call written by the hot path reads back through the Core path (history) with the same values."""
    ledger: Ledger = make_ledger()
    ran = []

    def charge(amount: int, when: dt.datetime) -> dict[str, Any]:
        ran.append(amount)
        return {"charged": amount, "at": when.isoformat(), "nested": [1.5, None, "é"]}

    when = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    call = ToolCall(workflow_id="wf-hot", tool="charge", args={"amount": 7, "when": when})
    first = ledger.run(call, handler=charge)
    again = ledger.run(call, handler=charge)
    assert ran == [7]
    assert first == again == {"charged": 7, "at": when.isoformat(), "nested": [1.5, None, "é"]}
    [record] = ledger.history("wf-hot")
    assert record.result == first
    assert record.args == {"amount": 7, "when": "2026-03-04T03:06:07.890123Z"}
    assert record.started_at is not None and record.finished_at is not None
    assert record.started_at.tzinfo is not None and record.started_at <= record.finished_at
