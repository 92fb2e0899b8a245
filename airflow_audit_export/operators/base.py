"""Arguments and helpers shared by the audit export operators."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
import psycopg

from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import open_connection

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


def build_settings(export_name: str, table: str, options: dict) -> ExportSettings:
    """Build validated settings from rendered operator arguments; ``None`` options keep their defaults."""
    given = {k: v for k, v in options.items() if v is not None}
    for name in ("page_rows", "rows_per_object", "max_xid_interval", "max_rows_per_run"):
        if isinstance(given.get(name), str) and given[name].strip().isdigit():
            given[name] = int(given[name])
    return ExportSettings.create(name=export_name, table=table, **given)


@contextlib.contextmanager
def source_connection(postgres_conn_id: str) -> Iterator[psycopg.Connection]:
    """Open the exporter's connection and close it on exit, which also releases its advisory locks."""
    conn = open_connection(postgres_conn_id)
    try:
        yield conn
    finally:
        conn.close()

