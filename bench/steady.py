"""Steady-state figures: the cost of one ``run_export`` on a large table, and a backlog drained under a timeout.

Both run ``run_export`` in the benchmark's own process, as the least-privilege
export role, and read the statements' costs from ``pg_stat_statements``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.exporting import run_export
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import configure_connection
from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.schema import EXPORT_ROLE, generate_history, insert_rows
from airflow_audit_export.writing import parse_destination

from bench.generate import HISTORY_DAYS, INSERT_BATCH_ROWS, create_schema

log = logging.getLogger(__name__)

TABLE = "public.audit_partitioned"
STATEMENT_TIMEOUT = "1s"
#: Gid of the prepared transaction that pins the drain's anchor floor. It is rolled back before the backlog is written.
PIN_GID = "bench_pin_anchor_floor"

STATEMENT_COSTS = """
SELECT
    coalesce(sum(calls), 0)::bigint,
    coalesce(sum(shared_blks_hit + shared_blks_read), 0)::bigint,
    coalesce(sum(shared_blks_hit + shared_blks_read) FILTER (WHERE query LIKE '%%row_to_json%%'), 0)::bigint,
    coalesce(sum(calls) FILTER (WHERE query LIKE '%%row_to_json%%'), 0)::bigint,
    coalesce(max(max_exec_time), 0),
    coalesce(sum(total_exec_time) FILTER (WHERE query LIKE '%%row_to_json%%'), 0)
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND userid = %s::regrole
"""


def _exporter(cluster: PostgresCluster, database: str) -> psycopg.Connection:
    conn = cluster.connect(database, user=EXPORT_ROLE)
    configure_connection(conn)
    return conn


def _statement_costs(admin: psycopg.Connection) -> dict:
    """Sum the export role's statements in this database since the last ``pg_stat_statements_reset()``."""
    row = admin.execute(STATEMENT_COSTS, (EXPORT_ROLE,)).fetchone()
    calls, buffers, reader_buffers, reader_calls, slowest_ms, reader_ms = row
    return {
        "statements": calls,
        "shared_buffers": buffers,
        "reader_statements": reader_calls,
        "reader_shared_buffers": reader_buffers,
        "slowest_statement_ms": round(float(slowest_ms), 2),
        "reader_exec_seconds": round(float(reader_ms) / 1000, 2),
    }


def measure_steady_state(
    cluster: PostgresCluster, database: str, *, table_rows: int, new_rows: int, destination_dir: Path
) -> dict:
    """Anchor, insert ``new_rows`` rows stamped now, and measure the one ``run_export`` that exports them.

    Shared buffers touched are ``shared_blks_hit + shared_blks_read`` of every
    statement the export role ran during the run, from ``pg_stat_statements``.
    """
    settings = ExportSettings.create(name="bench_steady", table=TABLE)
    destination = parse_destination(f"file://{destination_dir}")
    with cluster.connect(database) as admin, _exporter(cluster, database) as exporter:
        anchor_export(exporter, settings)
        insert_rows(admin, new_rows)
        admin.execute("SELECT pg_stat_statements_reset()")
        started = time.monotonic()
        stats = run_export(exporter, settings, destination)
        seconds = time.monotonic() - started
        costs = _statement_costs(admin)
    if stats["rows"] != new_rows:
        raise RuntimeError(f"The steady-state run exported {stats['rows']} rows, expected {new_rows}.")
    return {
        "table_rows": table_rows,
        "rows": stats["rows"],
        "seconds": seconds,
        "page_statements": stats["statements"],
        **costs,
    }


class _CancelCounter(logging.Handler):
    """Counts the reader's warnings about pages cancelled by ``statement_timeout``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.cancelled = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "cancelled" in record.getMessage():
            self.cancelled += 1


def measure_drain(cluster: PostgresCluster, database: str, *, rows: int, destination_dir: Path) -> dict:
    """Drain a 30-day backlog of ``rows`` rows with ``statement_timeout = 1s`` set on the export role.

    The backlog must commit after the anchor, and the anchor's floor must lie
    before the backlog's oldest timestamp. A prepared transaction open at the
    anchor makes the floor fall back to ``now - fallback_window`` (31 days
    here), because its start time is unknown. It is rolled back before the
    backlog is written. Runs repeat until one completes without draining, as
    the scheduled DAG would.
    """
    end = datetime.now(timezone.utc)
    create_schema(cluster, database, end)
    settings = ExportSettings.create(
        name="bench_drain", table=TABLE, fallback_window=timedelta(days=HISTORY_DAYS + 1)
    )
    destination = parse_destination(f"file://{destination_dir}")

    with cluster.connect(database) as admin:
        admin.execute("BEGIN")
        insert_rows(admin, 1, table="audit")
        admin.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(PIN_GID)))
        try:
            with _exporter(cluster, database) as exporter:
                anchor = anchor_export(exporter, settings)
        finally:
            admin.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(PIN_GID)))
        if anchor.floor > end - timedelta(days=HISTORY_DAYS):
            raise RuntimeError(f"The drain's anchor floor {anchor.floor} is inside the backlog, so rows would be skipped.")

        generated = time.monotonic()
        generate_history(admin, rows, days=HISTORY_DAYS, end=end, batch=INSERT_BATCH_ROWS)
        generate_seconds = time.monotonic() - generated
        admin.execute(
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET statement_timeout = {}").format(
                sql.Identifier(EXPORT_ROLE), sql.Identifier(database), sql.Literal(STATEMENT_TIMEOUT)
            )
        )
        admin.execute("SELECT pg_stat_statements_reset()")

        counter = _CancelCounter()
        reader_log = logging.getLogger("airflow_audit_export.reading")
        reader_log.addHandler(counter)
        runs = []
        started = time.monotonic()
        try:
            # The role setting applies to sessions opened after it.
            with _exporter(cluster, database) as exporter:
                timeout = exporter.execute("SHOW statement_timeout").fetchone()[0]
                # A run stops at max_rows_per_run rows or at max_run_duration, so this bound only stops a drain
                # that makes no progress.
                max_runs = rows // settings.max_rows_per_run + 10
                while len(runs) < max_runs:
                    runs.append(run_export(exporter, settings, destination))
                    if runs[-1]["completed"] and not runs[-1]["draining"]:
                        break
        finally:
            reader_log.removeHandler(counter)
        seconds = time.monotonic() - started
        costs = _statement_costs(admin)

    if runs[-1]["draining"] or not runs[-1]["completed"]:
        raise RuntimeError(f"The drain did not finish in {len(runs)} runs.")
    # A completed run reports every row of its xid range, including rows written by earlier capped runs.
    exported = sum(run["rows"] for run in runs if run["completed"])
    if exported != rows:
        raise RuntimeError(f"The drain exported {exported} rows, expected {rows}.")
    return {
        "rows": exported,
        "statement_timeout": timeout,
        "runs": len(runs),
        "page_statements": sum(run["statements"] for run in runs),
        "slowest_page_statement_seconds": max(run["slowest_statement_seconds"] for run in runs),
        "cancelled_pages": counter.cancelled,
        "seconds": seconds,
        "generate_seconds": round(generate_seconds, 1),
        **costs,
    }
