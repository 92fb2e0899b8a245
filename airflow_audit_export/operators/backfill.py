"""Backfill operators: plan a validated window, export one page range, summarize the window."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator

from airflow_audit_export.backfilling import export_range, write_manifest
from airflow_audit_export.gaps import find_gap, mark_gap_backfill
from airflow_audit_export.operators.base import (
    check_state_table,
    fail_on_invalid_input,
    operator_settings,
    source_connection,
)
from airflow_audit_export.ranges import MIN_PAGES_PER_RANGE, plan_ranges
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import describe_backfill_sources
from airflow_audit_export.window import Window, WindowError, check_window_settled, parse_instant, parse_window
from airflow_audit_export.writing import parse_destination

DEFAULT_MAX_RANGES = 64

#: Keys of one item of the plan task's output, which each mapped range task receives as ``export_range``.
RANGE_SPEC_KEYS = ("index", "from", "to", "window_from", "window_to", "page_rows", "label")

PLAN_RETRY_NOTE = "The task can be retried: planning writes nothing."
RANGE_RETRY_NOTE = (
    "The task can be retried: it writes the range's objects again under the same keys with the same bytes."
)
SUMMARY_RETRY_NOTE = "The task can be retried: it writes the same manifest again."


@dataclasses.dataclass(frozen=True)
class RangeSpec:
    """One validated item of the plan task's output: a page range ``[start, end)`` inside ``window``."""

    index: int
    label: str
    window: Window
    start: datetime
    end: datetime
    page_rows: Any


def parse_range_spec(spec: Any) -> RangeSpec:
    """Validate one item of the plan task's output, raising ``ValueError`` that names the bad key and the fix."""
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"Invalid export_range {spec!r}: expected one item of the plan task's output, a mapping with the keys "
            f"{', '.join(RANGE_SPEC_KEYS)}. Map the task over BackfillWindowOperator's output."
        )
    missing = [key for key in RANGE_SPEC_KEYS if key not in spec]
    if missing:
        raise ValueError(
            f"Invalid export_range {dict(spec)!r}: it has no {', '.join(missing)}. Map the task over "
            "BackfillWindowOperator's output, whose items have every key."
        )
    window_start = parse_instant("export_range window_from", spec["window_from"])
    window_end = parse_instant("export_range window_to", spec["window_to"])
    start = parse_instant("export_range from", spec["from"])
    end = parse_instant("export_range to", spec["to"])
    if not window_start <= start < end <= window_end:
        raise WindowError(
            f"Invalid export_range [{start.isoformat()}, {end.isoformat()}): it must be a non-empty range inside "
            f"its window [{window_start.isoformat()}, {window_end.isoformat()}). Pass the plan task's output unchanged."
        )
    if isinstance(spec["index"], bool) or not isinstance(spec["index"], int) or spec["index"] < 0:
        raise ValueError(f"Invalid export_range index {spec['index']!r}: expected an integer >= 0.")
    return RangeSpec(
        index=spec["index"],
        label=str(spec["label"]),
        window=Window(window_start, window_end),
        start=start,
        end=end,
        page_rows=spec["page_rows"],
    )


def parse_range_results(value: Any) -> list[Mapping]:
    """Validate the mapped range tasks' results, raising ``ValueError`` that names the bad item and the fix."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(
            f"Invalid range_results {value!r}: expected the list of BackfillRangeOperator results, for example "
            "export_ranges.output."
        )
    results = list(value)
    for result in results:
        objects = result.get("objects") if isinstance(result, Mapping) else None
        valid = (
            isinstance(objects, list)
            and isinstance(result.get("index"), int)
            and all(isinstance(o, Mapping) and {"key", "rows", "bytes"} <= o.keys() for o in objects)
        )
        if not valid:
            raise ValueError(
                f"Invalid item {result!r} in range_results: expected a BackfillRangeOperator result with an "
                "index and objects of key, rows and bytes. Pass the mapped range task's output unchanged."
            )
    return sorted(results, key=lambda r: r["index"])


class _BackfillBase(BaseOperator):
    """Arguments shared by the backfill operators."""

    template_fields: Sequence[str] = (
        "export_name",
        "table",
        "legacy_table",
        "destination",
        "timestamp_column",
        "id_column",
        "columns",
        "state_table",
    )

    def __init__(
        self,
        *,
        export_name: str,
        table: str,
        destination: str,
        postgres_conn_id: str = "postgres_default",
        aws_conn_id: str | None = "aws_default",
        legacy_table: str | None = None,
        timestamp_column: str = "timestamp",
        id_column: str = "id",
        columns: list[str] | str | None = None,
        state_table: str = "public.audit_export_state",
        tuning: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.export_name = export_name
        self.table = table
        self.destination = destination
        self.postgres_conn_id = postgres_conn_id
        self.aws_conn_id = aws_conn_id
        self.legacy_table = legacy_table
        self.timestamp_column = timestamp_column
        self.id_column = id_column
        self.columns = columns
        self.state_table = state_table
        self.tuning = tuning or {}


class BackfillWindowOperator(_BackfillBase):
    """
    Validate a backfill window and split it into page ranges for mapped export tasks.

    Rejects, before any side effect and with the value and the fix in the
    message: ``from >= to``, a date-time without offset, a window entirely in
    the future, and a ``to`` that is not settled (with the largest allowed
    ``to``, the missing grant, or the prepared transaction that blocks it).
    A window equal to a gap recorded by a re-anchor skips the settled check:
    rows committed after the re-anchor are above the new cursor and reach the
    destination through the steady-state export.

    :param export_name: Name of the export. (templated)
    :param table: Schema-qualified source table. (templated)
    :param destination: ``file:///absolute/path`` or ``s3://bucket/prefix``. (templated)
    :param window_from: Start of the window, ISO 8601 with offset. (templated)
    :param window_to: End of the window, exclusive, ISO 8601 with offset. (templated)
    :param page_rows: Rows per keyset page (``LIMIT``). (templated)
    :param max_ranges: Maximum number of page ranges, capped by Airflow's ``core.max_map_length``. A
        window also gets no more ranges than its estimated rows divided by ten pages (``page_rows``).
    :param postgres_conn_id: Airflow connection to the source database.
    :param aws_conn_id: Airflow connection for an ``s3://`` destination.
    :param legacy_table: Older unpartitioned table with the same columns, exported too. (templated)
    :param timestamp_column: ``timestamptz`` column. (templated)
    :param id_column: Unique, orderable id column. (templated)
    :param columns: Columns to export; all when empty. (templated)
    :param state_table: Schema-qualified state table, read for recorded gaps. (templated)
    :param tuning: Overrides of other ``ExportSettings`` fields, such as ``rows_per_object``.
    """

    template_fields: Sequence[str] = (*_BackfillBase.template_fields, "window_from", "window_to", "page_rows")
    ui_color = "#fef7e0"

    def __init__(
        self,
        *,
        window_from: str,
        window_to: str,
        page_rows: int | str = 10_000,
        max_ranges: int = DEFAULT_MAX_RANGES,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.window_from = window_from
        self.window_to = window_to
        self.page_rows = page_rows
        self.max_ranges = max_ranges

    def execute(self, context) -> list[dict]:
        with fail_on_invalid_input():
            from airflow.sdk.configuration import conf

            window = parse_window(self.window_from, self.window_to)
            settings = operator_settings(self, page_rows=self.page_rows)
            max_map_length = conf.getint("core", "max_map_length")
            if isinstance(self.max_ranges, bool) or not isinstance(self.max_ranges, int) or self.max_ranges < 1:
                raise ValueError(f"Invalid max_ranges {self.max_ranges!r}: expected a positive integer.")
            max_ranges = min(self.max_ranges, max_map_length)
            destination = parse_destination(self.destination, aws_conn_id=self.aws_conn_id)

            with source_connection(self.postgres_conn_id, retry_note=PLAN_RETRY_NOTE) as conn:
                check_state_table(conn, settings)
                tables = describe_backfill_sources(conn, settings)
                gap = find_gap(conn, settings, window)
                if gap is None:
                    largest_to = check_window_settled(conn, settings, window)
                    self.log.info("Window [%s, %s) is settled (largest allowed to: %s)", window.start, window.end, largest_to)
                else:
                    self.log.info(
                        "Window [%s, %s) is the gap recorded at %s (%s); the settled check is skipped because rows "
                        "committed after the re-anchor are above the new cursor",
                        window.start,
                        window.end,
                        gap.get("recorded_at"),
                        gap.get("reason"),
                    )
                destination.check_writable()
                min_range_rows = MIN_PAGES_PER_RANGE * settings.page_rows
                ranges = plan_ranges(
                    conn, [table for _, table in tables], window, max_ranges, min_range_rows=min_range_rows
                )

            self.log.info(
                "Planned %s ranges for [%s, %s), about %s rows in total (max_ranges %s, max_map_length %s, "
                "at most one range per %s estimated rows)",
                len(ranges),
                window.start,
                window.end,
                sum(r.estimated_rows for r in ranges),
                self.max_ranges,
                max_map_length,
                min_range_rows,
            )
            return [
                {**r.to_json(), "window_from": window.start.isoformat(), "window_to": window.end.isoformat(), "page_rows": settings.page_rows}
                for r in ranges
            ]


class BackfillRangeOperator(_BackfillBase):
    """
    Export one page range of a backfill window, from the main table and the legacy table.

    Meant to be mapped over the output of :class:`BackfillWindowOperator`, one
    task per range. A retry rewrites the same keys with the same bytes.

    :param export_range: One range from :class:`BackfillWindowOperator`, with the window and page size.
    :param export_name: Name of the export. (templated)
    :param table: Schema-qualified source table. (templated)
    :param destination: ``file:///absolute/path`` or ``s3://bucket/prefix``. (templated)
    :param postgres_conn_id: Airflow connection to the source database.
    :param aws_conn_id: Airflow connection for an ``s3://`` destination.
    :param legacy_table: Older unpartitioned table with the same columns, exported too. (templated)
    :param timestamp_column: ``timestamptz`` column. (templated)
    :param id_column: Unique, orderable id column. (templated)
    :param columns: Columns to export; all when empty. (templated)
    :param state_table: Schema-qualified state table. (templated)
    :param tuning: Overrides of other ``ExportSettings`` fields, such as ``rows_per_object`` or ``compression``.
    """

    ui_color = "#fef7e0"

    def __init__(self, *, export_range: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.export_range = export_range

    def execute(self, context) -> dict:
        with fail_on_invalid_input():
            spec = parse_range_spec(self.export_range)
            window = spec.window
            settings = operator_settings(self, page_rows=spec.page_rows)
            destination = parse_destination(self.destination, aws_conn_id=self.aws_conn_id)
            self.log.info("Exporting range %s of window [%s, %s)", spec.label, window.start, window.end)

            with source_connection(self.postgres_conn_id, retry_note=RANGE_RETRY_NOTE) as conn:
                check_state_table(conn, settings)
                tables = describe_backfill_sources(conn, settings)
                destination.check_writable()
                result = export_range(
                    conn,
                    tables,
                    destination,
                    name=settings.name,
                    window=window,
                    start=spec.start,
                    end=spec.end,
                    page_rows=settings.page_rows,
                    rows_per_object=settings.rows_per_object,
                    compression=settings.compression,
                )
            return {**result, "index": spec.index, "label": spec.label}


class BackfillSummaryOperator(_BackfillBase):
    """
    Write the window's manifest, every key with its row count, and return the totals.

    When the window is a recorded gap, the gap is marked as backfilled in the state table.

    :param range_results: Return values of the mapped :class:`BackfillRangeOperator` tasks.
    :param window_from: Start of the window. (templated)
    :param window_to: End of the window. (templated)
    :param export_name: Name of the export. (templated)
    :param table: Schema-qualified source table. (templated)
    :param destination: ``file:///absolute/path`` or ``s3://bucket/prefix``. (templated)
    :param postgres_conn_id: Airflow connection to the source database.
    :param aws_conn_id: Airflow connection for an ``s3://`` destination.
    :param state_table: Schema-qualified state table. (templated)
    """

    template_fields: Sequence[str] = (*_BackfillBase.template_fields, "window_from", "window_to", "range_results")
    ui_color = "#fef7e0"

    def __init__(self, *, range_results: Any, window_from: str, window_to: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.range_results = range_results
        self.window_from = window_from
        self.window_to = window_to

    def execute(self, context) -> dict:
        with fail_on_invalid_input():
            window = parse_window(self.window_from, self.window_to)
            settings = operator_settings(self)
            destination = parse_destination(self.destination, aws_conn_id=self.aws_conn_id)
            results = parse_range_results(self.range_results)

            with source_connection(self.postgres_conn_id, retry_note=SUMMARY_RETRY_NOTE) as conn:
                # Every input is checked before the manifest is written, so a rejected task writes nothing.
                check_state_table(conn, settings)
                describe_backfill_sources(conn, settings)
                destination.check_writable()
                summary = write_manifest(destination, settings.name, window, results)
                if mark_gap_backfill(conn, settings, window, {"manifest": summary["manifest"], "rows": summary["rows"]}):
                    summary["gap"] = "done"
            self.log.info(
                "Backfill of [%s, %s) complete: %s rows in %s objects over %s ranges; manifest %s",
                window.start,
                window.end,
                summary["rows"],
                summary["objects"],
                summary["ranges"],
                summary["manifest"],
            )
            return summary
