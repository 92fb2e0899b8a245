"""Backfill of a time window against a real PostgreSQL server: every row in ``[from, to)`` exactly once.

Most tests call the library functions or the operators' ``execute`` directly.
Three tests run ``airflow dags test`` against the bundled DAGs and then read
the Airflow metadata database, which the session fixture migrates once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException
from airflow_audit_export.testing.objects import decode_rows, exported_ids, read_local_objects
from psycopg import sql

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.backfilling import export_range, manifest_key, write_manifest
from airflow_audit_export.gaps import gap_backfill_conf, gap_window
from airflow_audit_export.operators.backfill import (
    DEFAULT_MAX_RANGES,
    BackfillRangeOperator,
    BackfillSummaryOperator,
    BackfillWindowOperator,
)
from airflow_audit_export.ranges import MIN_PAGES_PER_RANGE, PageRange, plan_ranges
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import configure_connection, describe_backfill_sources, describe_source
from airflow_audit_export.testing.schema import EXPORT_ROLE, insert_rows
from airflow_audit_export.window import Window, WindowError, check_window_settled, parse_window
from airflow_audit_export.writing import LocalDestination, StagedObject, parse_destination

UTC = timezone.utc
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
DAG_TEST_TIMEOUT_SECONDS = 240
SOURCE_CONN_ID = "backfill_source"
S3_CONN_ID = "backfill_s3"
NOSTATS_ROLE = "backfill_nostats"
#: Default ``floor_margin`` of ExportSettings, which the operators use when no tuning overrides it.
DEFAULT_FLOOR_MARGIN = timedelta(seconds=60)
DAY_LABEL = re.compile(r"^\d{4}-\d{2}-\d{2} to \d{4}-\d{2}-\d{2} \(~\d+ rows\)$")


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def backfill_airflow_db() -> Path:
    """The Airflow metadata database under ``AIRFLOW_HOME``, migrated once unless it already exists."""
    path = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    if not path.exists():
        result = subprocess.run([AIRFLOW, "db", "migrate"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return path


@pytest.fixture
def source_conn_id(monkeypatch, pg_cluster, database) -> str:
    """An Airflow connection to the test database, defined through ``AIRFLOW_CONN_<ID>``."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{SOURCE_CONN_ID.upper()}", pg_cluster.uri(database, user=EXPORT_ROLE))
    return SOURCE_CONN_ID


@pytest.fixture
def backfill_settings(settings) -> ExportSettings:
    """The reference settings with the legacy table, 2-row pages and 3-row objects."""
    changed = dataclasses.replace(settings, legacy_table="public.audit", page_rows=2, rows_per_object=3)
    changed.validate()
    return changed


@pytest.fixture
def nostats_role(connect):
    """A login role that may read the audit tables but lacks ``pg_read_all_stats``."""
    admin = connect()
    role = sql.Identifier(NOSTATS_ROLE)
    # Roles are cluster-wide, so a role left by an interrupted session is replaced.
    admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    admin.execute(sql.SQL("GRANT SELECT ON public.audit_partitioned, public.audit TO {}").format(role))
    admin.execute(sql.SQL("GRANT SELECT ON public.audit_export_state TO {}").format(role))
    yield NOSTATS_ROLE
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (NOSTATS_ROLE,))
    admin.execute(sql.SQL("DROP OWNED BY {}").format(role))
    admin.execute(sql.SQL("DROP ROLE {}").format(role))


# -- helpers -------------------------------------------------------------------------------


def utc_midnight(days_ago: int) -> datetime:
    """Return the UTC midnight ``days_ago`` days before today."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


def insert_at(conn: psycopg.Connection, timestamps: list[datetime], *, table: str = "audit_partitioned") -> list[int]:
    """Insert one row per timestamp into ``public.<table>`` and return the new ids."""
    query = sql.SQL(
        'INSERT INTO {table} (workspace_id, username, operation, action_kind, "timestamp") '
        "SELECT 'demo', 'user1', 'jobs.run', 'create', ts FROM unnest(%s::timestamptz[]) AS u(ts) RETURNING id"
    ).format(table=sql.Identifier("public", table))
    return [row[0] for row in conn.execute(query, (timestamps,)).fetchall()]


def export_one_range(conn, tables, destination, settings: ExportSettings, window: Window, page_range: PageRange) -> dict:
    return export_range(
        conn,
        tables,
        destination,
        name=settings.name,
        window=window,
        start=page_range.start,
        end=page_range.end,
        page_rows=settings.page_rows,
        rows_per_object=settings.rows_per_object,
        compression=settings.compression,
    )


def backfill_window(
    conn: psycopg.Connection,
    settings: ExportSettings,
    destination,
    window: Window,
    *,
    max_ranges: int = DEFAULT_MAX_RANGES,
) -> tuple[list[PageRange], dict]:
    """Run the three backfill steps with the library functions, and return the planned ranges and the summary."""
    check_window_settled(conn, settings, window)
    tables = describe_backfill_sources(conn, settings)
    ranges = plan_ranges(conn, [table for _, table in tables], window, max_ranges)
    results = [export_one_range(conn, tables, destination, settings, window, r) for r in ranges]
    return ranges, write_manifest(destination, settings.name, window, results)


def run_backfill_operators(
    conn_id: str, destination_uri: str, window_from: str, window_to: str, *, page_rows: int, rows_per_object: int
) -> tuple[list[dict], dict]:
    """Run the plan, range and summary operators' ``execute`` in order, and return the range specs and the summary."""
    source = {
        "export_name": "audit",
        "table": "public.audit_partitioned",
        "legacy_table": "public.audit",
        "destination": destination_uri,
        "postgres_conn_id": conn_id,
        "tuning": {"rows_per_object": rows_per_object},
    }
    plan = BackfillWindowOperator(
        task_id="plan", window_from=window_from, window_to=window_to, page_rows=page_rows, **source
    )
    specs = plan.execute({})
    results = [BackfillRangeOperator(task_id="export_range", export_range=spec, **source).execute({}) for spec in specs]
    summary = BackfillSummaryOperator(
        task_id="summary", range_results=results, window_from=window_from, window_to=window_to, **source
    ).execute({})
    return specs, summary


def plan_operator(conn_id: str, destination_uri: str, window_from: str, window_to: str, **kwargs) -> BackfillWindowOperator:
    return BackfillWindowOperator(
        task_id="plan",
        export_name="audit",
        table="public.audit_partitioned",
        legacy_table="public.audit",
        destination=destination_uri,
        postgres_conn_id=conn_id,
        window_from=window_from,
        window_to=window_to,
        **kwargs,
    )


def row_day(row: dict) -> date:
    return datetime.fromisoformat(row["timestamp"]).astimezone(UTC).date()


def key_day(key: str) -> date:
    match = re.search(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})/", key)
    assert match, f"key {key!r} has no dt=YYYY-MM-DD folder"
    return date.fromisoformat(match.group(1))


def files_under(root: Path) -> list[str]:
    """Return every file below ``root``, staging files included, or an empty list when ``root`` does not exist."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def repeated(values: list) -> list:
    return sorted({v for v in values if values.count(v) > 1})


def read_manifest(destination: LocalDestination, settings_name: str, window: Window) -> dict:
    return json.loads(destination.path_of(manifest_key(destination.prefix, settings_name, window)).read_bytes())


def window_row_count(conn: psycopg.Connection, window: Window) -> int:
    query = """
        SELECT (SELECT count(*) FROM audit_partitioned WHERE "timestamp" >= %(start)s AND "timestamp" < %(end)s)
             + (SELECT count(*) FROM audit WHERE "timestamp" >= %(start)s AND "timestamp" < %(end)s)
    """
    return conn.execute(query, {"start": window.start, "end": window.end}).fetchone()[0]


def dags_test(dag_id: str, conf: dict, *, database_uri: str, destination_uri: str) -> subprocess.CompletedProcess:
    """Run ``airflow dags test`` with the DAG settings pointing at the test database and destination."""
    env = {
        **os.environ,
        "AIRFLOW_CONN_AUDIT_DB": database_uri,
        "AUDIT_EXPORT_POSTGRES_CONN_ID": "audit_db",
        "AUDIT_EXPORT_LEGACY_TABLE": "public.audit",
        "AUDIT_EXPORT_DESTINATION": destination_uri,
        "AUDIT_EXPORT_GAP_POLICY": "backfill",
    }
    result = subprocess.run(
        [AIRFLOW, "dags", "test", dag_id, "-c", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DAG_TEST_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, f"dags test {dag_id} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def dag_runs(airflow_db: Path, dag_id: str) -> list[dict]:
    """Return the runs of ``dag_id`` in the Airflow metadata database, with ``conf`` decoded."""
    with sqlite3.connect(airflow_db) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT run_id, conf, state, run_type FROM dag_run WHERE dag_id = ? ORDER BY id", (dag_id,)
        ).fetchall()
    return [{**dict(row), "conf": json.loads(row["conf"]) if row["conf"] else None} for row in rows]


# -- exactly the rows of [from, to), legacy rows included, one UTC day per object ---------


def test_backfill_window_exact_rows(connect, source_conn_id, tmp_path):
    writer = connect()
    start = utc_midnight(10)
    end = start + timedelta(days=3)
    tie = start + timedelta(days=1, hours=12)
    legacy_tie = start + timedelta(days=2, hours=6)

    inside = insert_at(
        writer,
        [start, start + timedelta(days=1), start + timedelta(days=2), end - timedelta(microseconds=1)] + [tie] * 5,
    )
    inside += insert_rows(writer, 30, start=start, end=end, seed=1)
    inside += insert_at(writer, [start + timedelta(days=1)] + [legacy_tie] * 3, table="audit")
    outside = insert_at(writer, [start - timedelta(microseconds=1), end, end + timedelta(hours=1)])
    outside += insert_at(writer, [start - timedelta(days=1), start - timedelta(microseconds=1), end], table="audit")
    writer.execute("ANALYZE audit_partitioned")
    writer.execute("ANALYZE audit")

    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    specs, summary = run_backfill_operators(
        source_conn_id,
        destination.uri,
        start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        # Pages of one row, so that the 45 rows make one range per day (ten pages per range at least).
        page_rows=1,
        rows_per_object=3,
    )

    ids = exported_ids(destination)
    assert repeated(ids) == []
    assert sorted(ids) == sorted(inside)
    assert set(ids).isdisjoint(outside)

    assert len(specs) == 3
    assert [spec["from"] for spec in specs] == [(start + timedelta(days=d)).isoformat() for d in range(3)]

    objects = read_local_objects(destination)
    assert len(objects) > 6
    for key, data in objects.items():
        rows = decode_rows({key: data})
        assert 1 <= len(rows) <= 3, key
        assert {row_day(row) for row in rows} == {key_day(key)}, key

    window = parse_window(start, end)
    manifest = read_manifest(destination, "audit", window)
    assert manifest["totals"]["rows"] == len(inside)
    assert manifest["totals"]["objects"] == len(objects)
    assert sorted(o["key"] for o in manifest["objects"]) == sorted(objects)
    assert summary["rows"] == len(inside)


# -- deterministic keys and bytes -------------------------------------------------------


def test_backfill_rerun_same_bytes(connect, exporter_conn, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(12)
    window = parse_window(start, start + timedelta(days=4))
    insert_rows(writer, 60, start=window.start, end=window.end, seed=2)
    insert_at(writer, [start + timedelta(days=2)] * 4)
    insert_rows(writer, 10, table="audit", start=window.start, end=window.end, seed=3)
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")

    backfill_window(exporter_conn, backfill_settings, destination, window)
    first = read_local_objects(destination)
    manifest_path = destination.path_of(manifest_key("", "audit", window))
    first_manifest = manifest_path.read_bytes()
    backfill_window(exporter_conn, backfill_settings, destination, window)

    assert read_local_objects(destination) == first
    assert manifest_path.read_bytes() == first_manifest


def test_backfill_narrower_window_keeps_wider(connect, exporter_conn, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(12)
    wide = parse_window(start, start + timedelta(days=4))
    narrow = parse_window(start + timedelta(days=1, hours=6), start + timedelta(days=3))
    insert_rows(writer, 60, start=wide.start, end=wide.end, seed=4)
    insert_rows(writer, 10, table="audit", start=wide.start, end=wide.end, seed=5)
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")

    backfill_window(exporter_conn, backfill_settings, destination, wide)
    wide_objects = read_local_objects(destination)
    backfill_window(exporter_conn, backfill_settings, destination, narrow)
    after = read_local_objects(destination)

    narrow_keys = set(after) - set(wide_objects)
    assert narrow_keys
    assert {key: after[key] for key in wide_objects} == wide_objects
    narrow_ids = [row["id"] for row in decode_rows({key: after[key] for key in narrow_keys})]
    assert repeated(narrow_ids) == []
    assert len(narrow_ids) == window_row_count(exporter_conn, narrow)


def test_backfill_microsecond_apart_keys(connect, exporter_conn, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(12)
    window = parse_window(start, start + timedelta(days=2))
    longer = parse_window(start, window.end + timedelta(microseconds=1))
    insert_rows(writer, 20, start=window.start, end=window.end, seed=6)
    first = parse_destination(f"file://{tmp_path / 'first'}")
    second = parse_destination(f"file://{tmp_path / 'second'}")

    backfill_window(exporter_conn, backfill_settings, first, window)
    backfill_window(exporter_conn, backfill_settings, second, longer)

    first_keys = set(read_local_objects(first))
    second_keys = set(read_local_objects(second))
    assert first_keys
    assert len(second_keys) == len(first_keys)
    assert first_keys.isdisjoint(second_keys)
    assert manifest_key("", "audit", window) != manifest_key("", "audit", longer)


def test_backfill_other_split_same_objects(connect, exporter_conn, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(12) + timedelta(hours=5)
    window = parse_window(start, start + timedelta(days=4))
    insert_rows(writer, 80, start=window.start, end=window.end, seed=7)
    insert_rows(writer, 12, table="audit", start=window.start, end=window.end, seed=8)
    writer.execute("ANALYZE audit_partitioned")
    writer.execute("ANALYZE audit")
    single = parse_destination(f"file://{tmp_path / 'single'}")
    split = parse_destination(f"file://{tmp_path / 'split'}")

    single_ranges, _ = backfill_window(exporter_conn, backfill_settings, single, window, max_ranges=1)
    split_ranges, _ = backfill_window(exporter_conn, backfill_settings, split, window, max_ranges=5)

    assert len(single_ranges) == 1
    assert len(split_ranges) >= 3
    single_objects = read_local_objects(single)
    assert single_objects == read_local_objects(split)
    for key, data in single_objects.items():
        assert {row_day(row) for row in decode_rows({key: data})} == {key_day(key)}, key
    single_manifest = read_manifest(single, "audit", window)
    split_manifest = read_manifest(split, "audit", window)
    assert single_manifest["objects"] == split_manifest["objects"]
    assert single_manifest["totals"]["rows"] == split_manifest["totals"]["rows"]


def test_manifest_same_bytes_other_split(connect, exporter_conn, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(12)
    window = parse_window(start, start + timedelta(days=3))
    insert_rows(writer, 30, start=window.start, end=window.end, seed=9)
    single = parse_destination(f"file://{tmp_path / 'single'}")
    split = parse_destination(f"file://{tmp_path / 'split'}")

    backfill_window(exporter_conn, backfill_settings, single, window, max_ranges=1)
    backfill_window(exporter_conn, backfill_settings, split, window, max_ranges=3)

    key = manifest_key("", "audit", window)
    assert read_manifest(single, "audit", window) == read_manifest(split, "audit", window)
    assert single.path_of(key).read_bytes() == split.path_of(key).read_bytes()


def test_backfill_bytes_ignore_session_timezone(pg_cluster, database, connect, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(12)
    window = parse_window(start, start + timedelta(days=2))
    insert_rows(writer, 20, start=window.start, end=window.end, seed=17)
    utc_session = connect()
    configure_connection(utc_session)
    # A database default, like PGTZ on a worker, changes the TimeZone of every new session.
    writer.execute(sql.SQL("ALTER DATABASE {} SET timezone = 'Asia/Kolkata'").format(sql.Identifier(database)))
    kolkata_session = connect()
    configure_connection(kolkata_session)
    first = parse_destination(f"file://{tmp_path / 'first'}")
    second = parse_destination(f"file://{tmp_path / 'second'}")

    backfill_window(utc_session, backfill_settings, first, window)
    backfill_window(kolkata_session, backfill_settings, second, window)

    first_objects = read_local_objects(first)
    second_objects = read_local_objects(second)
    assert sorted(second_objects) == sorted(first_objects)
    assert decode_rows(second_objects)[0]["timestamp"] == decode_rows(first_objects)[0]["timestamp"]
    assert second_objects == first_objects


# -- rejected windows write nothing -----------------------------------------------------


def assert_nothing_written(destination: LocalDestination) -> None:
    assert files_under(destination.root) == []


def test_plan_rejects_reversed_window(source_conn_id, tmp_path):
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    cases = [
        ("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
    ]
    for window_from, window_to in cases:
        with pytest.raises(AirflowFailException) as caught:
            plan_operator(source_conn_id, destination.uri, window_from, window_to).execute({})
        assert isinstance(caught.value.__cause__, WindowError)
        message = str(caught.value)
        assert "2026-01-0" in message
        assert "is not before to" in message
        assert "swap them or widen the window" in message
    assert_nothing_written(destination)


def test_plan_rejects_naive_datetime(source_conn_id, tmp_path):
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")

    with pytest.raises(AirflowFailException) as caught:
        plan_operator(source_conn_id, destination.uri, "2026-01-01T00:00:00", "2026-01-02T00:00:00Z").execute({})

    assert isinstance(caught.value.__cause__, WindowError)
    message = str(caught.value)
    assert "'2026-01-01T00:00:00'" in message
    assert "no UTC offset" in message
    assert "2026-01-01T00:00:00Z" in message
    assert_nothing_written(destination)


def test_plan_rejects_future_window(source_conn_id, tmp_path):
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    window_from = datetime.now(UTC) + timedelta(hours=1)
    window_to = window_from + timedelta(days=1)

    with pytest.raises(AirflowFailException) as caught:
        plan_operator(source_conn_id, destination.uri, window_from.isoformat(), window_to.isoformat()).execute({})

    assert isinstance(caught.value.__cause__, WindowError)
    message = str(caught.value)
    assert window_from.isoformat() in message
    assert "in the future" in message
    assert "audit_export DAG" in message
    assert_nothing_written(destination)


def test_plan_rejects_unsettled_to(connect, exporter_conn, source_conn_id, tmp_path):
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    open_transaction = connect(autocommit=False)
    open_transaction.execute("SELECT txid_current()")
    xact_start = exporter_conn.execute(
        "SELECT xact_start FROM pg_stat_activity WHERE pid = %s", (open_transaction.info.backend_pid,)
    ).fetchone()[0]
    time.sleep(0.01)
    window_to = exporter_conn.execute("SELECT clock_timestamp()").fetchone()[0]
    window_from = window_to - timedelta(days=1)

    with pytest.raises(AirflowFailException) as caught:
        plan_operator(source_conn_id, destination.uri, window_from.isoformat(), window_to.isoformat()).execute({})

    assert isinstance(caught.value.__cause__, WindowError)
    message = str(caught.value)
    assert window_to.astimezone(UTC).isoformat() in message
    assert "not settled" in message
    assert f"backend pid {open_transaction.info.backend_pid}" in message
    match = re.search(r"The largest allowed to is (\S+) \(", message)
    assert match, message
    largest_to = datetime.fromisoformat(match.group(1))
    assert largest_to == xact_start - DEFAULT_FLOOR_MARGIN
    assert_nothing_written(destination)

    specs = plan_operator(source_conn_id, destination.uri, window_from.isoformat(), largest_to.isoformat()).execute({})
    assert specs[-1]["to"] == largest_to.astimezone(UTC).isoformat()


def test_plan_rejects_prepared_transaction(connect, source_conn_id, tmp_path):
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    gid = f"backfill-{uuid.uuid4().hex[:8]}"
    preparer = connect()
    preparer.execute("BEGIN")
    insert_rows(preparer, 1)
    preparer.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
    window_from = utc_midnight(10).isoformat()
    window_to = utc_midnight(9).isoformat()

    with pytest.raises(AirflowFailException) as caught:
        plan_operator(source_conn_id, destination.uri, window_from, window_to).execute({})

    assert isinstance(caught.value.__cause__, WindowError)
    message = str(caught.value)
    assert repr(gid) in message
    assert window_to in message
    assert "COMMIT PREPARED or ROLLBACK PREPARED" in message
    assert_nothing_written(destination)


def test_plan_rejects_role_without_stats(monkeypatch, pg_cluster, database, connect, nostats_role, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_BACKFILL_NOSTATS", pg_cluster.uri(database, user=nostats_role))
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    window_from = utc_midnight(10).isoformat()
    window_to = utc_midnight(9).isoformat()

    with pytest.raises(AirflowFailException) as caught:
        plan_operator("backfill_nostats", destination.uri, window_from, window_to).execute({})

    assert isinstance(caught.value.__cause__, WindowError)
    message = str(caught.value)
    assert window_to in message
    assert f"GRANT pg_read_all_stats TO {nostats_role};" in message
    assert_nothing_written(destination)

    connect().execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(nostats_role)))
    specs = plan_operator("backfill_nostats", destination.uri, window_from, window_to).execute({})
    assert specs[0]["from"] == window_from


# -- a failed range retried alone -------------------------------------------------------


class FailingPublishDestination:
    """A local destination whose ``publish`` raises ``OSError`` on one chosen call, as a lost upload would."""

    def __init__(self, inner: LocalDestination, fail_on_call: int) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.prefix = inner.prefix
        self.fail_on_call = fail_on_call
        self.calls = 0

    def staging_dir(self) -> str:
        return self.inner.staging_dir()

    def check_writable(self) -> None:
        self.inner.check_writable()

    def publish(self, staged_path: str, key: str) -> None:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise OSError(f"simulated upload failure of {key}")
        self.inner.publish(staged_path, key)


def test_backfill_range_retry(connect, exporter_conn, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(10)
    window = parse_window(start, start + timedelta(days=3))
    expected = insert_rows(writer, 90, start=window.start, end=window.end, seed=10)
    expected += insert_rows(writer, 15, table="audit", start=window.start, end=window.end, seed=11)
    writer.execute("ANALYZE audit_partitioned")
    writer.execute("ANALYZE audit")
    settings = dataclasses.replace(backfill_settings, rows_per_object=5)
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    tables = describe_backfill_sources(exporter_conn, settings)
    ranges = plan_ranges(exporter_conn, [table for _, table in tables], window, DEFAULT_MAX_RANGES)
    assert len(ranges) == 3

    results = {}
    for index in (0, 2):
        results[index] = export_one_range(exporter_conn, tables, destination, settings, window, ranges[index])
    others = {
        key: (destination.path_of(key).read_bytes(), destination.path_of(key).stat().st_mtime_ns)
        for result in results.values()
        for key in (o["key"] for o in result["objects"])
    }

    failing = FailingPublishDestination(destination, fail_on_call=2)
    with pytest.raises(OSError, match="simulated upload failure"):
        export_one_range(exporter_conn, tables, failing, settings, window, ranges[1])
    middle_day = f"dt={ranges[1].start.date().isoformat()}/"
    assert len([key for key in read_local_objects(destination) if key.startswith(middle_day)]) == 1
    assert files_under(Path(destination.staging_dir())) == []

    results[1] = export_one_range(exporter_conn, tables, failing, settings, window, ranges[1])
    summary = write_manifest(destination, settings.name, window, [results[i] for i in range(3)])

    assert summary["rows"] == window_row_count(exporter_conn, window)
    assert summary["rows"] == len(expected)
    assert summary["objects"] == len(read_local_objects(destination))
    ids = exported_ids(destination)
    assert repeated(ids) == []
    assert sorted(ids) == sorted(expected)
    for key, (data, mtime_ns) in others.items():
        assert destination.path_of(key).read_bytes() == data, key
        assert destination.path_of(key).stat().st_mtime_ns == mtime_ns, key


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_write_many_matches_row_writes(compression, tmp_path):
    documents = ['{"id": "1"}', '{"note": "caf\u00e9\\n"}', "{}", '{"id": "4"}']
    one_by_one = StagedObject(str(tmp_path), compression)
    for document in documents:
        one_by_one.write(document)
    one_by_one.finish()
    in_blocks = StagedObject(str(tmp_path), compression)
    in_blocks.write_many(documents[:2])
    in_blocks.write_many([])
    in_blocks.write_many(documents[2:])
    in_blocks.finish()

    assert Path(in_blocks.path).read_bytes() == Path(one_by_one.path).read_bytes()
    assert in_blocks.rows == len(documents)
    assert one_by_one.rows == len(documents)


# -- uuid ids in an unpartitioned table -------------------------------------------------


def test_backfill_uuid_unpartitioned(connect, exporter_conn, tmp_path):
    writer = connect()
    writer.execute(
        'CREATE TABLE events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "timestamp" timestamptz NOT NULL '
        "DEFAULT now(), payload text)"
    )
    writer.execute('CREATE INDEX events_timestamp_idx ON events ("timestamp")')
    writer.execute("GRANT SELECT ON events TO audit_exporter")
    start = utc_midnight(6)
    end = start + timedelta(days=2)
    insert = 'INSERT INTO events ("timestamp", payload) SELECT ts, %s FROM unnest(%s::timestamptz[]) AS u(ts) RETURNING id::text'

    spread = [start + timedelta(minutes=37 * g) for g in range(78)]
    inside_timestamps = spread + [start + timedelta(days=1)] + [end - timedelta(microseconds=1)]
    inside_timestamps += [start + timedelta(days=1, hours=5)] * 8
    inside = [row[0] for row in writer.execute(insert, ("inside", inside_timestamps)).fetchall()]
    outside_timestamps = [start - timedelta(microseconds=1), end, end + timedelta(hours=1)]
    outside = [row[0] for row in writer.execute(insert, ("outside", outside_timestamps)).fetchall()]

    settings = ExportSettings.create(
        name="events", table="public.events", page_rows=2, rows_per_object=4, lock_wait=timedelta(seconds=1)
    )
    table = describe_source(exporter_conn, settings)
    assert table.id_type == "uuid"
    assert table.partitioned is False
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")

    _, summary = backfill_window(exporter_conn, settings, destination, parse_window(start, end))

    ids = exported_ids(destination)
    assert repeated(ids) == []
    assert sorted(ids) == sorted(inside)
    assert set(ids).isdisjoint(outside)
    assert summary["rows"] == len(inside)
    for key, data in read_local_objects(destination).items():
        assert {row_day(row) for row in decode_rows({key: data})} == {key_day(key)}, key


# -- planning a long window -------------------------------------------------------------


def assert_ranges_cover(ranges: list[PageRange], window: Window) -> None:
    assert ranges[0].start == window.start
    assert ranges[-1].end == window.end
    for earlier, later in zip(ranges, ranges[1:]):
        assert earlier.end == later.start
        assert earlier.start < earlier.end
        assert later.start == later.start.replace(hour=0, minute=0, second=0, microsecond=0), later.start
        assert later.start.utcoffset() == timedelta(0)
    assert [r.index for r in ranges] == list(range(len(ranges)))


def test_plan_five_years(connect, exporter_conn, backfill_settings):
    writer = connect()
    end = utc_midnight(5)
    window = parse_window(end - timedelta(days=5 * 365 + 1) + timedelta(hours=7), end)
    insert_rows(writer, 600, start=utc_midnight(30), end=end, seed=12)
    insert_rows(writer, 200, table="audit", start=end - timedelta(days=4 * 365), end=end - timedelta(days=2 * 365))
    writer.execute("ANALYZE audit_partitioned")
    writer.execute("ANALYZE audit")
    tables = [table for _, table in describe_backfill_sources(exporter_conn, backfill_settings)]

    started = time.monotonic()
    ranges = plan_ranges(exporter_conn, tables, window, DEFAULT_MAX_RANGES)
    elapsed = time.monotonic() - started

    assert elapsed < 10, f"planning took {elapsed:.1f}s"
    assert 1 < len(ranges) <= DEFAULT_MAX_RANGES
    assert_ranges_cover(ranges, window)
    # Most estimated rows lie in the last 25 days, so balancing gives them several ranges.
    assert len([r for r in ranges if r.start >= utc_midnight(35)]) >= 3

    small = plan_ranges(exporter_conn, tables, window, 7)
    assert 1 < len(small) <= 7
    assert_ranges_cover(small, window)


def test_plan_min_range_rows_limits_small_windows(connect, exporter_conn, backfill_settings):
    writer = connect()
    start = utc_midnight(20)
    window = parse_window(start, start + timedelta(days=6))
    insert_rows(writer, 300, start=window.start, end=window.end, seed=21)
    writer.execute("ANALYZE audit_partitioned")
    writer.execute("ANALYZE audit")
    tables = [table for _, table in describe_backfill_sources(exporter_conn, backfill_settings)]
    per_day = plan_ranges(exporter_conn, tables, window, DEFAULT_MAX_RANGES)
    estimated = sum(r.estimated_rows for r in per_day)
    assert len(per_day) == 6
    assert estimated > 100

    for min_range_rows, expected_count in ((estimated + 1, 1), (estimated // 2, 2), (estimated // 3, 3), (1, 6)):
        ranges = plan_ranges(exporter_conn, tables, window, DEFAULT_MAX_RANGES, min_range_rows=min_range_rows)
        assert len(ranges) == expected_count, (min_range_rows, [r.label for r in ranges])
        assert_ranges_cover(ranges, window)
        assert sum(r.estimated_rows for r in ranges) == estimated

    with pytest.raises(ValueError, match=r"Invalid min_range_rows -1: expected zero or a positive integer"):
        plan_ranges(exporter_conn, tables, window, DEFAULT_MAX_RANGES, min_range_rows=-1)


def test_plan_capped_by_max_map_length(monkeypatch, connect, source_conn_id, tmp_path):
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "5")
    end = utc_midnight(5)
    start = end - timedelta(days=5 * 365)
    writer = connect()
    insert_rows(writer, 200, start=utc_midnight(30), end=end, seed=22)
    writer.execute("ANALYZE audit_partitioned")
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")

    # Pages of one row, so that ten pages per range allow far more than 5 ranges.
    operator = plan_operator(source_conn_id, destination.uri, start.isoformat(), end.isoformat(), page_rows=1)
    specs = operator.execute({})

    assert 1 < len(specs) <= 5
    assert specs[0]["from"] == start.isoformat()
    assert specs[-1]["to"] == end.isoformat()
    for earlier, later in zip(specs, specs[1:]):
        assert earlier["to"] == later["from"]
        assert later["from"].endswith("T00:00:00+00:00"), later["from"]


# -- gaps recorded by a re-anchor -------------------------------------------------------


def test_gap_backfill_conf_policy(exporter_conn, connect, settings):
    anchor_export(exporter_conn, settings)
    insert_rows(connect(), 2)

    result = anchor_export(exporter_conn, settings, force=True).to_xcom()

    gap = result["gap"]
    assert gap_backfill_conf(result, "backfill") == {"from": gap["from"], "to": gap["to"]}
    assert gap_backfill_conf(result, "record") is None
    assert gap_backfill_conf({"gap": None}, "backfill") is None
    with pytest.raises(ValueError, match="Invalid gap policy 'skip'"):
        gap_backfill_conf(result, "skip")


def test_gap_backfill_dag(backfill_airflow_db, pg_cluster, database, connect, exporter_conn, settings, tmp_path):
    writer = connect()
    anchor = anchor_export(exporter_conn, settings)
    before_gap = insert_at(writer, [anchor.floor - timedelta(microseconds=1)])
    in_gap = insert_at(writer, [anchor.floor])
    in_gap += insert_rows(writer, 4)
    in_gap += insert_rows(writer, 2, table="audit")
    reanchor = anchor_export(exporter_conn, settings, force=True)
    gap = reanchor.gap
    assert gap["from"] == anchor.floor.isoformat()

    open_transaction = connect(autocommit=False)
    open_transaction.execute("SELECT txid_current()")
    uncommitted = insert_at(open_transaction, [anchor.floor + timedelta(seconds=1)])
    with pytest.raises(WindowError, match="not settled"):
        check_window_settled(exporter_conn, settings, gap_window(gap))

    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    conf = gap_backfill_conf(reanchor.to_xcom(), "backfill")
    result = dags_test("audit_backfill", conf, database_uri=pg_cluster.uri(database, user=EXPORT_ROLE), destination_uri=destination.uri)

    assert "the settled check is skipped" in result.stdout + result.stderr
    ids = exported_ids(destination)
    assert repeated(ids) == []
    assert sorted(ids) == sorted(in_gap)
    assert set(ids).isdisjoint(before_gap + uncommitted)
    gaps = exporter_conn.execute("SELECT gaps FROM audit_export_state WHERE export_name = 'audit'").fetchone()[0]
    assert len(gaps) == 1
    assert gaps[0]["backfill"] == "done"
    assert gaps[0]["backfill_result"]["rows"] == len(in_gap)
    assert gaps[0]["backfill_result"]["manifest"] == manifest_key("", "audit", gap_window(gap))


def test_reanchor_dag_triggers_backfill(backfill_airflow_db, pg_cluster, database, connect, exporter_conn, settings, tmp_path):
    anchor_export(exporter_conn, settings)
    insert_rows(connect(), 3)
    destination_uri = f"file://{tmp_path / 'bucket'}"

    dags_test("audit_export", {"reanchor": True}, database_uri=pg_cluster.uri(database, user=EXPORT_ROLE), destination_uri=destination_uri)

    gaps = exporter_conn.execute("SELECT gaps FROM audit_export_state WHERE export_name = 'audit'").fetchone()[0]
    assert len(gaps) == 1
    expected_conf = {"from": gaps[0]["from"], "to": gaps[0]["to"]}
    triggered = [run for run in dag_runs(backfill_airflow_db, "audit_backfill") if run["conf"] == expected_conf]
    assert len(triggered) == 1, dag_runs(backfill_airflow_db, "audit_backfill")
    # `airflow dags test` creates the triggered run but runs no scheduler, so the run stays queued.
    assert triggered[0]["run_type"] == "operator_triggered"
    assert triggered[0]["state"] == "queued"


# -- labels of the mapped range tasks ---------------------------------------------------


def test_backfill_dag_range_labels(backfill_airflow_db, pg_cluster, database, connect, exporter_conn, backfill_settings, tmp_path):
    writer = connect()
    start = utc_midnight(14)
    window = parse_window(start, start + timedelta(days=5))
    expected = insert_rows(writer, 200, start=window.start, end=window.end, seed=13)
    expected += insert_rows(writer, 30, table="audit", start=window.start, end=window.end, seed=14)
    insert_at(writer, [window.start - timedelta(microseconds=1), window.end])
    writer.execute("ANALYZE audit_partitioned")
    writer.execute("ANALYZE audit")
    tables = [table for _, table in describe_backfill_sources(exporter_conn, backfill_settings)]
    # Ten pages of 8 rows per range at least: the 230 rows make 2 ranges, where 5 days would allow 5.
    conf = {"from": start.isoformat(), "to": window.end.isoformat(), "page_rows": 8}
    planned = plan_ranges(exporter_conn, tables, window, DEFAULT_MAX_RANGES, min_range_rows=MIN_PAGES_PER_RANGE * 8)
    expected_labels = [r.label for r in planned]
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")

    dags_test("audit_backfill", conf, database_uri=pg_cluster.uri(database, user=EXPORT_ROLE), destination_uri=destination.uri)

    ids = exported_ids(destination)
    assert repeated(ids) == []
    assert sorted(ids) == sorted(expected)
    assert read_manifest(destination, "audit", window)["totals"]["rows"] == len(expected)

    runs = [run for run in dag_runs(backfill_airflow_db, "audit_backfill") if run["conf"] == conf]
    assert len(runs) == 1
    assert runs[0]["state"] == "success"
    with sqlite3.connect(backfill_airflow_db) as db:
        rows = db.execute(
            "SELECT map_index, rendered_map_index FROM task_instance WHERE dag_id = 'audit_backfill' "
            "AND run_id = ? AND task_id = 'export_range' ORDER BY map_index",
            (runs[0]["run_id"],),
        ).fetchall()
    labels = [label for _, label in rows]
    assert [index for index, _ in rows] == list(range(len(expected_labels)))
    assert labels == expected_labels
    assert len(labels) == 2
    for label in labels:
        assert DAY_LABEL.match(label), label


# -- S3 and local destinations ----------------------------------------------------------


def test_backfill_s3_matches_local(monkeypatch, s3_server, connect, exporter_conn, backfill_settings, tmp_path):
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN_ID.upper()}", s3_server.airflow_connection_uri())
    bucket = f"backfill-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    prefix = "exports/audit"
    writer = connect()
    start = utc_midnight(9)
    window = parse_window(start + timedelta(hours=3), start + timedelta(days=2))
    insert_rows(writer, 40, start=window.start, end=window.end, seed=15)
    insert_rows(writer, 6, table="audit", start=window.start, end=window.end, seed=16)
    local = parse_destination(f"file://{tmp_path / 'bucket'}")
    s3 = parse_destination(f"s3://{bucket}/{prefix}", aws_conn_id=S3_CONN_ID)

    backfill_window(exporter_conn, backfill_settings, local, window)
    backfill_window(exporter_conn, backfill_settings, s3, window)

    local_objects = read_local_objects(local)
    s3_keys = s3_server.list_keys(bucket)
    assert all(key.startswith(f"{prefix}/") for key in s3_keys), s3_keys
    s3_objects = {
        key.removeprefix(f"{prefix}/"): s3_server.get_bytes(bucket, key) for key in s3_keys if ".ndjson" in key
    }
    assert local_objects
    assert s3_objects == local_objects

    local_manifest = read_manifest(local, "audit", window)
    s3_manifest = json.loads(s3_server.get_bytes(bucket, manifest_key(prefix, "audit", window)))
    for entry in s3_manifest["objects"]:
        entry["key"] = entry["key"].removeprefix(f"{prefix}/")
    assert s3_manifest == local_manifest
