"""AnchorOperator: create or re-anchor an export's cursor before the export task runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.operators.base import (
    check_state_table,
    fail_on_invalid_input,
    operator_settings,
    source_connection,
)

RETRY_NOTE = (
    "The task can be retried: the anchor writes its state row in one statement, so no half-written row is left."
)

TRUE_STRINGS = ("true", "1", "yes", "on")
FALSE_STRINGS = ("false", "0", "no", "off", "none", "")


def parse_flag(name: str, value: Any) -> bool:
    """Read a boolean argument that may arrive as a rendered template string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + FALSE_STRINGS:
        return value.strip().lower() in TRUE_STRINGS
    raise ValueError(f"Invalid {name} {value!r}: expected true or false.")


class AnchorOperator(BaseOperator):
    """
    Create the export's state row on first use, or re-anchor it.

    With no state row, the operator takes an observation and sets the cursor to
    the snapshot's ``xmin``: rows committed after that are exported by
    :class:`~airflow_audit_export.operators.xmin_export.XminExportOperator`,
    older rows are history for a backfill. With a state row it changes nothing,
    unless ``force`` is set, the backlog is older than ``max_backlog``, or the
    database was restored or cloned. In those cases it moves the cursor to a
    fresh snapshot and records the skipped window as a gap. The gap is logged
    as a warning and returned.

    :param export_name: Name of the export: its state row, advisory lock and object key prefix. (templated)
    :param table: Schema-qualified source table, for example ``public.audit_partitioned``. (templated)
    :param postgres_conn_id: Airflow connection to the source database.
    :param force: Re-anchor even when the backlog is small; a bool or a rendered
        template such as ``"{{ params.reanchor }}"``. (templated)
    :param timestamp_column: ``timestamptz`` column set at insert time. (templated)
    :param id_column: Unique, orderable id column. (templated)
    :param state_table: Schema-qualified state table, created on first use. (templated)
    :param tuning: Overrides of other
        :class:`~airflow_audit_export.settings.ExportSettings` fields, such as
        ``floor_margin``, ``fallback_window`` or ``max_backlog`` (durations as
        ``timedelta`` or seconds).
    """

    template_fields: Sequence[str] = (
        "export_name",
        "table",
        "force",
        "timestamp_column",
        "id_column",
        "state_table",
    )
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        export_name: str,
        table: str,
        postgres_conn_id: str = "postgres_default",
        force: bool | str = False,
        timestamp_column: str = "timestamp",
        id_column: str = "id",
        state_table: str = "public.audit_export_state",
        tuning: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.export_name = export_name
        self.table = table
        self.postgres_conn_id = postgres_conn_id
        self.force = force
        self.timestamp_column = timestamp_column
        self.id_column = id_column
        self.state_table = state_table
        self.tuning = tuning or {}

    def execute(self, context) -> dict:
        with fail_on_invalid_input():
            settings = operator_settings(self)
            force = parse_flag("force", self.force)

            with source_connection(self.postgres_conn_id, retry_note=RETRY_NOTE) as conn:
                check_state_table(conn, settings)
                result = anchor_export(conn, settings, force=force)
            return result.to_xcom()
