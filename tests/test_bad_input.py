"""Bad input to every operator argument, DAG param and DAG environment variable.

Each case must be rejected before any side effect: no state table created, no
state row created or changed, no object written. The message must name the
bad value and the fix. Most cases call an operator's ``execute`` on one shared
database. A few run the bundled DAGs through Airflow's ``dag.test()`` to show
the failure a user gets: the task fails with ``AirflowFailException``, without retries.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import subprocess
import sys
import types
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError
from psycopg import sql

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.dag_settings import DagSettings
from airflow_audit_export.operators import (
    AnchorOperator,
    BackfillRangeOperator,
    BackfillSummaryOperator,
    BackfillWindowOperator,
    XminExportOperator,
)
from airflow_audit_export.exporting import run_export
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import SourceTableError, configure_connection
from airflow_audit_export.state import StateTableError
from airflow_audit_export.testing.schema import EXPORT_ROLE, apply_export_role, create_reference_schema, insert_rows
from airflow_audit_export.writing import parse_destination

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
DAGS_FOLDER = Path(__file__).resolve().parent.parent / "dags"
PG_CONN_ID = "bad_input_db"
S3_CONN_ID = "bad_input_s3"
BACKUP_SCHEMA = "bad_input_backup"
#: A state table that does not exist. The anchor cases check that nothing creates it.
FRESH_STATE_TABLE = "public.fresh_state"
UTC = timezone.utc


def utc_midnight(days_ago: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


#: A settled window with rows in it, so a backfill with valid arguments writes objects.
WINDOW_FROM = utc_midnight(10).isoformat()
WINDOW_TO = utc_midnight(8).isoformat()


# -- the shared database, destinations and side-effect snapshots ----------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything a rejected task must leave unchanged."""

    relations: frozenset[str]
    state_rows: tuple[str, ...]
    files: frozenset[tuple[str, int, int]]
    s3_keys: frozenset[str]


@dataclasses.dataclass
class World:
    """One database with the reference schema, an anchored export, extra bad tables and two destinations."""

    admin: psycopg.Connection
    exporter_conninfo: str
    root: Path
    bucket: str
    s3_client: Any

    def connect_exporter(self) -> psycopg.Connection:
        """Open a connection as the least-privilege role, configured as the operators configure theirs."""
        conn = psycopg.connect(self.exporter_conninfo)
        configure_connection(conn)
        return conn

    @property
    def local_uri(self) -> str:
        return f"file://{self.root / 'bucket'}"

    @property
    def s3_uri(self) -> str:
        return f"s3://{self.bucket}/audit"

    @property
    def unwritable_uri(self) -> str:
        # A regular file in the path makes the folder impossible to create, even for root.
        return f"file://{self.root / 'blocker' / 'bucket'}"

    def snapshot(self) -> Snapshot:
        relations = self.admin.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', %s)",
            (BACKUP_SCHEMA,),
        ).fetchall()
        state_rows = self.admin.execute(
            "SELECT to_jsonb(s)::text FROM public.audit_export_state s ORDER BY export_name"
        ).fetchall()
        files = {
            (str(path.relative_to(self.root)), path.stat().st_size, path.stat().st_mtime_ns)
            for path in self.root.rglob("*")
            if path.is_file()
        }
        listing = self.s3_client.list_objects_v2(Bucket=self.bucket)
        return Snapshot(
            relations=frozenset(row[0] for row in relations),
            state_rows=tuple(row[0] for row in state_rows),
            files=frozenset(files),
            s3_keys=frozenset(item["Key"] for item in listing.get("Contents", [])),
        )

    def restore(self, baseline: Snapshot) -> None:
        """Undo what a task changed, so the next case starts from the baseline."""
        current = self.snapshot()
        for relation in current.relations - baseline.relations:
            schema, name = relation.split(".", 1)
            self.admin.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, name)))
        if current.state_rows != baseline.state_rows:
            self.admin.execute("DELETE FROM public.audit_export_state")
            self.admin.execute(
                sql.SQL("INSERT INTO public.audit_export_state SELECT * FROM {}").format(
                    sql.Identifier(BACKUP_SCHEMA, "state")
                )
            )
        baseline_files = {name for name, _, _ in baseline.files}
        for name, _, _ in current.files:
            if name not in baseline_files:
                (self.root / name).unlink()
        for key in current.s3_keys - baseline.s3_keys:
            self.s3_client.delete_object(Bucket=self.bucket, Key=key)


BAD_TABLES = """
CREATE TABLE public.naive_audit (id bigint PRIMARY KEY, "timestamp" timestamp NOT NULL DEFAULT now(), note text);
CREATE TABLE public.secret_audit (id bigint PRIMARY KEY, "timestamp" timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.keyless_audit (id bigint NOT NULL, "timestamp" timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.nullable_audit (id bigint UNIQUE, "timestamp" timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.narrow_legacy (id bigint PRIMARY KEY, "timestamp" timestamptz NOT NULL DEFAULT now());
GRANT SELECT ON public.naive_audit, public.keyless_audit, public.nullable_audit, public.narrow_legacy TO audit_exporter;
"""


@pytest.fixture(scope="module")
def world(pg_cluster, s3_server, tmp_path_factory):
    name = f"b_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    admin = pg_cluster.connect(name)
    create_reference_schema(admin, first_day=utc_midnight(14).date(), last_day=utc_midnight(-3).date())
    apply_export_role(admin)
    # With CREATE on public, a task that wrongly creates a state table would succeed, so the checks can see it.
    admin.execute("GRANT CREATE ON SCHEMA public TO audit_exporter")
    admin.execute(BAD_TABLES)

    exporter = pg_cluster.connect(name, user=EXPORT_ROLE)
    configure_connection(exporter)
    anchor_export(exporter, ExportSettings.create(name="audit", table="public.audit_partitioned"))
    exporter.close()
    # Rows after the anchor for the steady-state export, and rows inside the backfill window.
    insert_rows(admin, 30)
    insert_rows(admin, 40, start=datetime.fromisoformat(WINDOW_FROM), end=datetime.fromisoformat(WINDOW_TO), seed=3)
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(BACKUP_SCHEMA)))
    admin.execute(
        sql.SQL("CREATE TABLE {} AS SELECT * FROM public.audit_export_state").format(
            sql.Identifier(BACKUP_SCHEMA, "state")
        )
    )

    root = tmp_path_factory.mktemp("bad-input")
    (root / "blocker").write_text("a file where the destination needs a folder\n", encoding="utf-8")
    bucket = f"bad-input-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(f"AIRFLOW_CONN_{PG_CONN_ID.upper()}", pg_cluster.uri(name, user=EXPORT_ROLE))
        patch.setenv(f"AIRFLOW_CONN_{S3_CONN_ID.upper()}", s3_server.airflow_connection_uri())
        yield World(
            admin=admin,
            exporter_conninfo=pg_cluster.conninfo(name, user=EXPORT_ROLE),
            root=root,
            bucket=bucket,
            s3_client=s3_server.client(),
        )

    admin.close()
    with pg_cluster.connect() as cluster_admin:
        cluster_admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        cluster_admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


@pytest.fixture
def baseline(world):
    """The state before a case. Whatever the case changed is undone afterwards."""
    before = world.snapshot()
    yield before
    world.restore(before)


# -- building operators ---------------------------------------------------------------------


def operator_arguments(kind: str, world: World) -> dict:
    """Return valid arguments of each operator, which a case overrides in part."""
    source = {
        "export_name": "audit",
        "table": "public.audit_partitioned",
        "postgres_conn_id": PG_CONN_ID,
        "tuning": {"lock_wait": 1},
    }
    destination = {"destination": world.local_uri, "aws_conn_id": S3_CONN_ID}
    window = {"window_from": WINDOW_FROM, "window_to": WINDOW_TO}
    if kind == "anchor":
        return {**source, "export_name": "fresh", "state_table": FRESH_STATE_TABLE}
    if kind == "export":
        return {**source, **destination, "tuning": {"lock_wait": 1, "page_rows": 50}}
    if kind == "plan":
        return {**source, **destination, **window, "legacy_table": "public.audit", "page_rows": 50}
    if kind == "range":
        spec = {"index": 0, "from": WINDOW_FROM, "to": WINDOW_TO, **window, "page_rows": 50, "label": "range 0"}
        return {**source, **destination, "legacy_table": "public.audit", "export_range": spec}
    if kind == "summary":
        results = [{"index": 0, "from": WINDOW_FROM, "to": WINDOW_TO, "rows": 0, "bytes": 0, "objects": []}]
        return {**source, **destination, **window, "legacy_table": "public.audit", "range_results": results}
    raise AssertionError(f"unknown operator kind {kind!r}")


OPERATOR_CLASSES = {
    "anchor": AnchorOperator,
    "export": XminExportOperator,
    "plan": BackfillWindowOperator,
    "range": BackfillRangeOperator,
    "summary": BackfillSummaryOperator,
}


def build_operator(kind: str, world: World, overrides: dict):
    arguments = operator_arguments(kind, world)
    for name, value in overrides.items():
        arguments[name] = value(world) if callable(value) else value
    return OPERATOR_CLASSES[kind](task_id=f"{kind}_bad_input", **arguments)


def spec_with(**changes) -> Callable[[World], dict]:
    """An ``export_range`` override: the valid range spec with ``changes`` (``None`` removes a key)."""

    def build(world: World) -> dict:
        spec = dict(operator_arguments("range", world)["export_range"])
        for key, value in changes.items():
            if value is None:
                spec.pop(key)
            else:
                spec[key] = value
        return spec

    return build


# -- the matrix -----------------------------------------------------------------------------

ALL_OPERATORS = ("anchor", "export", "plan", "range", "summary")
BACKFILL_OPERATORS = ("plan", "range", "summary")
DESTINATION_OPERATORS = ("export", "plan", "range", "summary")

#: Bad arguments every operator takes: (id, overrides, fragments the message must contain).
SHARED_CASES = [
    ("export-name-invalid", {"export_name": "bad name!"}, ("'bad name!'", "letters, digits")),
    (
        "table-malformed",
        {"table": "public.audit;drop"},
        ("'public.audit;drop'", "for example 'public.audit_partitioned'"),
    ),
    ("table-unknown", {"table": "public.missing_audit"}, ("'public.missing_audit'", "AUDIT_EXPORT_TABLE")),
    (
        "table-unreadable",
        {"table": "public.secret_audit"},
        ("'public.secret_audit'", "GRANT SELECT ON public.secret_audit"),
    ),
    ("timestamp-column-unknown", {"timestamp_column": "created"}, ("'created'", "Set timestamp_column")),
    (
        "timestamp-column-naive",
        {"table": "public.naive_audit"},
        ("'timestamp without time zone'", "TYPE timestamptz"),
    ),
    ("id-column-unknown", {"id_column": "uid"}, ("'uid'", "Set id_column")),
    ("id-column-enum", {"id_column": "action_kind"}, ("'action_kind'", "expected one of")),
    ("id-column-not-unique", {"id_column": "workspace_id"}, ("'workspace_id'", "not proven unique", "ADD PRIMARY KEY")),
    ("table-without-key", {"table": "public.keyless_audit"}, ("'public.keyless_audit'", "ADD PRIMARY KEY")),
    ("id-column-nullable", {"table": "public.nullable_audit"}, ("'id'", "SET NOT NULL")),
    ("state-table-malformed", {"state_table": "a.b.c"}, ("'a.b.c'", "schema.table")),
    ("state-table-no-schema", {"state_table": "nowhere.state"}, ("'nowhere.state'", "Create the schema")),
    ("state-table-wrong-table", {"state_table": "public.audit"}, ("'public.audit'", "not an export state table")),
    ("tuning-unknown-option", {"tuning": {"page_size": 5}}, ("page_size", "valid options are")),
    ("tuning-rows-per-object-zero", {"tuning": {"rows_per_object": 0}}, ("rows_per_object 0", "positive integer")),
    (
        "tuning-repeats-argument",
        {"tuning": {"id_column": "workspace_id"}},
        ("'workspace_id' in tuning", "remove it from tuning"),
    ),
    ("postgres-conn-missing", {"postgres_conn_id": "no_such_db"}, ("'no_such_db'", "AIRFLOW_CONN_NO_SUCH_DB")),
]

SPECIFIC_CASES = [
    ("anchor", "force-not-boolean", {"force": "maybe"}, ("'maybe'", "true or false")),
    ("anchor", "max-backlog-zero", {"tuning": {"max_backlog": 0}}, ("max_backlog", "above zero")),
    ("anchor", "floor-margin-negative", {"tuning": {"floor_margin": -5}}, ("floor_margin -5", ">= 0")),
    ("export", "columns-unknown", {"columns": ["id", "nope"]}, ("'nope'", "Remove them from the columns")),
    ("export", "compression-unknown", {"compression": "zip"}, ("'zip'", "gzip, none")),
    ("export", "rows-per-object-text", {"tuning": {"rows_per_object": "many"}}, ("'many'", "positive integer")),
    ("export", "export-never-anchored", {"export_name": "other"}, ("'other'", "run the anchor task first")),
    ("export", "state-table-missing", {"state_table": "public.never_state"}, ("'public.never_state'", "anchor task")),
    ("export", "destination-none", {"destination": None}, ("None", "file:///absolute/path or s3://bucket/prefix")),
    ("plan", "from-malformed", {"window_from": "yesterday"}, ("'yesterday'", "for example 2026-01-01T00:00:00Z")),
    ("plan", "from-without-offset", {"window_from": "2026-01-01T00:00:00"}, ("'2026-01-01T00:00:00'", "add one")),
    ("plan", "to-malformed", {"window_to": "2026-13-01T00:00:00Z"}, ("'2026-13-01T00:00:00Z'", "ISO 8601")),
    ("plan", "to-before-from", {"window_to": utc_midnight(11).isoformat()}, ("is not before to", "swap them")),
    ("plan", "from-equals-to", {"window_to": WINDOW_FROM}, ("is not before to", "swap them")),
    (
        "plan",
        "window-in-future",
        # Two days ahead, so the window stays in the future when the run crosses UTC midnight.
        {"window_from": utc_midnight(-2).isoformat(), "window_to": utc_midnight(-3).isoformat()},
        (utc_midnight(-2).isoformat(), "is in the future", "audit_export DAG"),
    ),
    (
        "plan",
        "to-not-settled",
        {"window_to": utc_midnight(-1).isoformat()},
        (utc_midnight(-1).isoformat(), "not settled", "The largest allowed to is"),
    ),
    ("plan", "page-rows-zero", {"page_rows": "0"}, ("page_rows 0", "positive integer")),
    ("plan", "page-rows-negative", {"page_rows": "-5"}, ("'-5'", "positive integer")),
    ("plan", "page-rows-text", {"page_rows": "many"}, ("'many'", "positive integer")),
    ("plan", "max-ranges-zero", {"max_ranges": 0}, ("max_ranges 0", "positive integer")),
    ("plan", "max-ranges-boolean", {"max_ranges": True}, ("max_ranges True", "positive integer")),
    ("plan", "max-ranges-text", {"max_ranges": "4"}, ("max_ranges '4'", "positive integer")),
    ("plan", "columns-unknown", {"columns": "id,nope"}, ("'nope'", "Remove them from the columns")),
    ("range", "spec-not-mapping", {"export_range": "range 0"}, ("'range 0'", "BackfillWindowOperator's output")),
    ("range", "spec-without-to", {"export_range": spec_with(to=None)}, ("has no to", "BackfillWindowOperator")),
    ("range", "spec-from-malformed", {"export_range": spec_with(**{"from": "soon"})}, ("from 'soon'", "ISO 8601")),
    (
        "range",
        "spec-from-without-offset",
        {"export_range": spec_with(**{"from": "2026-01-01T00:00:00"})},
        ("export_range from '2026-01-01T00:00:00'", "add one"),
    ),
    (
        "range",
        "spec-reversed",
        {"export_range": spec_with(to=utc_midnight(11).isoformat())},
        ("non-empty range inside", "unchanged"),
    ),
    (
        "range",
        "spec-outside-window",
        {"export_range": spec_with(window_from=utc_midnight(9).isoformat())},
        ("non-empty range inside", "unchanged"),
    ),
    ("range", "spec-page-rows-zero", {"export_range": spec_with(page_rows=0)}, ("page_rows 0", "positive integer")),
    ("summary", "results-none", {"range_results": None}, ("range_results None", "export_ranges.output")),
    ("summary", "results-item-invalid", {"range_results": [{"index": 0}]}, ("{'index': 0}", "unchanged")),
    ("summary", "window-reversed", {"window_to": utc_midnight(11).isoformat()}, ("is not before to", "swap them")),
]

#: Destination and legacy-table cases, which apply to several operators each.
DESTINATION_CASES = [
    ("destination-scheme", {"destination": "ftp://host/audit"}, ("'ftp://host/audit'", "file://, s3://")),
    ("destination-relative", {"destination": "file://relative/audit"}, ("'file://relative/audit'", "three slashes")),
    (
        "destination-unwritable",
        {"destination": lambda world: world.unwritable_uri},
        ("not writable", "AUDIT_EXPORT_DESTINATION"),
    ),
    ("bucket-missing", {"destination": "s3://no-such-bucket-x/audit"}, ("'no-such-bucket-x'", "create it")),
]
LEGACY_CASES = [
    (
        "legacy-table-unknown",
        {"legacy_table": "public.missing_legacy"},
        ("'public.missing_legacy'", "AUDIT_EXPORT_LEGACY_TABLE"),
    ),
    (
        "legacy-table-narrow",
        {"legacy_table": "public.narrow_legacy"},
        ("'public.narrow_legacy'", "legacy table needs every"),
    ),
    ("legacy-table-naive", {"legacy_table": "public.naive_audit"}, ("'public.naive_audit'", "TYPE timestamptz")),
]


def matrix() -> list:
    cases = []
    for kind in ALL_OPERATORS:
        for case_id, overrides, fragments in SHARED_CASES:
            cases.append(pytest.param(kind, overrides, fragments, id=f"{kind}-{case_id}"))
    for kind, case_id, overrides, fragments in SPECIFIC_CASES:
        cases.append(pytest.param(kind, overrides, fragments, id=f"{kind}-{case_id}"))
    for kind in DESTINATION_OPERATORS:
        for case_id, overrides, fragments in DESTINATION_CASES:
            cases.append(pytest.param(kind, overrides, fragments, id=f"{kind}-{case_id}"))
    for kind in BACKFILL_OPERATORS:
        for case_id, overrides, fragments in LEGACY_CASES:
            cases.append(pytest.param(kind, overrides, fragments, id=f"{kind}-{case_id}"))
    return cases


@pytest.mark.parametrize(("kind", "overrides", "fragments"), matrix())
def test_operator_rejects_bad_input(kind, overrides, fragments, world, baseline):
    operator = build_operator(kind, world, overrides)

    with pytest.raises(AirflowFailException) as raised:
        operator.execute({})

    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} is missing from the message: {message}"
    after = world.snapshot()
    assert after.relations == baseline.relations, "a table was created"
    assert after.state_rows == baseline.state_rows, "a state row was created or changed"
    assert after.files == baseline.files, "a local object was written"
    assert after.s3_keys == baseline.s3_keys, "an S3 object was written"


@pytest.mark.parametrize("kind", ALL_OPERATORS)
def test_valid_arguments_leave_traces(kind, world, baseline):
    """The control for the matrix: the same operators with valid arguments change what the checks compare."""
    # The export operator sets the extra of its Asset event in the context on success.
    result = build_operator(kind, world, {}).execute({"outlet_events": collections.defaultdict(types.SimpleNamespace)})

    after = world.snapshot()
    assert result
    if kind == "anchor":
        assert after.relations == baseline.relations | {FRESH_STATE_TABLE}
    if kind == "export":
        assert after.state_rows != baseline.state_rows
    if kind in ("export", "range", "summary"):
        assert after.files - baseline.files, "the operator wrote no object"


# -- a missing AWS connection ---------------------------------------------------------------


@pytest.fixture
def no_ambient_aws_credentials(monkeypatch):
    """Remove every source of AWS credentials and keep any request on loopback.

    The amazon provider falls back to boto3's default credentials when the
    connection is not defined. Without credentials, botocore fails while
    signing, before it sends anything, and the endpoint variable is a second guard.
    """
    for variable in list(os.environ):
        if variable.startswith("AWS_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


@pytest.mark.parametrize("kind", DESTINATION_OPERATORS)
def test_missing_aws_connection_rejected(kind, world, baseline, no_ambient_aws_credentials):
    operator = build_operator(kind, world, {"destination": world.s3_uri, "aws_conn_id": "no_such_aws"})

    with pytest.raises(AirflowFailException) as raised:
        operator.execute({})

    message = str(raised.value)
    assert "'no_such_aws'" in message
    assert world.bucket in message
    after = world.snapshot()
    assert after.state_rows == baseline.state_rows
    assert after.s3_keys == baseline.s3_keys


def test_missing_aws_connection_names_fix(world, baseline, no_ambient_aws_credentials):
    operator = build_operator("export", world, {"destination": world.s3_uri, "aws_conn_id": "no_such_aws"})

    with pytest.raises(AirflowFailException) as raised:
        operator.execute({})

    message = str(raised.value).lower()
    assert "create" in message or "define" in message, "the message gives no way to fix the connection"


# -- the library functions under the operators ---------------------------------------------


def test_anchor_export_checks_source_first(world, baseline):
    settings = ExportSettings.create(name="fresh", table="public.missing_audit", state_table=FRESH_STATE_TABLE)

    with world.connect_exporter() as conn, pytest.raises(SourceTableError):
        anchor_export(conn, settings)

    assert world.snapshot().relations == baseline.relations


def test_run_export_rejects_wrong_state_table(world, baseline):
    settings = ExportSettings.create(name="audit", table="public.audit_partitioned", state_table="public.audit")
    destination = parse_destination(world.local_uri)

    with world.connect_exporter() as conn, pytest.raises(StateTableError) as raised:
        run_export(conn, settings, destination)

    message = str(raised.value)
    assert "'public.audit'" in message
    assert "ALTER TABLE public.audit" not in message
    assert "not an export state table" in message


# -- DAG environment variables --------------------------------------------------------------

ENVIRONMENT_CASES = [
    pytest.param("AUDIT_EXPORT_NAME", "bad name", "letters, digits", id="name-invalid"),
    pytest.param("AUDIT_EXPORT_POSTGRES_CONN_ID", " ", "Unset it", id="postgres-conn-empty"),
    pytest.param("AUDIT_EXPORT_TABLE", "public.audit;drop", "'public.audit_partitioned'", id="table-malformed"),
    pytest.param("AUDIT_EXPORT_TIMESTAMP_COLUMN", "", "Unset it", id="timestamp-column-empty"),
    pytest.param("AUDIT_EXPORT_ID_COLUMN", "", "Unset it", id="id-column-empty"),
    pytest.param("AUDIT_EXPORT_LEGACY_TABLE", "old audit", "schema.table", id="legacy-table-malformed"),
    pytest.param("AUDIT_EXPORT_STATE_TABLE", "a.b.c", "schema.table", id="state-table-malformed"),
    pytest.param("AUDIT_EXPORT_DESTINATION", "ftp://host/audit", "file://, s3://", id="destination-scheme"),
    pytest.param("AUDIT_EXPORT_DESTINATION", "file://relative/audit", "three slashes", id="destination-relative"),
    pytest.param("AUDIT_EXPORT_SCHEDULE", "every five minutes", "cron expression such as", id="schedule-not-cron"),
    pytest.param("AUDIT_EXPORT_SCHEDULE", "61 * * * *", "cron expression such as", id="schedule-out-of-range"),
    pytest.param("AUDIT_EXPORT_GAP_POLICY", "skip", "backfill, record", id="gap-policy-unknown"),
    pytest.param("AUDIT_BACKFILL_MAX_ACTIVE_RANGES", "0", "positive integer", id="max-active-ranges-zero"),
    pytest.param("AUDIT_BACKFILL_MAX_ACTIVE_RANGES", "four", "positive integer", id="max-active-ranges-text"),
    pytest.param("AUDIT_EXPORT_MAX_BACKLOG_SECONDS", "1.5", "positive integer", id="max-backlog-fraction"),
    pytest.param("AUDIT_EXPORT_MAX_BACKLOG_SECONDS", "-60", "positive integer", id="max-backlog-negative"),
]


@pytest.mark.parametrize(("variable", "value", "fix"), ENVIRONMENT_CASES)
def test_dag_settings_reject_variable(variable, value, fix):
    with pytest.raises(ValueError) as raised:
        DagSettings.from_environment({variable: value})

    message = str(raised.value)
    assert variable in message
    assert repr(value) in message
    assert fix in message


def load_dag(dag_file: str, monkeypatch, **environment):
    """Import one bundled DAG file as the dag-processor does, with ``environment`` set, and return the bag."""
    from airflow.dag_processing.dagbag import DagBag

    for variable in [v for v in os.environ if v.startswith("AUDIT_EXPORT_") or v.startswith("AUDIT_BACKFILL_")]:
        monkeypatch.delenv(variable)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    return DagBag(dag_folder=str(DAGS_FOLDER / dag_file))


@pytest.mark.parametrize("dag_file", ["audit_export.py", "audit_backfill.py"])
def test_dag_import_names_bad_variable(dag_file, monkeypatch):
    bag = load_dag(dag_file, monkeypatch, AUDIT_EXPORT_GAP_POLICY="skip")

    assert bag.dags == {}
    errors = list(bag.import_errors.values())
    assert len(errors) == 1
    assert "AUDIT_EXPORT_GAP_POLICY 'skip'" in errors[0]
    assert "backfill, record" in errors[0]


# -- DAG params -----------------------------------------------------------------------------

PARAM_CASES = [
    pytest.param(
        "audit_backfill.py",
        {"from": "yesterday", "to": WINDOW_TO},
        "'yesterday' is not a 'date-time'",
        id="from-malformed",
    ),
    pytest.param(
        "audit_backfill.py",
        {"from": "2026-01-01T00:00:00", "to": WINDOW_TO},
        "'2026-01-01T00:00:00' is not a 'date-time'",
        id="from-without-offset",
    ),
    pytest.param(
        "audit_backfill.py",
        {"from": WINDOW_FROM, "to": "2026-02-30T00:00:00Z"},
        "'2026-02-30T00:00:00Z' is not a 'date-time'",
        id="to-malformed",
    ),
    pytest.param("audit_backfill.py", {"to": WINDOW_TO}, "param from", id="from-missing"),
    pytest.param(
        "audit_backfill.py",
        {"from": WINDOW_FROM, "to": WINDOW_TO, "page_rows": 0},
        "less than the minimum",
        id="page-rows-zero",
    ),
    pytest.param(
        "audit_backfill.py",
        {"from": WINDOW_FROM, "to": WINDOW_TO, "page_rows": 2_000_000},
        "greater than the maximum",
        id="page-rows-too-large",
    ),
    pytest.param(
        "audit_backfill.py",
        {"from": WINDOW_FROM, "to": WINDOW_TO, "page_rows": "many"},
        "'many' is not of type 'integer'",
        id="page-rows-text",
    ),
    pytest.param("audit_export.py", {"reanchor": "yes"}, "'yes' is not of type 'boolean'", id="reanchor-text"),
    pytest.param("audit_export.py", {"reanchor": 1}, "1 is not of type 'boolean'", id="reanchor-number"),
]


@pytest.mark.parametrize(("dag_file", "conf", "expected"), PARAM_CASES)
def test_dag_params_reject_conf(dag_file, conf, expected, monkeypatch):
    bag = load_dag(dag_file, monkeypatch)
    (dag,) = bag.dags.values()
    params = copy.deepcopy(dag.params)

    # Airflow merges a trigger's conf into the DAG's params this way and validates them before the run starts.
    with pytest.raises(ParamValidationError) as raised:
        for name, value in conf.items():
            params[name] = value
        params.validate()

    message = str(raised.value)
    assert expected in message
    assert "Invalid input for param" in message


# -- through Airflow's runner ---------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_metadata_db() -> Path:
    """The Airflow metadata database under ``AIRFLOW_HOME``, migrated once unless it already exists."""
    path = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    if not path.exists():
        result = subprocess.run([AIRFLOW, "db", "migrate"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return path


def task_states(run) -> dict[str, tuple[str, int, int]]:
    """Return each task's state, try number and max tries in a finished ``dag.test()`` run."""
    return {ti.task_id: (str(ti.state), ti.try_number, ti.max_tries) for ti in run.get_task_instances()}


def test_export_dag_fails_without_retry(airflow_metadata_db, world, baseline, monkeypatch, capfd):
    bag = load_dag(
        "audit_export.py",
        monkeypatch,
        AUDIT_EXPORT_POSTGRES_CONN_ID=PG_CONN_ID,
        AUDIT_EXPORT_ID_COLUMN="workspace_id",
        AUDIT_EXPORT_DESTINATION=world.local_uri,
    )
    dag = bag.dags["audit_export"]

    run = dag.test()

    states = task_states(run)
    output = capfd.readouterr().out
    assert str(run.state) == "failed"
    # The DAG gives every task two retries; AirflowFailException skips them.
    assert states["anchor"] == ("failed", 1, 2)
    assert states["export"][0] == "upstream_failed"
    assert "AirflowFailException: Id column 'workspace_id' of 'public.audit_partitioned' is not proven unique" in output
    assert "ADD PRIMARY KEY" in output
    after = world.snapshot()
    assert after.relations == baseline.relations
    assert after.state_rows == baseline.state_rows
    assert after.files == baseline.files


def test_backfill_dag_rejects_reversed_window(airflow_metadata_db, world, baseline, monkeypatch, capfd):
    bag = load_dag(
        "audit_backfill.py",
        monkeypatch,
        AUDIT_EXPORT_POSTGRES_CONN_ID=PG_CONN_ID,
        AUDIT_EXPORT_DESTINATION=world.local_uri,
    )
    dag = bag.dags["audit_backfill"]

    run = dag.test(run_conf={"from": WINDOW_TO, "to": WINDOW_FROM})

    states = task_states(run)
    output = capfd.readouterr().out
    assert str(run.state) == "failed"
    assert states["plan"] == ("failed", 1, 0)
    assert f"AirflowFailException: Invalid window: from {datetime.fromisoformat(WINDOW_TO).isoformat()}" in output
    assert "swap them or widen the window" in output
    after = world.snapshot()
    assert after.files == baseline.files
    assert after.state_rows == baseline.state_rows
