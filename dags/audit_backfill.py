"""Manual backfill of the audit table over a [from, to) window, one mapped task per page range.

Trigger it from the UI form (date-time pickers) or with
`airflow dags test audit_backfill -c '{"from": "2026-01-01T00:00:00Z", "to": "2026-01-08T00:00:00Z"}'`.
Settings come from the same AUDIT_EXPORT_* environment variables as audit_export.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_audit_export.dag_settings import DagSettings
from airflow_audit_export.operators.backfill import (
    BackfillRangeOperator,
    BackfillSummaryOperator,
    BackfillWindowOperator,
)

config = DagSettings.from_environment()
source = {**config.source_arguments(), "legacy_table": config.legacy_table}

with DAG(
    dag_id="audit_backfill",
    description=f"Backfill a window of {config.table} to {config.destination}",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # Runs only when triggered, so it starts unpaused: a gap backfill triggered by audit_export must not wait.
    is_paused_upon_creation=False,
    tags=["audit-export"],
    params={
        "from": Param(
            type="string",
            format="date-time",
            title="From",
            description="Start of the window (inclusive), a date-time with offset, for example 2026-01-01T00:00:00Z.",
        ),
        "to": Param(
            type="string",
            format="date-time",
            title="To",
            description="End of the window (exclusive); it must be settled: older than every open transaction.",
        ),
        "page_rows": Param(
            10_000,
            type="integer",
            minimum=1,
            maximum=1_000_000,
            description="Rows per page. A window gets at most one mapped range per ten pages of estimated rows.",
        ),
    },
) as dag:
    plan = BackfillWindowOperator(
        task_id="plan",
        window_from="{{ params['from'] }}",
        window_to="{{ params['to'] }}",
        page_rows="{{ params.page_rows }}",
        **source,
    )
    export_ranges = BackfillRangeOperator.partial(
        task_id="export_range",
        retries=3,
        retry_delay=pendulum.duration(seconds=20),
        max_active_tis_per_dagrun=config.backfill_max_active_ranges,
        map_index_template="{{ task.export_range['label'] }}",
        **source,
    ).expand(export_range=plan.output)
    summary = BackfillSummaryOperator(
        task_id="summary",
        range_results=export_ranges.output,
        window_from="{{ params['from'] }}",
        window_to="{{ params['to'] }}",
        **source,
    )
