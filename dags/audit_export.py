"""Scheduled steady-state export of the audit table: anchor, then export what was committed since.

Settings come from the AUDIT_EXPORT_* environment variables described in the README.
Trigger a manual run with {"reanchor": true} to move the cursor to now and record the gap.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_audit_export.dag_settings import DagSettings
from airflow_audit_export.operators import AnchorOperator, XminExportOperator

config = DagSettings.from_environment()

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
        export_name=config.name,
        table=config.table,
        postgres_conn_id=config.postgres_conn_id,
        force="{{ params.reanchor }}",
        timestamp_column=config.timestamp_column,
        id_column=config.id_column,
        state_table=config.state_table,
    )
    export = XminExportOperator(
        task_id="export",
        export_name=config.name,
        table=config.table,
        destination=config.destination,
        postgres_conn_id=config.postgres_conn_id,
        aws_conn_id=config.aws_conn_id,
        timestamp_column=config.timestamp_column,
        id_column=config.id_column,
        state_table=config.state_table,
    )
    anchor >> export
