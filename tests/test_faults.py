"""Fault injection into steady-state export runs: killed processes, S3 API errors, a PostgreSQL restart.

Every test exports the same rows twice. A reference export runs without
faults into its own state row and destination. The export under test meets
the fault, then retries. An open transaction with an assigned xid pins the
snapshot ``xmin``, so both exports cover the same xid range ``[lo, hi)`` and
must produce the same keys with the same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import signal
import subprocess
import sys
import time
import types
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.exporting import run_export
from airflow_audit_export.operators import xmin_export
from airflow_audit_export.operators.xmin_export import XminExportOperator
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import configure_connection
from airflow_audit_export.state import ExportState, StateStore
from airflow_audit_export.testing.faultproxy import FaultProxy
from airflow_audit_export.testing.objects import decode_rows, exported_ids, read_local_objects
from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY
from airflow_audit_export.testing.schema import EXPORT_ROLE, apply_export_role, create_reference_schema, insert_rows
from airflow_audit_export.writing import LocalDestination, PublishError, parse_destination

REFERENCE_STATE_TABLE = "public.reference_state"
#: Part of every data object's key. The faults target these uploads, and other objects, such as a marker, pass.
DATA_OBJECT = ".ndjson"
S3_PREFIX = "faults/audit"
FAULTY_S3_CONN_ID = "faulty_s3"
SOURCE_CONN_ID = "fault_source"
CHILD_TIMEOUT_SECONDS = 120
BACKEND_EXIT_TIMEOUT_SECONDS = 10

#: Runs one export attempt in a fresh interpreter and kills it with SIGKILL at the chosen step.
#: The step ``observed`` lies between the observation and the write of the pending range, where
#: ``run_export`` has no progress event, so the child wraps ``plan_xid_range`` to reach it.
KILLED_EXPORT_SCRIPT = """
import json, os, signal, sys

import psycopg

from airflow_audit_export import exporting
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import configure_connection
from airflow_audit_export.writing import parse_destination

request = json.loads(sys.argv[1])
kill_event = request["event"]
kill_occurrence = request["occurrence"]
seen = 0


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def on_progress(event, details):
    global seen
    if event == kill_event:
        seen += 1
        if seen == kill_occurrence:
            kill_self()


if kill_event == "observed":
    plan_xid_range = exporting.plan_xid_range

    def plan_then_die(*args, **kwargs):
        plan_xid_range(*args, **kwargs)
        kill_self()

    exporting.plan_xid_range = plan_then_die

conn = psycopg.connect(request["conninfo"])
configure_connection(conn)
print(conn.info.backend_pid, flush=True)
settings = ExportSettings.create(**request["settings"])
destination = parse_destination(request["destination"])
stats = exporting.run_export(conn, settings, destination, on_progress=on_progress)
print(json.dumps({"completed": stats["completed"], "objects": stats["objects"]}), flush=True)
"""


# -- helpers ---------------------------------------------------------------------------------


def recent_start() -> datetime:
    """Return a start time 20 s ago: above an anchor floor taken earlier with the default 60 s margin."""
    return datetime.now(timezone.utc) - timedelta(seconds=20)


def insert_test_rows(conn: psycopg.Connection, seed: int) -> list[int]:
    """Insert rows over two UTC days plus a few stamped now, so the export cuts objects by size and by day."""
    start = recent_start()
    ids = insert_rows(conn, 90, start=start, end=start + timedelta(days=2), seed=seed)
    ids += insert_rows(conn, 15)
    return ids


def load_state(conn: psycopg.Connection, settings: ExportSettings) -> ExportState:
    state = StateStore(conn, settings.state_table).load(settings.name)
    assert state is not None, f"export {settings.name!r} has no state row in {settings.state_table}"
    return state


def staging_files(destination: LocalDestination) -> list[str]:
    staging = Path(destination.root) / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def s3_objects(s3_server, bucket: str) -> dict[str, bytes]:
    """Return every data object in ``bucket`` keyed by its key with ``S3_PREFIX`` removed."""
    objects = {}
    for key in s3_server.list_keys(bucket):
        assert key.startswith(S3_PREFIX + "/"), f"S3 key {key!r} is outside the prefix {S3_PREFIX!r}"
        if DATA_OBJECT in key:
            objects[key.removeprefix(S3_PREFIX + "/")] = s3_server.get_bytes(bucket, key)
    return objects


def aws_connection_uri(endpoint_url: str, multipart_threshold: int | None = None, **config_kwargs) -> str:
    """Build an Airflow ``aws`` connection URI for ``endpoint_url`` with botocore ``Config`` options.

    A ``multipart_threshold`` in bytes goes into the S3 hook's transfer settings.
    """
    extra = {"endpoint_url": endpoint_url, "region_name": REGION, "config_kwargs": config_kwargs}
    if multipart_threshold is not None:
        extra["service_config"] = {"s3": {"transfer_config_args": {"multipart_threshold": multipart_threshold}}}
    return f"aws://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@/?{urlencode({'__extra__': json.dumps(extra)})}"


def occurrence_of(position: str, objects: int) -> int:
    """Map ``first``, ``middle`` or ``last`` onto an object's sequence number among ``objects``."""
    return {"first": 1, "middle": (objects + 1) // 2, "last": objects}[position]


def wait_for_backend_exit(admin: psycopg.Connection, pid: int) -> None:
    """Wait until the server has ended the killed client's backend, which releases its advisory lock."""
    deadline = time.monotonic() + BACKEND_EXIT_TIMEOUT_SECONDS
    while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
        assert time.monotonic() < deadline, f"backend {pid} of the killed export is still running"
        time.sleep(0.05)


@dataclasses.dataclass
class TwinExports:
    """An export under test and a reference export of the same rows over the same xid range."""

    settings: ExportSettings
    destination: LocalDestination
    anchor_cursor: int
    ids: list[int]
    reference: dict
    reference_objects: dict[str, bytes]
    pin: psycopg.Connection

    def assert_matches_reference(self, objects: dict[str, bytes], stats: dict) -> None:
        assert stats["completed"] is True
        assert (stats["lo"], stats["hi"]) == (self.reference["lo"], self.reference["hi"])
        assert stats["rows"] == len(self.ids)
        assert sorted(objects) == sorted(self.reference_objects)
        for key, data in self.reference_objects.items():
            assert objects[key] == data, f"object {key} differs from the reference export"
        exported = [row["id"] for row in decode_rows(objects)]
        assert len(exported) == len(set(exported)), "a row was exported twice"
        assert sorted(exported) == sorted(self.ids)


def prepare_twin_exports(
    connect, exporter_conn: psycopg.Connection, settings: ExportSettings, tmp_path: Path, *, seed: int
) -> TwinExports:
    """Anchor both exports at one cursor, insert rows, pin ``hi`` and run the reference export.

    The returned ``pin`` transaction stays open, so a retry that plans again
    gets the same ``hi``. Closing the test's connections rolls it back.
    """
    reference_conn = connect()
    configure_connection(reference_conn)
    reference_settings = dataclasses.replace(settings, state_table=REFERENCE_STATE_TABLE)
    reference_destination = parse_destination(f"file://{tmp_path / 'reference'}")

    pin = connect(autocommit=False)
    pin.execute("SELECT pg_current_xact_id()")
    anchor = anchor_export(exporter_conn, settings)
    reference_anchor = anchor_export(reference_conn, reference_settings)
    pin.rollback()
    assert anchor.cursor == reference_anchor.cursor

    ids = insert_test_rows(connect(), seed)
    pin.execute("SELECT pg_current_xact_id()")
    reference = run_export(reference_conn, reference_settings, reference_destination)
    reference_objects = read_local_objects(reference_destination)
    assert reference["completed"] is True
    assert len(reference_objects) >= 3, "first, middle and last object must differ"
    assert sorted(exported_ids(reference_destination)) == sorted(ids)

    return TwinExports(
        settings=settings,
        destination=parse_destination(f"file://{tmp_path / 'bucket'}"),
        anchor_cursor=anchor.cursor,
        ids=ids,
        reference=reference,
        reference_objects=reference_objects,
        pin=pin,
    )


def run_killed_export(
    conninfo: str, settings: ExportSettings, destination_uri: str, event: str, occurrence: int
) -> tuple[int, str]:
    """Run one export attempt in a child process that SIGKILLs itself at ``event`` number ``occurrence``.

    Returns the child's exit code and its backend pid as printed on its first output line.
    """
    request = {
        "conninfo": conninfo,
        "settings": {
            "name": settings.name,
            "table": settings.table,
            "page_rows": settings.page_rows,
            "rows_per_object": settings.rows_per_object,
            "lock_wait": settings.lock_wait.total_seconds(),
        },
        "destination": destination_uri,
        "event": event,
        "occurrence": occurrence,
    }
    result = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT_SCRIPT, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == -signal.SIGKILL, f"the child was not killed at {event} #{occurrence}:\n{output}"
    return int(result.stdout.split()[0]), output


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def twins(connect, exporter_conn, settings, tmp_path) -> TwinExports:
    return prepare_twin_exports(connect, exporter_conn, settings, tmp_path, seed=21)


@pytest.fixture
def fault_proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def faulty_bucket(s3_server) -> str:
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return bucket


def use_faulty_s3(monkeypatch, proxy: FaultProxy, multipart_threshold: int | None = None, **config_kwargs) -> str:
    """Define the Airflow connection ``faulty_s3`` through the proxy. Botocore retries twice unless overridden."""
    options = {"retries": {"mode": "standard", "total_max_attempts": 3}, "connect_timeout": 2, "read_timeout": 5}
    options.update(config_kwargs)
    uri = aws_connection_uri(proxy.endpoint_url, multipart_threshold, **options)
    monkeypatch.setenv(f"AIRFLOW_CONN_{FAULTY_S3_CONN_ID.upper()}", uri)
    return FAULTY_S3_CONN_ID


def export_operator(
    destination_uri: str, settings: ExportSettings, aws_conn_id: str | None = None
) -> XminExportOperator:
    return XminExportOperator(
        task_id="export",
        export_name=settings.name,
        table=settings.table,
        destination=destination_uri,
        postgres_conn_id=SOURCE_CONN_ID,
        aws_conn_id=aws_conn_id,
        tuning={"page_rows": settings.page_rows, "rows_per_object": settings.rows_per_object, "lock_wait": 1},
    )


def operator_context() -> dict:
    """A minimal task context: the operator only sets the extra of its Asset event in it."""
    return {"outlet_events": collections.defaultdict(types.SimpleNamespace)}


# -- a killed process, at every step of a run ------------------------------------------------

KILL_POINTS = [
    pytest.param("observed", "first", id="after-observation"),
    pytest.param("planned", "first", id="after-pending-stored"),
    pytest.param("object_published", "first", id="published-first"),
    pytest.param("object_published", "middle", id="published-middle"),
    pytest.param("object_published", "last", id="published-last"),
    pytest.param("progress_saved", "first", id="saved-first"),
    pytest.param("progress_saved", "middle", id="saved-middle"),
    pytest.param("progress_saved", "last", id="saved-last"),
    pytest.param("before_commit", "first", id="before-commit"),
]


@pytest.mark.parametrize(("event", "position"), KILL_POINTS)
def test_killed_export_retry_matches(event, position, twins, pg_cluster, database, connect, exporter_conn):
    objects = len(twins.reference_objects)
    occurrence = occurrence_of(position, objects)

    pid, output = run_killed_export(
        pg_cluster.conninfo(database, user=EXPORT_ROLE), twins.settings, twins.destination.uri, event, occurrence
    )
    wait_for_backend_exit(connect(), pid)

    killed_state = load_state(exporter_conn, twins.settings)
    assert killed_state.cursor_xid == twins.anchor_cursor
    if event == "observed":
        assert killed_state.pending is None, output
    else:
        assert killed_state.pending is not None, output
        assert killed_state.pending["lo"] == twins.reference["lo"]
        assert killed_state.pending["hi"] == twins.reference["hi"]
    published = {"object_published": occurrence, "progress_saved": occurrence, "before_commit": objects}.get(event, 0)
    saved = {"object_published": occurrence - 1, "progress_saved": occurrence, "before_commit": objects}.get(event, 0)
    if killed_state.pending is not None:
        assert killed_state.pending["sequence"] == saved
    partial = read_local_objects(twins.destination)
    assert len(partial) == published
    for key, data in partial.items():
        assert twins.reference_objects.get(key) == data, f"object {key} written before the kill differs"

    stats = run_export(exporter_conn, twins.settings, twins.destination)

    twins.assert_matches_reference(read_local_objects(twins.destination), stats)
    assert staging_files(twins.destination) == []
    committed = load_state(exporter_conn, twins.settings)
    assert committed.pending is None
    assert committed.cursor_xid == twins.reference["hi"]

    again = run_export(exporter_conn, twins.settings, twins.destination)
    assert again["rows"] == 0
    assert read_local_objects(twins.destination) == twins.reference_objects


def test_export_survives_repeated_kills(twins, pg_cluster, database, connect, exporter_conn):
    conninfo = pg_cluster.conninfo(database, user=EXPORT_ROLE)
    admin = connect()
    # The second attempt resumes after object 1, so its first save is object 2's.
    for event, occurrence, saved in (("object_published", 2, 1), ("progress_saved", 1, 2), ("before_commit", 1, None)):
        pid, output = run_killed_export(conninfo, twins.settings, twins.destination.uri, event, occurrence)
        wait_for_backend_exit(admin, pid)
        state = load_state(exporter_conn, twins.settings)
        assert state.cursor_xid == twins.anchor_cursor, output
        if saved is not None:
            assert state.pending["sequence"] == saved, output

    stats = run_export(exporter_conn, twins.settings, twins.destination)

    twins.assert_matches_reference(read_local_objects(twins.destination), stats)
    assert staging_files(twins.destination) == []


# -- S3 API errors and slow responses, through a fault proxy ---------------------------------


@pytest.mark.parametrize("status", [500, 503])
def test_s3_transient_errors_retried(status, twins, exporter_conn, s3_server, fault_proxy, faulty_bucket, monkeypatch):
    aws_conn_id = use_faulty_s3(monkeypatch, fault_proxy)
    destination = parse_destination(f"s3://{faulty_bucket}/{S3_PREFIX}", aws_conn_id=aws_conn_id)
    fault_proxy.fail(2, status=status, method="PUT", path_part=DATA_OBJECT)

    stats = run_export(exporter_conn, twins.settings, destination)

    twins.assert_matches_reference(s3_objects(s3_server, faulty_bucket), stats)
    assert fault_proxy.injected_errors() == 2
    assert fault_proxy.count("PUT", DATA_OBJECT) == len(twins.reference_objects) + 2


# A threshold of 1 byte sends every object as a multipart upload through S3Hook.load_file; None keeps PutObject.
@pytest.mark.parametrize("multipart_threshold", [None, 1], ids=["put-object", "multipart"])
def test_s3_persistent_errors_then_resume(
    multipart_threshold, twins, pg_cluster, database, exporter_conn, s3_server, fault_proxy, faulty_bucket, monkeypatch
):
    monkeypatch.setenv(f"AIRFLOW_CONN_{SOURCE_CONN_ID.upper()}", pg_cluster.uri(database, user=EXPORT_ROLE))
    aws_conn_id = use_faulty_s3(monkeypatch, fault_proxy, multipart_threshold)
    destination_uri = f"s3://{faulty_bucket}/{S3_PREFIX}"
    first_key = sorted(twins.reference_objects)[0]
    # The first object goes through, then every upload fails until the fault clears.
    fault_proxy.fail(1_000, status=503, method="PUT", path_part=DATA_OBJECT, after=1)

    with pytest.raises(PublishError) as raised:
        export_operator(destination_uri, twins.settings, aws_conn_id).execute(operator_context())

    message = str(raised.value)
    assert not isinstance(raised.value, AirflowFailException), "an outage must get the task's retries"
    assert faulty_bucket in message
    assert f"{S3_PREFIX}/dt=" in message
    assert "_000002.ndjson.gz" in message
    # PutObject reads the error code from the response body; UploadPart reports the status.
    assert "ServiceUnavailable" in message or "(503)" in message
    assert fault_proxy.injected_errors() == 3, "botocore should try each upload three times"
    failed_state = load_state(exporter_conn, twins.settings)
    assert failed_state.cursor_xid == twins.anchor_cursor
    assert failed_state.pending["sequence"] == 1
    assert s3_objects(s3_server, faulty_bucket) == {first_key: twins.reference_objects[first_key]}

    fault_proxy.clear()
    stats = export_operator(destination_uri, twins.settings, aws_conn_id).execute(operator_context())

    twins.assert_matches_reference(s3_objects(s3_server, faulty_bucket), stats)
    assert load_state(exporter_conn, twins.settings).pending is None


def test_s3_slow_responses_complete(twins, exporter_conn, s3_server, fault_proxy, faulty_bucket, monkeypatch):
    aws_conn_id = use_faulty_s3(monkeypatch, fault_proxy)
    destination = parse_destination(f"s3://{faulty_bucket}/{S3_PREFIX}", aws_conn_id=aws_conn_id)
    fault_proxy.delay(0.1)

    stats = run_export(exporter_conn, twins.settings, destination)

    twins.assert_matches_reference(s3_objects(s3_server, faulty_bucket), stats)
    assert all(request.delayed_seconds == 0.1 for request in fault_proxy.requests)


def test_s3_response_past_read_timeout(twins, exporter_conn, s3_server, fault_proxy, faulty_bucket, monkeypatch):
    aws_conn_id = use_faulty_s3(monkeypatch, fault_proxy, read_timeout=1)
    destination = parse_destination(f"s3://{faulty_bucket}/{S3_PREFIX}", aws_conn_id=aws_conn_id)
    # The upload reaches moto, but its response comes after botocore gave up, so botocore sends it again.
    fault_proxy.delay(2.5, count=1, method="PUT", path_part=DATA_OBJECT)

    stats = run_export(exporter_conn, twins.settings, destination)

    twins.assert_matches_reference(s3_objects(s3_server, faulty_bucket), stats)
    requests = "\n".join(map(str, fault_proxy.requests))
    assert fault_proxy.count("PUT", DATA_OBJECT) == len(twins.reference_objects) + 1, requests
    assert len([r for r in fault_proxy.requests if r.delayed_seconds]) == 1, requests


# -- PostgreSQL restarted in the middle of a run ---------------------------------------------


@pytest.fixture(scope="module")
def restart_cluster():
    """A cluster of its own, so restarting it breaks no other test's connections."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def restart_database(restart_cluster) -> str:
    name = f"r_{uuid.uuid4().hex[:12]}"
    restart_cluster.create_database(name)
    today = datetime.now(timezone.utc).date()
    with restart_cluster.connect(name) as conn:
        create_reference_schema(conn, first_day=today - timedelta(days=3), last_day=today + timedelta(days=3))
        apply_export_role(conn)
    return name


@pytest.fixture
def restart_connect(restart_cluster, restart_database):
    opened: list[psycopg.Connection] = []

    def _connect(user: str | None = None, *, autocommit: bool = True) -> psycopg.Connection:
        conn = restart_cluster.connect(restart_database, user=user, autocommit=autocommit)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.close()


def restart_at(cluster: PostgresCluster, event: str, occurrence: int):
    """Wrap ``run_export`` so that the cluster restarts at ``event`` number ``occurrence`` of the run."""
    seen = 0

    def on_progress(name: str, details: dict) -> None:
        nonlocal seen
        if name != event:
            return
        seen += 1
        if seen == occurrence:
            cluster.restart()

    def wrapped(conn, settings, destination, **kwargs):
        return run_export(conn, settings, destination, on_progress=on_progress)

    return wrapped


@pytest.mark.parametrize(
    ("event", "position"),
    [
        pytest.param("object_published", "middle", id="after-middle-object"),
        pytest.param("before_commit", "first", id="before-commit"),
    ],
)
def test_postgres_restart_then_retry(
    event, position, restart_cluster, restart_database, restart_connect, settings, tmp_path, monkeypatch
):
    source_uri = restart_cluster.uri(restart_database, user=EXPORT_ROLE)
    monkeypatch.setenv(f"AIRFLOW_CONN_{SOURCE_CONN_ID.upper()}", source_uri)
    exporter_conn = restart_connect(EXPORT_ROLE)
    configure_connection(exporter_conn)
    twins = prepare_twin_exports(restart_connect, exporter_conn, settings, tmp_path, seed=22)
    occurrence = occurrence_of(position, len(twins.reference_objects))
    monkeypatch.setattr(xmin_export, "run_export", restart_at(restart_cluster, event, occurrence))

    with pytest.raises(psycopg.OperationalError) as raised:
        export_operator(twins.destination.uri, settings).execute(operator_context())

    # psycopg's message names the failure, and the operator's note names the connection and what a retry does.
    message = str(raised.value)
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "terminating connection due to administrator command" in message
    assert f"connection {SOURCE_CONN_ID!r}" in notes
    assert f"database {restart_database!r}" in notes
    assert "resumes the pending xid range" in notes
    assert not isinstance(raised.value, AirflowFailException), "a lost connection must get the task's retries"
    observer = restart_connect(EXPORT_ROLE)
    failed_state = load_state(observer, settings)
    assert failed_state.cursor_xid == twins.anchor_cursor
    assert failed_state.pending["hi"] == twins.reference["hi"]

    monkeypatch.setattr(xmin_export, "run_export", run_export)
    stats = export_operator(twins.destination.uri, settings).execute(operator_context())

    twins.assert_matches_reference(read_local_objects(twins.destination), stats)
    committed = load_state(observer, settings)
    assert committed.pending is None
    assert committed.cursor_xid == twins.reference["hi"]
