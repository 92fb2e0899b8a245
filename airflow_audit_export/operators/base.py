"""Arguments and helpers shared by the audit export operators."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException
from psycopg import sql

from airflow_audit_export.settings import ExportSettings, split_qualified_name
from airflow_audit_export.source import open_connection
from airflow_audit_export.state import StateTableError

#: Columns that every state table has had since the first release. A table without them is another table.
STATE_TABLE_MARKER_COLUMNS = ("export_name", "source_table", "cursor_xid", "cursor_floor", "pending")

#: Operator arguments that map one to one onto :class:`ExportSettings` fields.
SETTINGS_FIELDS = (
    "timestamp_column",
    "id_column",
    "columns",
    "legacy_table",
    "state_table",
    "floor_margin",
    "fallback_window",
    "max_backlog",
    "max_xid_interval",
    "max_rows_per_run",
    "max_run_duration",
    "page_rows",
    "rows_per_object",
    "statement_target",
    "lock_wait",
    "compression",
)


def build_settings(export_name: str, table: str, tuning: dict, options: dict) -> ExportSettings:
    """Build validated settings from rendered operator arguments; ``None`` options keep their defaults.

    ``tuning`` is the operator's free-form ``tuning`` argument, checked against
    :data:`SETTINGS_FIELDS`. ``options`` are the explicit arguments and win over it.
    """
    unknown = sorted(set(tuning) - set(SETTINGS_FIELDS))
    if unknown:
        raise ValueError(f"Unknown tuning options {unknown}: valid options are {', '.join(SETTINGS_FIELDS)}.")
    tuning = _render_integers(tuning)
    options = _render_integers(options)
    # An explicit argument would silently win over the tuning value, so a differing pair is rejected.
    conflicting = sorted(k for k in tuning if options.get(k) is not None and options[k] != tuning[k])
    if conflicting:
        pairs = ", ".join(f"{k} {tuning[k]!r} in tuning and {options[k]!r} as an argument" for k in conflicting)
        raise ValueError(f"Conflicting settings: {pairs}. Set each one in one place only, and remove it from tuning.")
    given = {k: v for k, v in {**tuning, **options}.items() if v is not None}
    return ExportSettings.create(name=export_name, table=table, **given)


def _render_integers(values: dict) -> dict:
    """Turn integer options rendered from templates, such as ``"50"``, back into integers."""
    converted = dict(values)
    for name in ("page_rows", "rows_per_object", "max_xid_interval", "max_rows_per_run"):
        if isinstance(converted.get(name), str) and converted[name].strip().isdigit():
            converted[name] = int(converted[name])
    return converted


#: Operator attributes passed to :class:`ExportSettings` when the operator has them.
OPERATOR_SETTINGS_ATTRIBUTES = ("timestamp_column", "id_column", "columns", "legacy_table", "state_table", "compression")


def operator_settings(operator, **explicit) -> ExportSettings:
    """Build validated settings from an operator's rendered attributes, its ``tuning`` and ``explicit`` values."""
    options = {name: getattr(operator, name, None) for name in OPERATOR_SETTINGS_ATTRIBUTES}
    options["columns"] = options["columns"] or None
    options["legacy_table"] = options["legacy_table"] or None
    options.update(explicit)
    return build_settings(operator.export_name, operator.table, operator.tuning, options)


@contextlib.contextmanager
def source_connection(postgres_conn_id: str, *, retry_note: str) -> Iterator[psycopg.Connection]:
    """Open the exporter's connection and close it on exit, which also releases its advisory locks.

    An undefined connection raises ``ValueError``, so the task fails without
    retries. A connection that fails during the task (a server restart, a
    network cut) raises as it is, for the task's retries, with a note that
    names the connection and describes what a retry does (``retry_note``).
    """
    try:
        conn = open_connection(postgres_conn_id)
    except AirflowNotFoundException as err:
        raise ValueError(
            f"Connection {postgres_conn_id!r} (postgres_conn_id) is not defined: create it, for example with "
            f"AIRFLOW_CONN_{postgres_conn_id.upper()}='postgresql://user:password@host:5432/dbname', or set "
            "postgres_conn_id (AUDIT_EXPORT_POSTGRES_CONN_ID) to an existing connection."
        ) from err
    try:
        yield conn
    except psycopg.OperationalError as err:
        err.add_note(
            f"The source database connection {postgres_conn_id!r} ({conn.info.host}:{conn.info.port}, database "
            f"{conn.info.dbname!r}) failed during the task. {retry_note}"
        )
        raise
    finally:
        conn.close()


def check_state_table(conn: psycopg.Connection, settings: ExportSettings) -> None:
    """Reject a state table in a missing schema, or an existing table that is not a state table.

    Raises ``ValueError`` before anything reads or creates the table. A state
    table that does not exist yet is accepted: the anchor task creates it.
    """
    schema, name = split_qualified_name(settings.state_table, what="state_table")
    schema_exists = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (sql.Identifier(schema).as_string(conn),))
    if not schema_exists.fetchone()[0]:
        raise ValueError(
            f"Invalid state_table {settings.state_table!r}: schema {schema!r} does not exist. Create the schema, "
            "or set state_table (AUDIT_EXPORT_STATE_TABLE) to a table in an existing schema, for example "
            "'public.audit_export_state'."
        )
    columns = {
        row[0]
        for row in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (sql.Identifier(schema, name).as_string(conn),),
        ).fetchall()
    }
    missing = [column for column in STATE_TABLE_MARKER_COLUMNS if column not in columns]
    if columns and missing:
        raise ValueError(
            f"Invalid state_table {settings.state_table!r}: that table is not an export state table (it has no "
            f"column {', '.join(missing)}). Set state_table (AUDIT_EXPORT_STATE_TABLE) to a table of its own, "
            "for example 'public.audit_export_state', which the anchor task creates."
        )



@contextlib.contextmanager
def fail_on_invalid_input() -> Iterator[None]:
    """Turn configuration and input errors into ``AirflowFailException``, so Airflow does not retry them.

    A missing table, an invalid destination or window, or a missing grant fails
    the same way on every try. Database and network errors raise as they are
    and get the task's retries.
    """
    try:
        yield
    except (ValueError, StateTableError) as err:
        raise AirflowFailException(str(err)) from err
