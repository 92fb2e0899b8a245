"""Arguments and helpers shared by the audit export operators."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from airflow.sdk.exceptions import AirflowFailException

from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import open_connection
from airflow_audit_export.state import StateTableError

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
    given = {k: v for k, v in {**tuning, **options}.items() if v is not None}
    for name in ("page_rows", "rows_per_object", "max_xid_interval", "max_rows_per_run"):
        if isinstance(given.get(name), str) and given[name].strip().isdigit():
            given[name] = int(given[name])
    return ExportSettings.create(name=export_name, table=table, **given)


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
def source_connection(postgres_conn_id: str) -> Iterator[psycopg.Connection]:
    """Open the exporter's connection and close it on exit, which also releases its advisory locks."""
    conn = open_connection(postgres_conn_id)
    try:
        yield conn
    finally:
        conn.close()



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
