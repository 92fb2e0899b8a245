"""XminExportOperator: export the rows committed since the cursor, in commit order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from airflow_audit_export.exporting import run_export
from airflow_audit_export.operators.base import (
    check_state_table,
    fail_on_invalid_input,
    operator_settings,
    source_connection,
)
from airflow_audit_export.state import LockNotAcquired
from airflow_audit_export.status import format_status, read_status
from airflow_audit_export.writing import parse_destination

RETRY_NOTE = (
    "No row is lost: the cursor moves only after the range's objects are written, and a retry of the task "
    "resumes the pending xid range from its last saved object."
)


class XminExportOperator(BaseOperator):
    """
    Export the rows of a PostgreSQL table committed since the export's cursor.

    Rows are selected by their ``xmin`` in ``[cursor, hi)`` and bounded by a
    timestamp floor that covers every transaction that could have written in
    that range, read in ``(timestamp, id)`` keyset pages, and written as NDJSON
    objects under ``dt=YYYY-MM-DD`` folders. A failed attempt leaves a pending
    range that the retry resumes exactly. When another run of the same export
    holds its lock, the task is skipped. The task emits an Asset event for the
    destination with the run's rows, objects and bytes in its extra.

    :param export_name: Name of the export, as given to the anchor task. (templated)
    :param table: Schema-qualified source table. (templated)
    :param destination: ``file:///absolute/path`` or ``s3://bucket/prefix``. (templated)
    :param postgres_conn_id: Airflow connection to the source database.
    :param aws_conn_id: Airflow connection for an ``s3://`` destination; its
        extra may set ``endpoint_url`` for MinIO or another S3-compatible store.
    :param timestamp_column: ``timestamptz`` column set at insert time. (templated)
    :param id_column: Unique, orderable id column. (templated)
    :param columns: Columns to export, a list or a comma-separated string; all when empty. (templated)
    :param state_table: Schema-qualified state table. (templated)
    :param compression: ``gzip`` (default) or ``none``. (templated)
    :param tuning: Overrides of other
        :class:`~airflow_audit_export.settings.ExportSettings` fields, such as
        ``max_xid_interval``, ``max_rows_per_run``, ``max_run_duration``,
        ``page_rows`` or ``rows_per_object``.
    """

    template_fields: Sequence[str] = (
        "export_name",
        "table",
        "destination",
        "timestamp_column",
        "id_column",
        "columns",
        "state_table",
        "compression",
    )
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        export_name: str,
        table: str,
        destination: str,
        postgres_conn_id: str = "postgres_default",
        aws_conn_id: str | None = "aws_default",
        timestamp_column: str = "timestamp",
        id_column: str = "id",
        columns: list[str] | str | None = None,
        state_table: str = "public.audit_export_state",
        compression: str = "gzip",
        tuning: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        if "outlets" not in kwargs and isinstance(destination, str) and "{{" not in destination:
            kwargs["outlets"] = [Asset(destination.rstrip("/"))]
        super().__init__(**kwargs)
        self.export_name = export_name
        self.table = table
        self.destination = destination
        self.postgres_conn_id = postgres_conn_id
        self.aws_conn_id = aws_conn_id
        self.timestamp_column = timestamp_column
        self.id_column = id_column
        self.columns = columns
        self.state_table = state_table
        self.compression = compression
        self.tuning = tuning or {}

    def execute(self, context) -> dict:
        with fail_on_invalid_input():
            settings = operator_settings(self)
            destination = parse_destination(self.destination, aws_conn_id=self.aws_conn_id)

            with source_connection(self.postgres_conn_id, retry_note=RETRY_NOTE) as conn:
                check_state_table(conn, settings)
                try:
                    stats = run_export(conn, settings, destination)
                except LockNotAcquired as err:
                    self.log.warning("Skipping this run: %s", err)
                    raise AirflowSkipException(str(err)) from err
                status = read_status(conn, settings.state_table, settings.name)

            self.log.info("Status after this run:\n%s", format_status(status))
            self._emit_asset_event(context, destination.uri, stats)
            return stats

    def _emit_asset_event(self, context, uri: str, stats: dict) -> None:
        for outlet in self.outlets:
            if isinstance(outlet, Asset) and outlet.uri == uri:
                context["outlet_events"][outlet].extra = {
                    "export_name": self.export_name,
                    "rows": stats["rows"],
                    "objects": stats["objects"],
                    "bytes": stats["bytes"],
                    "cursor": stats["cursor"],
                    "draining": stats["draining"],
                }
