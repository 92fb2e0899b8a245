"""Scheduled steady-state export of the audit table: anchor, then export what was committed since.

Settings come from the AUDIT_EXPORT_* environment variables described in the README.
Trigger a manual run with {"reanchor": true} to move the cursor to now and record the gap;
with AUDIT_EXPORT_GAP_POLICY=backfill (the default) a recorded gap triggers audit_backfill.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param

from airflow_audit_export.dag_settings import DagSettings
from airflow_audit_export.gaps import gap_backfill_conf
from airflow_audit_export.operators import AnchorOperator, XminExportOperator

config = DagSettings.from_environment()
source = config.source_arguments()

with DAG(
    dag_id="audit_export",
    description=f"Export {config.table} to {config.destination} in commit order",
    schedule=config.schedule,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["audit-export"],
    params={
        "reanchor": Param(
            False,
            type="boolean",
            description="Move the cursor to now and record the skipped window as a gap for a backfill.",
        ),
    },
    default_args={"retries": 2, "retry_delay": pendulum.duration(seconds=30)},
) as dag:
    anchor = AnchorOperator(
        task_id="anchor",
        force="{{ params.reanchor }}",
        tuning=config.anchor_tuning(),
        **{k: v for k, v in source.items() if k not in ("destination", "aws_conn_id")},
    )
    export = XminExportOperator(task_id="export", **source)
    gap_found = ShortCircuitOperator(
        task_id="gap_found",
        python_callable=gap_backfill_conf,
        op_args=[anchor.output, config.gap_policy],
    )
    backfill_gap = TriggerDagRunOperator(
        task_id="backfill_gap",
        trigger_dag_id="audit_backfill",
        conf=gap_found.output,
        retries=0,
    )

    anchor >> export
    anchor >> gap_found >> backfill_gap
