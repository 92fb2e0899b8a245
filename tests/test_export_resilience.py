"""Resilience of the steady-state export against a real PostgreSQL server and a real S3 API server.

Each test stops runs at chosen points, runs exports concurrently, takes away
privileges or sets a tight ``statement_timeout``, then checks the exact set of
exported ids and the bytes of every object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from airflow_audit_export.testing.objects import decode_rows, exported_ids, read_local_objects
from psycopg import sql

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.exporting import run_export
from airflow_audit_export.lineage import read_marker
from airflow_audit_export.observation import take_observation
from airflow_audit_export.settings import split_qualified_name
from airflow_audit_export.source import configure_connection
from airflow_audit_export.state import CursorRegressionError, ExportState, LockNotAcquired, StateStore
from airflow_audit_export.testing.schema import create_reference_schema, generate_history, insert_rows
from airflow_audit_export.writing import DestinationError, parse_destination

NOSTATS_ROLE = "exporter_nostats"
S3_CONN_ID = "test_s3"
S3_PREFIX = "some/prefix"


class StopRun(Exception):
    """Raised from ``on_progress`` to stop a run at a chosen event, as a crash would."""


# -- helpers ---------------------------------------------------------------------------------


def with_settings(settings, **changes):
    """Return validated settings with ``changes`` applied."""
    changed = dataclasses.replace(settings, **changes)
    changed.validate()
    return changed


def stop_at(event: str, occurrence: int = 1, seen: list[dict] | None = None):
    """Build an ``on_progress`` callback that raises :class:`StopRun` at the n-th ``event``.

    The details of every matching event, including the one that stops the run,
    are appended to ``seen``.
    """
    count = 0

    def callback(name: str, details: dict) -> None:
        nonlocal count
        if name != event:
            return
        count += 1
        if seen is not None:
            seen.append(dict(details))
        if count == occurrence:
            raise StopRun(f"stopped at {event} #{occurrence}")

    return callback


def record_events(events: list[tuple[str, dict]]):
    """Build an ``on_progress`` callback that appends every event and its details to ``events``."""

    def callback(name: str, details: dict) -> None:
        events.append((name, dict(details)))

    return callback


def exporter(connect, user: str | None = None) -> psycopg.Connection:
    """Open a connection configured as the operators configure theirs."""
    conn = connect(user)
    configure_connection(conn)
    return conn


def read_cursor(conn: psycopg.Connection, settings) -> int:
    """Read ``cursor_xid`` of the export straight from its state table."""
    schema, table = split_qualified_name(settings.state_table, what="state_table")
    query = sql.SQL("SELECT cursor_xid FROM {} WHERE export_name = %s").format(sql.Identifier(schema, table))
    return conn.execute(query, (settings.name,)).fetchone()[0]


def load_state(conn: psycopg.Connection, settings) -> ExportState:
    state = StateStore(conn, settings.state_table).load(settings.name)
    assert state is not None, f"export {settings.name!r} has no state row in {settings.state_table}"
    return state


def insert_spread_rows(conn: psycopg.Connection, count: int, *, start: datetime, seed: int) -> list[int]:
    """Insert ``count`` rows stamped over ``[start, start + 2 days)`` in one transaction.

    Two days of timestamps make the export cut objects at UTC day boundaries.
    The reference schema has partitions up to three days ahead.
    """
    return insert_rows(conn, count, start=start, end=start + timedelta(days=2), seed=seed)


def recent_start() -> datetime:
    """Return a start time 20 s ago: above an anchor floor taken earlier with the default 60 s margin."""
    return datetime.now(timezone.utc) - timedelta(seconds=20)


def normalize_xid_range(key: str) -> str:
    """Replace the xid range in a steady-state key, which differs between databases of one cluster."""
    return re.sub(r"_xmin_\d+-\d+_", "_xmin_LO-HI_", key)


def key_sequence(key: str) -> int:
    return int(re.search(r"_xmin_\d+-\d+_(\d+)\.ndjson", key).group(1))


def key_xid_range(key: str) -> str:
    return re.search(r"_xmin_(\d+-\d+)_", key).group(1)


def s3_objects(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Return every object under ``prefix`` keyed by its key with the prefix removed."""
    objects = {}
    for key in s3_server.list_keys(bucket):
        assert key.startswith(prefix + "/"), f"S3 key {key!r} is outside the prefix {prefix!r}"
        objects[key.removeprefix(prefix + "/")] = s3_server.get_bytes(bucket, key)
    return objects


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def second_database_conn(pg_cluster):
    """A configured connection to a second fresh database with the same reference schema."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    today = datetime.now(timezone.utc).date()
    conn = pg_cluster.connect(name)
    create_reference_schema(conn, first_day=today - timedelta(days=40), last_day=today + timedelta(days=3))
    configure_connection(conn)
    yield conn
    conn.close()
    with pg_cluster.connect() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def nostats_role(connect):
    """A login role with SELECT on the audit tables and CREATE on schema public, without ``pg_read_all_stats``."""
    admin = connect()
    role = sql.Identifier(NOSTATS_ROLE)
    # Roles are cluster-wide, so a role left by an interrupted session is replaced.
    admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    admin.execute(sql.SQL("GRANT SELECT ON public.audit_partitioned, public.audit TO {}").format(role))
    admin.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))
    admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON public.audit_export_state TO {}").format(role))
    yield NOSTATS_ROLE
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (NOSTATS_ROLE,))
    admin.execute(sql.SQL("DROP OWNED BY {}").format(role))
    admin.execute(sql.SQL("DROP ROLE {}").format(role))


@pytest.fixture
def s3_connection(s3_server, monkeypatch):
    """Define the Airflow connection ``test_s3`` pointing at the loopback S3 server."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN_ID.upper()}", s3_server.airflow_connection_uri())
    return S3_CONN_ID


# -- stopped before the cursor commit -----------------------------------------------------


def test_export_retry_before_commit(exporter_conn, connect, settings, local_destination):
    anchor = anchor_export(exporter_conn, settings)
    writer = connect()
    ids = insert_spread_rows(writer, 90, start=recent_start(), seed=1)
    ids += insert_rows(writer, 15)

    with pytest.raises(StopRun):
        run_export(exporter_conn, settings, local_destination, on_progress=stop_at("before_commit"))

    crashed_state = load_state(exporter_conn, settings)
    assert crashed_state.cursor_xid == anchor.cursor
    assert crashed_state.pending is not None
    snapshot = read_local_objects(local_destination)
    assert len(snapshot) >= 3, "the rows span three UTC days, so at least three objects are expected"
    assert sorted(row["id"] for row in decode_rows(snapshot)) == sorted(ids)

    stats = run_export(exporter_conn, settings, local_destination)

    assert stats["completed"] is True
    assert stats["rows"] == len(ids)
    assert stats["objects"] == len(snapshot)
    assert read_local_objects(local_destination) == snapshot
    assert sorted(exported_ids(local_destination)) == sorted(ids)
    committed = load_state(exporter_conn, settings)
    assert committed.pending is None
    assert committed.cursor_xid == stats["hi"]
    assert committed.cursor_xid > anchor.cursor


# -- stopped between publishing an object and saving its position ----------------------------


def test_export_retry_after_publish(exporter_conn, second_database_conn, connect, settings, local_destination, tmp_path):
    clean_conn = second_database_conn
    anchor_export(exporter_conn, settings)
    anchor_export(clean_conn, settings)

    # The same arguments in two fresh databases give the same ids, timestamps and values.
    start = recent_start()
    ids = insert_spread_rows(connect(), 120, start=start, seed=2)
    clean_ids = insert_spread_rows(clean_conn, 120, start=start, seed=2)
    assert ids == clean_ids

    published: list[dict] = []
    with pytest.raises(StopRun):
        run_export(exporter_conn, settings, local_destination, on_progress=stop_at("object_published", 2, published))

    crashed_key = published[-1]["key"]
    assert published[-1]["sequence"] == 2
    assert load_state(exporter_conn, settings).pending["sequence"] == 1
    crashed_path = local_destination.path_of(crashed_key)
    crashed_bytes = crashed_path.read_bytes()
    # Deleting the object shows that the retry writes it again rather than leaving it in place.
    crashed_path.unlink()

    stats = run_export(exporter_conn, settings, local_destination)

    assert stats["completed"] is True
    assert crashed_path.read_bytes() == crashed_bytes
    objects = read_local_objects(local_destination)
    assert sorted(key_sequence(key) for key in objects) == list(range(1, len(objects) + 1))
    assert len({key_xid_range(key) for key in objects}) == 1
    assert sorted(exported_ids(local_destination)) == sorted(ids)

    clean_destination = parse_destination(f"file://{tmp_path / 'clean'}")
    clean_stats = run_export(clean_conn, settings, clean_destination)
    assert clean_stats["completed"] is True
    clean_objects = read_local_objects(clean_destination)
    assert {normalize_xid_range(k): v for k, v in objects.items()} == {
        normalize_xid_range(k): v for k, v in clean_objects.items()
    }


# -- two runs at once, and the cursor never moving back -------------------------------------


def test_export_concurrent_run_rejected(connect, settings, local_destination):
    observer = connect()
    first_conn = exporter(connect)
    second_conn = exporter(connect)
    anchor_export(first_conn, settings)
    cursors = [read_cursor(observer, settings)]
    ids = insert_spread_rows(connect(), 50, start=recent_start(), seed=3)

    paused = threading.Event()
    release = threading.Event()
    outcome: dict = {}

    def pause_at_first_object(event: str, details: dict) -> None:
        if event == "object_published" and not paused.is_set():
            paused.set()
            release.wait(timeout=60)

    def first_run() -> None:
        try:
            outcome["stats"] = run_export(first_conn, settings, local_destination, on_progress=pause_at_first_object)
        except BaseException as err:  # reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=first_run, name="first-export-run")
    thread.start()
    try:
        assert paused.wait(timeout=30), "the first run never published an object"
        objects_while_paused = read_local_objects(local_destination)
        state_while_paused = load_state(observer, settings)

        with pytest.raises(LockNotAcquired) as raised:
            run_export(second_conn, settings, local_destination)
        message = str(raised.value)
        assert repr(settings.name) in message
        assert "locked by another run" in message
        assert str(first_conn.info.backend_pid) in message

        with pytest.raises(LockNotAcquired):
            anchor_export(second_conn, settings, force=True)

        assert read_local_objects(local_destination) == objects_while_paused
        assert load_state(observer, settings) == state_while_paused
        cursors.append(read_cursor(observer, settings))
    finally:
        release.set()
        thread.join(timeout=60)

    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["stats"]["completed"] is True
    cursors.append(read_cursor(observer, settings))
    assert sorted(exported_ids(local_destination)) == sorted(ids)

    more_ids = insert_rows(connect(), 10)
    for _ in range(3):
        run_export(second_conn, settings, local_destination)
        cursors.append(read_cursor(observer, settings))

    assert sorted(exported_ids(local_destination)) == sorted(ids + more_ids)
    assert cursors == sorted(cursors), f"the cursor moved backwards: {cursors}"
    assert cursors[-1] > cursors[0]


def test_state_update_rejects_regression(exporter_conn, connect, settings, local_destination):
    anchor_export(exporter_conn, settings)
    insert_rows(connect(), 5)
    run_export(exporter_conn, settings, local_destination)
    store = StateStore(exporter_conn, settings.state_table)
    before = store.load(settings.name)

    with pytest.raises(CursorRegressionError) as raised:
        store.update(settings.name, new_cursor=before.cursor_xid - 1, pending={"lo": 0}, last_run={"rows": 0})

    assert str(before.cursor_xid) in str(raised.value)
    assert store.load(settings.name) == before
    assert read_cursor(connect(), settings) == before.cursor_xid


# -- a role without pg_read_all_stats -----------------------------------------------------


def test_export_without_stats_grant(connect, nostats_role, settings, local_destination):
    # With no margin, a floor taken from the anchor's clock alone would be above
    # the late row's timestamp, so only the fallback window can export that row.
    settings = with_settings(settings, floor_margin=timedelta(0))
    conn = exporter(connect, nostats_role)
    superuser = connect()
    late = connect(autocommit=False)
    late.execute("SELECT 1")  # opens the superuser transaction that writes after the anchor
    time.sleep(0.2)

    before_anchor = datetime.now(timezone.utc)
    anchor = anchor_export(conn, settings)

    assert anchor.floor_trusted is False
    assert "pg_read_all_stats" in anchor.floor_untrusted_reason
    assert abs(anchor.floor - (before_anchor - settings.fallback_window)) < timedelta(seconds=10)

    ids = insert_spread_rows(superuser, 40, start=recent_start(), seed=4)
    late_ids = insert_rows(late, 3)
    late_stamp = late.execute("SELECT min(timestamp) FROM audit_partitioned WHERE id = ANY(%s)", (late_ids,)).fetchone()[0]
    assert late_stamp < before_anchor

    events: list[tuple[str, dict]] = []
    open_run_started = datetime.now(timezone.utc)
    open_run = run_export(conn, settings, local_destination, on_progress=record_events(events))
    late.commit()
    late_run_started = datetime.now(timezone.utc)
    late_run = run_export(conn, settings, local_destination, on_progress=record_events(events))

    planned = [details for name, details in events if name == "planned"]
    assert len(planned) == 2
    for details in planned:
        assert details["floor_trusted"] is False
        assert "pg_read_all_stats" in details["floor_untrusted_reason"]
    # Each untrusted observation moves the floor to its own clock minus the fallback window.
    for stats, run_started in ((open_run, open_run_started), (late_run, late_run_started)):
        assert stats["completed"] is True
        assert stats["floor_trusted"] is False
        floor = datetime.fromisoformat(stats["floor"])
        assert abs(floor - (run_started - settings.fallback_window)) < timedelta(seconds=10)
    assert open_run["rows"] == len(ids)
    assert late_run["rows"] == len(late_ids)
    assert sorted(exported_ids(local_destination)) == sorted(ids + late_ids)

    superuser.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(nostats_role)))
    observation = take_observation(conn, floor_margin=settings.floor_margin, fallback_window=settings.fallback_window)
    assert observation.trusted is True
    assert observation.untrusted_reason is None

    runs_until_trusted = 0
    while not load_state(conn, settings).cursor_floor_trusted and runs_until_trusted < 2:
        run_export(conn, settings, local_destination)
        runs_until_trusted += 1
    state = load_state(conn, settings)
    assert state.cursor_floor_trusted is True, f"cursor floor still untrusted after {runs_until_trusted} runs"
    assert state.floor_untrusted_reason is None
    assert state.cursor_floor > datetime.now(timezone.utc) - timedelta(minutes=5)
    assert sorted(exported_ids(local_destination)) == sorted(ids + late_ids)


# -- a large backlog under a one-second statement_timeout -----------------------------------


def test_export_drains_backlog_under_timeout(connect, database, settings, local_destination, caplog):
    rows = 500_000
    settings = with_settings(
        settings,
        page_rows=10_000,
        rows_per_object=100_000,
        max_rows_per_run=100_000,
        fallback_window=timedelta(days=31),
    )
    admin = connect()

    # The backlog is stamped over the last 30 days but must commit after the anchor.
    # A prepared transaction open at the anchor makes the anchor floor fall back to
    # now - fallback_window (31 days), because its start time is unknown. It only
    # pins the anchor and is rolled back before the backlog is written.
    admin.execute("BEGIN")
    insert_rows(admin, 1, table="audit")
    admin.execute("PREPARE TRANSACTION 'pin_anchor_floor'")
    anchor = anchor_export(exporter(connect), settings)
    admin.execute("ROLLBACK PREPARED 'pin_anchor_floor'")
    assert "prepared transactions" in anchor.floor_untrusted_reason
    assert anchor.floor < datetime.now(timezone.utc) - timedelta(days=30, minutes=1)

    generate_history(admin, rows, days=30, end=datetime.now(timezone.utc))

    # ALTER DATABASE applies to sessions opened afterwards, so only the exporter below runs under it.
    admin.execute(sql.SQL("ALTER DATABASE {} SET statement_timeout = '1s'").format(sql.Identifier(database)))
    conn = exporter(connect)
    assert conn.execute("SHOW statement_timeout").fetchone()[0] == "1s"

    caplog.set_level(logging.WARNING, logger="airflow_audit_export.reading")
    runs = []
    started = time.monotonic()
    while len(runs) < 20:
        runs.append(run_export(conn, settings, local_destination))
        if runs[-1]["completed"] and not runs[-1]["draining"]:
            break
    drain_seconds = time.monotonic() - started

    assert runs[-1]["completed"] is True
    assert runs[-1]["draining"] is False
    assert len(runs) > 1, "max_rows_per_run should split the drain over several runs"
    statements = sum(run["statements"] for run in runs)
    slowest = max(run["slowest_statement_seconds"] for run in runs)
    cancelled = sum("cancelled" in record.getMessage() for record in caplog.records)
    print(
        f"\ndrain of {rows} rows: {len(runs)} runs, {statements} statements, slowest statement "
        f"{slowest:.3f}s, {cancelled} statements cancelled and retried narrower, {drain_seconds:.1f}s"
    )
    assert slowest < 1.0

    exported = exported_ids(local_destination)
    count, distinct, min_id, max_id = admin.execute(
        "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM audit_partitioned"
    ).fetchone()
    assert count == rows
    assert distinct == rows
    assert len(exported) == rows
    assert len(set(exported)) == rows
    assert min(exported) == min_id
    assert max(exported) == max_id
    source_ids = {row[0] for row in admin.execute("SELECT id FROM audit_partitioned").fetchall()}
    assert set(exported) == source_ids
    # A run's rows count every row of its pending xid range so far, including earlier attempts.
    assert runs[-1]["rows"] == rows


# -- S3 and local destinations --------------------------------------------------------------


def test_s3_and_local_objects_match(exporter_conn, connect, settings, local_destination, s3_server, s3_connection):
    bucket = f"audit-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    s3_destination = parse_destination(f"s3://{bucket}/{S3_PREFIX}", aws_conn_id=s3_connection)
    s3_settings = with_settings(settings, state_table="public.state_s3")
    # A second state table needs CREATE, which the least-privilege role lacks by design.
    connect().execute("GRANT CREATE ON SCHEMA public TO audit_exporter")

    # Keys carry the xid range [lo, hi). An open transaction holding an xid keeps
    # the snapshot xmin, and so the planned lo and hi, the same for both exports
    # although each anchor and run writes its own state row.
    pin = connect(autocommit=False)
    pin.execute("SELECT pg_current_xact_id()")
    local_anchor = anchor_export(exporter_conn, settings)
    s3_anchor = anchor_export(exporter_conn, s3_settings)
    pin.rollback()
    assert local_anchor.cursor == s3_anchor.cursor
    assert read_cursor(exporter_conn, settings) == read_cursor(exporter_conn, s3_settings)

    writer = connect()
    ids = insert_spread_rows(writer, 70, start=recent_start(), seed=6)
    ids += insert_rows(writer, 8)

    pin.execute("SELECT pg_current_xact_id()")
    local_stats = run_export(exporter_conn, settings, local_destination)
    s3_stats = run_export(exporter_conn, s3_settings, s3_destination)
    pin.rollback()

    assert (local_stats["lo"], local_stats["hi"]) == (s3_stats["lo"], s3_stats["hi"])
    assert read_cursor(exporter_conn, settings) == read_cursor(exporter_conn, s3_settings)
    local_objects = read_local_objects(local_destination)
    remote_files = s3_objects(s3_server, bucket, S3_PREFIX)
    remote_marker = remote_files.pop("lineage/audit.json")
    remote_objects = remote_files
    assert len(local_objects) >= 3
    assert sorted(remote_objects) == sorted(local_objects)
    s3_state = StateStore(exporter_conn, "public.state_s3").load("audit")
    assert json.loads(remote_marker)["token"] == s3_state.lineage_token
    assert read_marker(s3_destination, "audit").cursor == s3_stats["lo"]
    for key, data in local_objects.items():
        assert remote_objects[key] == data, f"object {key} differs between S3 and the local folder"
    assert sorted(exported_ids(local_destination)) == sorted(ids)
    assert sorted(row["id"] for row in decode_rows(remote_objects)) == sorted(ids)


def test_s3_missing_bucket_rejected(exporter_conn, connect, settings, s3_connection):
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    destination = parse_destination(f"s3://{bucket}/{S3_PREFIX}", aws_conn_id=s3_connection)
    anchor_export(exporter_conn, settings)
    insert_rows(connect(), 5)
    before = load_state(exporter_conn, settings)

    with pytest.raises(DestinationError) as raised:
        run_export(exporter_conn, settings, destination)

    assert repr(bucket) in str(raised.value)
    after = load_state(exporter_conn, settings)
    assert after.pending is None
    assert after == before
