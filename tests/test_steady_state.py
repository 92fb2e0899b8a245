"""Steady-state export runs against a real PostgreSQL server: every committed row arrives exactly once.

Most tests set ``floor_margin`` to zero, so the margin cannot hide a floor that
is too high. The writes in these tests come one at a time from the test thread,
so no transaction is ever between starting and showing up in
``pg_stat_activity`` when the exporter reads it, and a zero margin is exact.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta

import psycopg
from airflow_audit_export.testing.objects import exported_ids

from airflow_audit_export import exporting
from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.exporting import run_export
from airflow_audit_export.planning import CursorFloor, parse_time
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.testing.schema import insert_rows
from airflow_audit_export.writing import LocalDestination

#: Time between the start of the old, late-writing transaction and the start of the newer one.
LAZY_XID_GAP_SECONDS = 1.5


# -- helpers -------------------------------------------------------------------------------


def exact_settings(settings: ExportSettings, **changes) -> ExportSettings:
    """Return ``settings`` with ``floor_margin`` zero and ``changes`` applied, validated."""
    changed = dataclasses.replace(settings, floor_margin=timedelta(0), **changes)
    changed.validate()
    return changed


def export_once(conn: psycopg.Connection, settings: ExportSettings, destination: LocalDestination) -> dict:
    return run_export(conn, settings, destination)


def commit_rows(conn: psycopg.Connection, count: int) -> list[int]:
    """Insert ``count`` rows in one autocommit transaction and return their ids."""
    return insert_rows(conn, count)


def assert_exported_exactly(destination: LocalDestination, expected_ids: list[int]) -> None:
    ids = exported_ids(destination)
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    assert repeated == [], f"ids exported more than once: {repeated}"
    assert sorted(ids) == sorted(expected_ids)


def row_xmins(conn: psycopg.Connection, ids: list[int]) -> set[int]:
    rows = conn.execute("SELECT xmin::text::bigint FROM audit_partitioned WHERE id = ANY(%s)", (ids,)).fetchall()
    return {row[0] for row in rows}


def earliest_timestamp(conn: psycopg.Connection, ids: list[int]):
    return conn.execute('SELECT min("timestamp") FROM audit_partitioned WHERE id = ANY(%s)', (ids,)).fetchone()[0]


def latest_timestamp(conn: psycopg.Connection, ids: list[int]):
    return conn.execute('SELECT max("timestamp") FROM audit_partitioned WHERE id = ANY(%s)', (ids,)).fetchone()[0]


def stored_cursor_floor(conn: psycopg.Connection, export_name: str):
    query = "SELECT cursor_floor FROM audit_export_state WHERE export_name = %s"
    return conn.execute(query, (export_name,)).fetchone()[0]


def prepare_rows(conn: psycopg.Connection, count: int, gid: str) -> tuple[list[int], datetime]:
    """Insert ``count`` rows in a transaction, prepare it for two-phase commit as ``gid``.

    Returns the row ids and the transaction's start time, which is the rows' timestamp.
    """
    conn.execute("BEGIN")
    started_at = conn.execute("SELECT now()").fetchone()[0]
    ids = insert_rows(conn, count)
    conn.execute(f"PREPARE TRANSACTION '{gid}'")
    return ids, started_at


@dataclasses.dataclass(frozen=True)
class LazyXidOutcome:
    """Row ids written by the old transaction A and the newer transaction B of the lazy-xid scenario."""

    a_ids: list[int]
    b_ids: list[int]


def run_lazy_xid_scenario(connect, exporter_conn, settings, destination) -> LazyXidOutcome:
    """Run the lazy-xid workload with an export between every step.

    Transaction A starts and only reads. B starts later, writes and stays open,
    so B gets the lower xid. A then writes rows stamped with its own older start
    and commits before B does.
    """
    anchor_export(exporter_conn, settings)
    writer_a = connect()
    writer_b = connect()

    writer_a.execute("BEGIN")
    writer_a.execute("SELECT 1")
    time.sleep(LAZY_XID_GAP_SECONDS)
    writer_b.execute("BEGIN")
    b_ids = insert_rows(writer_b, 3)
    export_once(exporter_conn, settings, destination)

    a_ids = insert_rows(writer_a, 2)
    writer_a.execute("COMMIT")
    export_once(exporter_conn, settings, destination)

    writer_b.execute("COMMIT")
    for _ in range(3):
        export_once(exporter_conn, settings, destination)

    # The scenario only tests something when A's rows are older than B's start and A's xid is higher.
    assert latest_timestamp(writer_a, a_ids) < earliest_timestamp(writer_a, b_ids) - timedelta(seconds=1)
    assert min(row_xmins(writer_a, a_ids)) > max(row_xmins(writer_a, b_ids))
    return LazyXidOutcome(a_ids=a_ids, b_ids=b_ids)


def naive_advance_floor(*, cursor, floor, trusted, untrusted_reason, exported_through, history) -> CursorFloor:
    """Give the new cursor the floor of the newest observation: the oldest ``xact_start`` at snapshot time.

    This is the unsafe floor that the observation module warns about. It is
    used only to show that the lazy-xid test fails when the floor is wrong.
    """
    if not history:
        return CursorFloor(floor, trusted, untrusted_reason, exported_through, history)
    newest = max(history, key=lambda entry: parse_time(entry["taken_at"]))
    return CursorFloor(
        floor=parse_time(newest["floor"]),
        trusted=newest["trusted"],
        untrusted_reason=newest.get("untrusted_reason"),
        exported_through=exported_through,
        history=[],
    )


# -- committed rows ------------------------------------------------------------------------


def test_runs_export_each_row_once(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    writer = connect()
    history_ids = commit_rows(writer, 10)
    anchor_export(exporter_conn, settings)

    committed: list[int] = []
    # Batches above rows_per_object (20) span several objects within one run.
    for batch in (5, 45, 1, 0, 23, 3, 60, 2):
        committed += commit_rows(writer, batch)
        stats = export_once(exporter_conn, settings, local_destination)

        assert stats["completed"] is True
        assert stats["draining"] is False
        assert stats["rows"] == batch
        assert stats["objects"] == -(-batch // settings.rows_per_object)
        assert_exported_exactly(local_destination, committed)

    assert set(history_ids).isdisjoint(exported_ids(local_destination))


# -- transactions in flight ----------------------------------------------------------------


def test_lazy_xid_rows_exported_once(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)

    outcome = run_lazy_xid_scenario(connect, exporter_conn, settings, local_destination)

    assert_exported_exactly(local_destination, outcome.a_ids + outcome.b_ids)


def test_naive_floor_loses_lazy_row(monkeypatch, connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    # exporting imported advance_floor by name, so the patch goes where _commit looks it up.
    monkeypatch.setattr(exporting, "advance_floor", naive_advance_floor)

    outcome = run_lazy_xid_scenario(connect, exporter_conn, settings, local_destination)

    exported = exported_ids(local_destination)
    assert set(outcome.a_ids).isdisjoint(exported), "the naive floor was expected to lose A's rows"
    assert sorted(exported) == sorted(outcome.b_ids)


def test_open_transaction_across_runs(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    writer = connect()
    long_writer = connect()
    anchor_export(exporter_conn, settings)

    long_writer.execute("BEGIN")
    long_writer.execute("SELECT 1")
    first_ids = commit_rows(writer, 4)
    export_once(exporter_conn, settings, local_destination)
    assert_exported_exactly(local_destination, first_ids)

    long_ids = insert_rows(long_writer, 6)
    long_xid = long_writer.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
    blocked_ids = commit_rows(writer, 25)
    for _ in range(3):
        stats = export_once(exporter_conn, settings, local_destination)
        blocked_ids += commit_rows(writer, 2)

        # Rows committed after the open transaction took its xid wait until it ends.
        assert stats["cursor"] <= long_xid
        assert_exported_exactly(local_destination, first_ids)

    long_writer.execute("COMMIT")
    for _ in range(2):
        export_once(exporter_conn, settings, local_destination)

    assert_exported_exactly(local_destination, first_ids + long_ids + blocked_ids)


def test_aborted_transaction_exports_nothing(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    writer = connect()
    aborting = connect()
    anchor_export(exporter_conn, settings)

    committed = commit_rows(writer, 3)
    aborting.execute("BEGIN")
    insert_rows(aborting, 5)
    aborting.execute("ROLLBACK")

    aborting.execute("BEGIN")
    insert_rows(aborting, 4)
    export_once(exporter_conn, settings, local_destination)
    aborting.execute("ROLLBACK")
    committed += commit_rows(writer, 2)
    for _ in range(2):
        export_once(exporter_conn, settings, local_destination)

    assert_exported_exactly(local_destination, committed)


def test_rolled_back_savepoint_exports_nothing(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    writer = connect()
    anchor_export(exporter_conn, settings)

    writer.execute("BEGIN")
    kept = insert_rows(writer, 2)
    writer.execute("SAVEPOINT first")
    insert_rows(writer, 3)
    writer.execute("ROLLBACK TO SAVEPOINT first")
    kept += insert_rows(writer, 2)
    writer.execute("SAVEPOINT second")
    kept += insert_rows(writer, 1)
    writer.execute("RELEASE SAVEPOINT second")
    writer.execute("SAVEPOINT third")
    insert_rows(writer, 4)
    writer.execute("ROLLBACK TO SAVEPOINT third")
    export_once(exporter_conn, settings, local_destination)
    writer.execute("COMMIT")
    for _ in range(2):
        export_once(exporter_conn, settings, local_destination)

    # Rows written inside savepoints carry subtransaction xids, not the top-level xid.
    assert len(row_xmins(writer, kept)) == 3
    assert_exported_exactly(local_destination, kept)


# -- two-phase commit ----------------------------------------------------------------------


def test_prepared_commit_exported_once(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    writer = connect()
    preparer = connect()
    anchor_export(exporter_conn, settings)

    committed = commit_rows(writer, 3)
    prepared_ids, _ = prepare_rows(preparer, 4, "audit_prepared_after_anchor")
    # No xid after the prepared one has finished before the first run, so that
    # run's snapshot xmax (latest finished xid + 1) equals the prepared xid.
    for _ in range(2):
        export_once(exporter_conn, settings, local_destination)
        committed += commit_rows(writer, 2)

    assert set(prepared_ids).isdisjoint(exported_ids(local_destination))

    connect().execute("COMMIT PREPARED 'audit_prepared_after_anchor'")
    for _ in range(2):
        export_once(exporter_conn, settings, local_destination)

    assert_exported_exactly(local_destination, committed + prepared_ids)


def test_prepared_before_anchor_exported(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    writer = connect()
    history_ids = commit_rows(writer, 5)
    prepared_ids, prepared_at = prepare_rows(connect(), 3, "audit_prepared_before_anchor")

    result = anchor_export(exporter_conn, settings)

    assert result.floor_trusted is False
    assert "audit_prepared_before_anchor" in result.floor_untrusted_reason
    assert result.floor <= prepared_at

    committed = commit_rows(writer, 2)
    export_once(exporter_conn, settings, local_destination)
    connect().execute("COMMIT PREPARED 'audit_prepared_before_anchor'")
    committed += commit_rows(writer, 2)
    for _ in range(2):
        export_once(exporter_conn, settings, local_destination)

    assert set(history_ids).isdisjoint(exported_ids(local_destination))
    assert_exported_exactly(local_destination, committed + prepared_ids)


def test_rollback_prepared_exports_nothing(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings)
    writer = connect()
    anchor_export(exporter_conn, settings)

    prepare_rows(connect(), 4, "audit_prepared_rolled_back")
    export_once(exporter_conn, settings, local_destination)
    connect().execute("ROLLBACK PREPARED 'audit_prepared_rolled_back'")
    committed = commit_rows(writer, 3)
    for _ in range(2):
        export_once(exporter_conn, settings, local_destination)

    assert_exported_exactly(local_destination, committed)


# -- caps per run --------------------------------------------------------------------------


def test_drain_carries_floor(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings, max_xid_interval=3)
    writer = connect()
    anchor_export(exporter_conn, settings)

    def check_floor_covers_unexported() -> None:
        unexported = sorted(set(committed) - set(exported_ids(local_destination)))
        if unexported:
            assert stored_cursor_floor(writer, settings.name) <= earliest_timestamp(writer, unexported)

    committed: list[int] = []
    # Bursts of single-row transactions with a capped run after each, so the
    # floor history interleaves with rows that are not exported yet.
    for _ in range(4):
        for _ in range(10):
            committed += commit_rows(writer, 1)
        stats = export_once(exporter_conn, settings, local_destination)

        assert stats["draining"] is True
        assert stats["hi"] - stats["lo"] <= 3
        check_floor_covers_unexported()

    draining_runs = 4
    for _ in range(200):
        stats = export_once(exporter_conn, settings, local_destination)
        check_floor_covers_unexported()
        if not stats["draining"]:
            break
        draining_runs += 1

        assert stats["lag_xids"] > 0
        assert stats["hi"] - stats["lo"] == 3

    assert stats["draining"] is False
    assert stats["lag_xids"] == 0
    assert draining_runs >= 40 // 3
    assert_exported_exactly(local_destination, committed)


def test_row_cap_resumes_next_run(connect, exporter_conn, settings, local_destination):
    settings = exact_settings(settings, max_rows_per_run=20, rows_per_object=20)
    writer = connect()
    anchor_export(exporter_conn, settings)

    large_batch = commit_rows(writer, 50)
    first = export_once(exporter_conn, settings, local_destination)

    assert first["completed"] is False
    assert first["draining"] is True
    assert first["rows"] == 20
    assert first["cursor"] == first["lo"]
    assert len(exported_ids(local_destination)) == 20

    later_batch = commit_rows(writer, 5)
    second = export_once(exporter_conn, settings, local_destination)
    third = export_once(exporter_conn, settings, local_destination)

    assert second["completed"] is False
    assert second["rows"] == 40
    assert (second["lo"], second["hi"]) == (first["lo"], first["hi"])
    assert third["completed"] is True
    assert third["rows"] == 50
    assert third["cursor"] == first["hi"]
    assert_exported_exactly(local_destination, large_batch)

    fourth = export_once(exporter_conn, settings, local_destination)

    assert fourth["completed"] is True
    assert fourth["rows"] == 5
    assert_exported_exactly(local_destination, large_batch + later_batch)
