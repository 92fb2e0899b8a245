"""Benchmark databases: the reference schema, filled inside PostgreSQL with ``INSERT ... SELECT generate_series``.

A database of size N has N rows in ``public.audit_partitioned``, evenly spaced
over the 30 days before its ``end``, and optionally ``legacy_rows`` rows in the
legacy table ``public.audit``, spaced over the 30 days before those. The rows
come from :func:`airflow_audit_export.testing.schema.generate_history`, which
inserts batches of generated rows with one statement each, so no row passes
through Python.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timedelta, timezone

import psycopg

from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.schema import apply_export_role, create_reference_schema, generate_history
from airflow_audit_export.window import Window

log = logging.getLogger(__name__)

HISTORY_DAYS = 30
#: Rows per ``INSERT ... SELECT`` statement. Each statement commits on its own.
INSERT_BATCH_ROWS = 500_000
#: Days of partitions created after the history's end, for rows that steady-state checks insert with ``now()``.
FUTURE_PARTITION_DAYS = 2
#: Age of the history's end when generation starts. A backfill's ``to`` must be older than the
#: default ``floor_margin`` (60 s), so a window ending there passes the settled check at once.
END_AGE = timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class BenchDatabase:
    """One generated database and the window that covers every generated row."""

    name: str
    rows: int
    legacy_rows: int
    window: Window
    generate_seconds: float
    size_bytes: int

    @property
    def total_rows(self) -> int:
        return self.rows + self.legacy_rows


def create_schema(cluster: PostgresCluster, name: str, end: datetime) -> None:
    """Create database ``name`` with the reference schema, the export role and ``pg_stat_statements``.

    Partitions cover the 30 days before ``end`` and two days after it. The
    extension is created only when the cluster preloads it.
    """
    cluster.create_database(name)
    with cluster.connect(name) as conn:
        first_day = (end - timedelta(days=HISTORY_DAYS)).astimezone(timezone.utc).date()
        last_day = (end + timedelta(days=FUTURE_PARTITION_DAYS)).astimezone(timezone.utc).date()
        create_reference_schema(conn, first_day=first_day, last_day=last_day)
        apply_export_role(conn)
        preloaded = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        if "pg_stat_statements" in preloaded:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def fill(conn: psycopg.Connection, rows: int, *, legacy_rows: int, end: datetime) -> None:
    """Insert the history rows, then vacuum so that no measured reader pays for setting hint bits."""
    generate_history(
        conn, rows, days=HISTORY_DAYS, end=end, legacy_rows=legacy_rows, batch=INSERT_BATCH_ROWS
    )
    conn.execute("VACUUM (ANALYZE) public.audit_partitioned")
    if legacy_rows:
        conn.execute("VACUUM (ANALYZE) public.audit")


def create_bench_database(
    cluster: PostgresCluster, name: str, rows: int, *, legacy_rows: int, end: datetime | None = None
) -> BenchDatabase:
    """Create and fill one benchmark database.

    ``end`` defaults to five minutes ago, so today's partition contains history
    rows too, as it does in a live system.
    """
    end = end or datetime.now(timezone.utc) - END_AGE
    started = time.monotonic()
    create_schema(cluster, name, end)
    with cluster.connect(name) as conn:
        fill(conn, rows, legacy_rows=legacy_rows, end=end)
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    elapsed = time.monotonic() - started
    log.info("Generated database %s: %s rows and %s legacy rows in %.1f s", name, rows, legacy_rows, elapsed)
    # Legacy rows lie in the 30 days before the main table's range, so the window spans both.
    window_start = end - timedelta(days=2 * HISTORY_DAYS) if legacy_rows else end - timedelta(days=HISTORY_DAYS)
    return BenchDatabase(
        name=name,
        rows=rows,
        legacy_rows=legacy_rows,
        window=Window(window_start.astimezone(timezone.utc), end.astimezone(timezone.utc)),
        generate_seconds=round(elapsed, 1),
        size_bytes=size,
    )
