"""Shard-ready schema (issue 17): every primary and unique key of a workflow's rows holds workflow_id;
revision 0007 moves a populated database both ways; the Postgres tables can be hash-partitioned by
workflow_id (the constraint a distributed Postgres such as Citus imposes)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

import agent_ledger
from agent_ledger import ApprovalPending, ApprovalRefused, ApprovalStatus, InvalidArguments, Ledger, ToolCall
from agent_ledger._migrate import config_for, partitions
from agent_ledger._schema import Tables, build_tables

ROOT = Path(__file__).resolve().parents[1]
SHARDED = ("effects", "events", "approvals", "approval_votes")
"""The tables holding a workflow's rows (the inbound ids are nobody's workflow: their own key)."""
USAGE = "usage" in {f.name for f in dataclasses.fields(Tables)}
"""Whether the limits' usage table exists (revision 0006): keyed and partitioned by its scope."""
OTHERS = ("inbound", "usage") if USAGE else ("inbound",)


def _layout(n: int) -> dict[str, tuple[str, int]]:
    """The partitioning ``--partitions n`` asks for."""
    out = {t: ("HASH (workflow_id)", n) for t in SHARDED}
    return {**out, "usage": ("HASH (scope)", n)} if USAGE else out


PREVIOUS = ScriptDirectory.from_config(config_for(build_tables())).get_revision("0007").down_revision
"""The revision before the shard-ready keys (0006 once the limits table is there, else 0005)."""


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """No partitioning from the environment (``--pg-partitions`` sets it for the whole run)."""
    monkeypatch.delenv("AGENT_LEDGER_PARTITIONS", raising=False)


def _migrate_to(url: str, revision: str, *, down: bool = False, partitions: int | None = None) -> None:
    engine = sa.create_engine(url)
    cfg = config_for(build_tables())
    if partitions is not None:
        cfg.attributes["agent_ledger.partitions"] = partitions
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
        conn.commit()
    engine.dispose()


def _keys(url: str) -> dict[str, dict[str, list[list[str]]]]:
    """Per table: its primary key and its unique keys (constraints and unique indexes)."""
    engine = sa.create_engine(url)
    insp = sa.inspect(engine)
    out: dict[str, dict[str, list[list[str]]]] = {}
    for suffix in (*SHARDED, *OTHERS):
        name = f"agent_ledger_{suffix}"
        uniques = [u["column_names"] for u in insp.get_unique_constraints(name)]
        uniques += [
            i["column_names"] for i in insp.get_indexes(name) if i["unique"] and not i.get("duplicates_constraint")
        ]
        out[suffix] = {"pk": [insp.get_pk_constraint(name)["constrained_columns"]], "unique": uniques}
    engine.dispose()
    return out


def _partitioning(url: str) -> dict[str, tuple[str, int]]:
    """Postgres: per partitioned ledger table, (its partition key, how many partitions)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT c.relname, pg_get_partkeydef(c.oid), "
                "(SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid) "
                "FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
                "WHERE c.relname LIKE 'agent_ledger_%'"
            )
        ).all()
    engine.dispose()
    return {r[0].removeprefix("agent_ledger_"): (r[1], r[2]) for r in rows}


def _rows(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every ledger table, in a stable order."""
    engine = sa.create_engine(url)
    md = sa.MetaData()
    out = {}
    with engine.connect() as conn:
        for suffix in (*SHARDED, *OTHERS):
            table = sa.Table(f"agent_ledger_{suffix}", md, autoload_with=conn)
            order = list(table.primary_key.columns)  # unique, so the same order whichever key it is
            out[suffix] = [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(*order))]
    engine.dispose()
    for rows in out.values():
        for row in rows:
            for k, v in row.items():
                if isinstance(v, datetime):  # SQLite reflects naive datetimes, Postgres aware ones
                    row[k] = v.replace(tzinfo=None)
    return out


class Handlers:
    """Handlers that count their executions."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, Any]] = []

    def charge(self, amount: int) -> dict[str, int]:
        self.runs.append(("charge", amount))
        return {"charged": amount}

    def refund(self, amount: int) -> dict[str, int]:
        self.runs.append(("refund", amount))
        return {"refunded": amount}

    def boom(self, n: int) -> None:
        self.runs.append(("boom", n))
        raise ValueError(f"declined {n}")


def _limited() -> dict[str, Any]:
    """A per-workflow budget of 100 (of the amount) for the charges, where limits exist: usage rows."""
    limit = getattr(agent_ledger, "Limit", None)
    return {"limits": [limit(max=100, count="amount", name="spend")]} if USAGE and limit is not None else {}


def _charge(workflow: str, amount: int) -> ToolCall:
    return ToolCall(workflow_id=workflow, tool="payments.charge", args={"amount": amount})


def _refund(workflow: str, amount: int) -> ToolCall:
    return ToolCall(workflow_id=workflow, tool="payments.refund", args={"amount": amount})


def _populate(url: str, h: Handlers) -> dict[str, str]:
    """Rows in every table: succeeded and failed effects with their events, an approval consumed by its
    call, one waiting for a second vote (with its first vote), and an inbound message id."""
    led = Ledger(url, auto_migrate=True)
    for w in range(6):  # several workflows: on the partitioned schema, rows in several partitions
        assert led.run(_charge(f"wf-{w}", 10 + w), handler=h.charge, **_limited()) == {"charged": 10 + w}
    with pytest.raises(ValueError):
        led.run(ToolCall(workflow_id="wf-0", tool="payments.boom", args={"n": 1}), handler=h.boom, on_error="replay")
    with pytest.raises(ApprovalPending) as first:
        led.run(_refund("wf-1", 5), handler=h.refund, requires_approval=True)
    led.approve(first.value.approval_id, by="fay")
    assert led.run(_refund("wf-1", 5), handler=h.refund, requires_approval=True) == {"refunded": 5}
    with pytest.raises(ApprovalPending) as second:
        led.run(_refund("wf-2", 7), handler=h.refund, requires_approval=True, approvers=["fay", "fred"], quorum=2)
    voted = led.approve(second.value.approval_id, by="fay")
    assert voted.status is ApprovalStatus.PENDING and voted.approved_by == ["fay"]
    assert led.approvals.remember_inbound("msg-1", "webhook")
    led.flush()
    led.close()
    return {"consumed": first.value.approval_id, "open": second.value.approval_id}


def test_every_key_of_a_workflows_rows_holds_workflow_id(db_url: str, plain: None) -> None:
    Ledger(db_url).migrate()
    keys = _keys(db_url)
    sqlite = db_url.startswith("sqlite")
    for suffix in SHARDED:
        for unique in keys[suffix]["unique"]:
            assert "workflow_id" in unique, (suffix, unique)
        if sqlite and suffix in ("events", "approval_votes"):
            assert keys[suffix]["pk"] == [["id"]]  # the rowid (the only column SQLite numbers)
        else:
            assert "workflow_id" in keys[suffix]["pk"][0], (suffix, keys[suffix])
    assert keys["effects"]["pk"] == [["key", "workflow_id"]]  # key first: a key-only lookup probes it
    assert keys["approvals"]["unique"] == [["key", "payload_hash", "workflow_id"]]
    assert keys["approval_votes"]["unique"] == [["approval_id", "approver", "workflow_id"]]
    assert keys["inbound"] == {"pk": [["message_id"]], "unique": []}
    if USAGE:  # keyed by its scope, the column it is distributed by (a workflow budget's is the workflow id)
        assert keys["usage"] == {"pk": [["name", "scope", "window_start"]], "unique": []}


@pytest.mark.parametrize("parts", [None, 4], ids=["plain", "partitioned"])
def test_the_migration_moves_a_populated_database_both_ways(db_url: str, plain: None, parts: int | None) -> None:
    """Rows in every table at head; downgrade to the previous revision (its keys, every row kept);
    upgrade again with those rows in it (partitioned on Postgres when asked): every row is back,
    old keys replay without running their handler, new keys run once, the half-voted request takes
    its second vote and refuses the first voter again, a seen inbound id stays seen."""
    if parts and db_url.startswith("sqlite"):
        pytest.skip("partitioning is a Postgres option (SQLite ignores it)")
    h = Handlers()
    ids = _populate(db_url, h)
    assert len(h.runs) == 8
    before = _rows(db_url)
    assert all(before[t] for t in (*SHARDED, *OTHERS)), {t: len(r) for t, r in before.items()}
    assert [v["workflow_id"] for v in before["approval_votes"]] == ["wf-1", "wf-2"]

    _migrate_to(db_url, PREVIOUS, down=True)
    old = _keys(db_url)
    assert old["effects"]["pk"] == [["key"]] and old["approvals"]["pk"] == [["id"]]
    assert old["approval_votes"]["unique"] == [["approval_id", "approver"]]
    without_workflow = [{k: v for k, v in r.items() if k != "workflow_id"} for r in before["approval_votes"]]
    assert _rows(db_url) == {**before, "approval_votes": without_workflow}

    _migrate_to(db_url, "head", partitions=parts)
    assert _rows(db_url) == before
    if parts:
        assert _partitioning(db_url) == _layout(parts)
    elif not db_url.startswith("sqlite"):
        assert _partitioning(db_url) == {}

    led = Ledger(db_url)
    for w in range(6):  # the old keys replay (and charge no budget again)
        assert led.run(_charge(f"wf-{w}", 10 + w), handler=h.charge, **_limited()) == {"charged": 10 + w}
    with pytest.raises(Exception, match="declined 1"):
        led.run(ToolCall(workflow_id="wf-0", tool="payments.boom", args={"n": 1}), handler=h.boom, on_error="replay")
    assert led.run(_refund("wf-1", 5), handler=h.refund, requires_approval=True) == {"refunded": 5}
    assert len(h.runs) == 8
    assert led.run(_charge("wf-new", 99), handler=h.charge, **_limited()) == {"charged": 99}  # runs once
    assert led.run(_charge("wf-new", 99), handler=h.charge, **_limited()) == {"charged": 99}
    assert h.runs[8:] == [("charge", 99)]
    if _limited():  # the budget of wf-0 was kept: 10 used before the upgrade, 95 more do not fit
        with pytest.raises(agent_ledger.LimitExceeded):  # type: ignore[attr-defined,unused-ignore]
            led.run(_charge("wf-0", 95), handler=h.charge, **_limited())
        assert led.run(_charge("wf-0", 90), handler=h.charge, **_limited()) == {"charged": 90}
        assert h.runs[9:] == [("charge", 90)]
        h.runs.pop()
    with pytest.raises(ApprovalRefused, match="already"):
        led.approve(ids["open"], by="fay")
    assert led.approve(ids["open"], by="fred").status is ApprovalStatus.APPROVED
    assert led.run(_refund("wf-2", 7), handler=h.refund, requires_approval=True) == {"refunded": 7}
    assert h.runs[9:] == [("refund", 7)]
    assert not led.approvals.remember_inbound("msg-1", "webhook")
    # Key-only reads (every shard) still find a row.
    record = led.effect(before["effects"][0]["key"])
    assert record is not None and record.workflow_id == before["effects"][0]["workflow_id"]
    assert [e.tool for e in led.history("wf-1")] == ["payments.charge", "payments.refund"]
    led.close()
    # And down again with the new rows (from the partitioned tables too): the old keys take every row.
    after = _rows(db_url)
    assert len(after["effects"]) > len(before["effects"])
    _migrate_to(db_url, PREVIOUS, down=True)
    if not db_url.startswith("sqlite"):
        assert _partitioning(db_url) == {}
    assert _keys(db_url)["effects"]["pk"] == [["key"]]
    without_workflow = [{k: v for k, v in r.items() if k != "workflow_id"} for r in after["approval_votes"]]
    assert _rows(db_url) == {**after, "approval_votes": without_workflow}


def test_partitioned_schema_runs_the_ledger(pg_url: str, plain: None) -> None:
    """``Ledger.migrate(partitions=8)`` on a fresh database: every table of a workflow's rows is
    hash-partitioned by workflow_id, the declared tables match, and rows spread over partitions."""
    from test_migrations import _diff

    led = Ledger(pg_url)
    led.migrate(partitions=8)
    assert _partitioning(pg_url) == _layout(8)
    assert _diff(pg_url) == []
    h = Handlers()
    for w in range(40):
        assert led.run(_charge(f"w{w}", w), handler=h.charge) == {"charged": w}
        assert led.run(_charge(f"w{w}", w), handler=h.charge) == {"charged": w}
    assert len(h.runs) == 40
    led.flush()
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        used = conn.execute(sa.text("SELECT count(DISTINCT tableoid) FROM agent_ledger_effects")).scalar()
        replays = conn.execute(sa.text("SELECT count(*) FROM agent_ledger_events WHERE kind = 'replayed'")).scalar()
    engine.dispose()
    assert used is not None and used > 1
    assert replays == 40
    led.close()


def test_migrate_partitions_option_everywhere(pg_url: str, plain: None, tmp_path: Path) -> None:
    """``agent-ledger migrate --partitions N`` and alembic's ``-x partitions=N``; a bad count is refused
    with a clear message and nothing created."""
    env = {k: v for k, v in os.environ.items() if k != "AGENT_LEDGER_PARTITIONS"}
    bad = subprocess.run(
        [sys.executable, "-m", "agent_ledger", "migrate", "--partitions", "0", "--url", pg_url],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and "partitions must be a whole number from 1 to 1024" in bad.stderr
    assert "Traceback" not in bad.stderr
    engine = sa.create_engine(pg_url)
    assert not sa.inspect(engine).has_table("agent_ledger_effects")
    engine.dispose()
    ok = subprocess.run(
        [sys.executable, "-m", "agent_ledger", "migrate", "--partitions", "3", "--url", pg_url],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert _partitioning(pg_url) == _layout(3)
    _migrate_to(pg_url, PREVIOUS, down=True)
    assert _partitioning(pg_url) == {}
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", "partitions=5", "upgrade", "head"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**env, "AGENT_LEDGER_URL": pg_url},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert _partitioning(pg_url) == _layout(5)


@pytest.mark.parametrize("value", ["0", "-1", "1025", "eight", "8.0", " "])
def test_bad_partition_counts_are_refused(value: str, monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    monkeypatch.setenv("AGENT_LEDGER_PARTITIONS", value)
    cfg = config_for(build_tables())
    if value.strip() == "":
        with pytest.raises(InvalidArguments):
            partitions(cfg)
        return
    with pytest.raises(InvalidArguments, match="from 1 to 1024"):
        partitions(cfg)
    with pytest.raises(InvalidArguments, match="from 1 to 1024"):
        Ledger(sqlite_url).migrate(partitions=value)  # type: ignore[arg-type]


def test_partition_count_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config attribute wins over the environment; nothing asked: plain tables."""
    monkeypatch.delenv("AGENT_LEDGER_PARTITIONS", raising=False)
    cfg = config_for(build_tables())
    assert partitions(cfg) is None
    monkeypatch.setenv("AGENT_LEDGER_PARTITIONS", "8")
    assert partitions(cfg) == 8
    cfg.attributes["agent_ledger.partitions"] = 2
    assert partitions(cfg) == 2


def test_sqlite_ignores_partitions(sqlite_url: str, plain: None) -> None:
    led = Ledger(sqlite_url)
    led.migrate(partitions=8)
    h = Handlers()
    assert led.run(_charge("w", 1), handler=h.charge) == {"charged": 1}
    assert led.run(_charge("w", 1), handler=h.charge) == {"charged": 1}
    assert h.runs == [("charge", 1)]
    led.close()


@pytest.fixture
def run_partitioned(pytestconfig: pytest.Config) -> Iterator[int]:
    n = pytestconfig.getoption("pg_partitions")
    if n is None:
        pytest.skip("only with --pg-partitions N (scripts/test.sh runs the Postgres tests so)")
    yield n


def test_the_partitioned_run_really_partitions(pg_url: str, run_partitioned: int) -> None:
    """With ``--pg-partitions N`` every Postgres database of the run is created partitioned: this is
    what makes the second pass of scripts/test.sh a run against the partitioned schema."""
    led = Ledger(pg_url, auto_migrate=True)
    assert led.run(_charge("w", 1), handler=lambda amount: amount) == 1
    led.close()
    assert _partitioning(pg_url) == _layout(run_partitioned)


def test_statements_that_know_the_workflow_touch_one_partition(pg_url: str, plain: None) -> None:
    """Postgres prunes partitions by the workflow_id a statement names: every statement of a call, of
    the approval gate and of a vote plans on one partition of each table it reads or changes, while a
    lookup by key alone plans on all of them (the multi-shard query docs/scaling.md lists)."""
    import re

    from agent_ledger._decide import Status
    from agent_ledger._store import row_from_mapping

    led = Ledger(pg_url)
    led.migrate(partitions=8)
    call = _refund("wf-7", 5)
    with pytest.raises(ApprovalPending) as asked:
        led.run(call, handler=Handlers().refund, requires_approval=True)
    approval_id = asked.value.approval_id
    rt = led._rt
    store = rt.store
    (approval,) = rt.do(store.approvals(status="pending", workflow_id="wf-7", tool=None, now=None))
    assert led.run(_charge("wf-7", 1), handler=Handlers().charge) == {"charged": 1}
    (effect,) = rt.do(store.effects(workflow_id="wf-7", tool="payments.charge"))
    key, now = effect["key"], effect["created_at"]
    row = row_from_mapping(rt.do(store.load(key, "wf-7")))
    running = dataclasses.replace(row, status=Status.RUNNING, lease_expires_at=now)
    failed = dataclasses.replace(row, status=Status.FAILED)
    routed = {
        "load": store.load(key, "wf-7"),
        "claim_again": store.claim_again(event="retry", row=failed, owner="o", lease_expires_at=now, now=now),
        "takeover": store.claim_again(event="takeover", row=running, owner="o", lease_expires_at=now, now=now),
        "heartbeat": store.heartbeat(key=key, workflow_id="wf-7", owner="o", attempt=1, lease_expires_at=now),
        "finish": store.finish(
            event="fail", key=key, workflow_id="wf-7", tool="t", owner="o", attempt=1, now=now, error={"type": "E"}
        ),
        "mark_unknown": store.mark_unknown(row=running, now=now, by="o", detail={}),
        "resolve": store.resolve(row=failed, event="resolve_retry", by="o", now=now),
        "latest_approval": store.latest_approval(approval["key"], "wf-7", approval["payload_hash"]),
        "approval": store.approval(approval_id, "wf-7"),
        "expire": store.expire_approval(approval, now=now, actor="o"),
        "supersede": store.supersede_approval(approval, ran_with="x", now=now, actor="o"),
        "channel_state": store.set_channel_state(approval_id, "wf-7", {"c": {}}),
        "vote": store.vote(approval_id, "wf-7", judge=lambda r: pytest.fail("not run"), by="o", reason=None, now=now),
        "others": store.open_for_other_payloads(approval["key"], "wf-7", approval["payload_hash"]),
        "events": store.events_for_keys([key], ["wf-7"]),
        "history": store.events_for_workflow("wf-7"),
    }
    engine = sa.create_engine(pg_url)

    @sa.event.listens_for(engine, "before_cursor_execute", retval=True)
    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> Any:
        return "EXPLAIN (COSTS OFF) " + statement, parameters  # the plan, with SQLAlchemy's own binds

    def partitions_planned(stmt: Any, values: Any) -> dict[str, set[str]]:
        with engine.connect() as conn:
            plan = [r[0] for r in conn.execute(stmt, values)]
            conn.rollback()
        found: dict[str, set[str]] = {}
        for table, number in re.findall(r"agent_ledger_(\w+?)_p(\d+)\b", "\n".join(plan)):
            found.setdefault(table, set()).add(number)
        return found

    try:
        checked = 0
        for name, work in routed.items():
            for stmt, values in work.statements():
                if isinstance(stmt, sa.Insert):
                    continue  # an insert routes its row by the value it writes
                planned = partitions_planned(stmt, values)
                assert planned, (name, stmt)
                assert all(len(numbers) == 1 for numbers in planned.values()), (name, planned)
                checked += 1
        assert checked >= len(routed)
        everywhere = partitions_planned(store.load_record(key).statements()[0][0], {"p_key": key})
        assert everywhere == {"effects": {str(i) for i in range(8)}}
    finally:
        engine.dispose()
        led.close()
