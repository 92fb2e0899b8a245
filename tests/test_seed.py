"""The seed command of the Docker Compose stack, run against the session's throwaway PostgreSQL cluster."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from airflow_audit_export.testing.schema import EXPORT_ROLE, partition_name
from airflow_audit_export.testing.seed import (
    PARTITION_DAYS_AHEAD,
    PARTITION_DAYS_BEFORE,
    keep_writing,
    main,
)

HISTORY_ROWS = 300
PASSWORD = "seed-test-password-7f3a"


@pytest.fixture
def seed_database(pg_cluster):
    """An empty database, dropped after the test."""
    name = f"seed_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    yield name
    with pg_cluster.connect() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def run_seed(pg_cluster, database: str) -> int:
    return main(
        [
            "--dsn", pg_cluster.uri(database),
            "--history-rows", str(HISTORY_ROWS),
            "--history-days", "5",
            "--exporter-password", PASSWORD,
            "--connect-timeout", "5",
        ]
    )  # fmt: skip


def test_seed_twice_is_idempotent(pg_cluster, seed_database, caplog):
    caplog.set_level(logging.INFO)

    assert run_seed(pg_cluster, seed_database) == 0, "first seed run failed"
    assert run_seed(pg_cluster, seed_database) == 0, "second seed run failed"

    with pg_cluster.connect(seed_database) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename IN ('audit', 'audit_export_state')"
            ).fetchall()
        }
        partitioned = conn.execute("SELECT to_regclass('public.audit_partitioned')").fetchone()[0]
        partitions = {
            row[0]
            for row in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'public.audit_partitioned'::regclass"
            ).fetchall()
        }
        rows = conn.execute("SELECT count(*) FROM public.audit_partitioned").fetchone()[0]
        state_rows = conn.execute("SELECT count(*) FROM public.audit_export_state").fetchone()[0]

    assert partitioned is not None, "table public.audit_partitioned is missing"
    assert tables == {"audit", "audit_export_state"}, f"tables audit and audit_export_state expected, found {tables}"
    today = datetime.now(timezone.utc).date()
    for offset in (-PARTITION_DAYS_BEFORE, 0, PARTITION_DAYS_AHEAD):
        day = today + timedelta(days=offset)
        assert partition_name("audit_partitioned", day) in partitions, f"partition for {day} is missing"
    assert rows == HISTORY_ROWS, f"{HISTORY_ROWS} history rows expected after two runs, found {rows}"
    assert state_rows == 0, f"the seed must leave the state table empty, found {state_rows} rows"

    with pg_cluster.connect() as admin:
        role = admin.execute(
            "SELECT rolcanlogin, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = %s", (EXPORT_ROLE,)
        ).fetchone()
        stats_member = admin.execute(
            "SELECT pg_has_role(%s, 'pg_read_all_stats', 'MEMBER')", (EXPORT_ROLE,)
        ).fetchone()[0]
    assert role is not None, f"role {EXPORT_ROLE} was not created"
    assert role[0], f"role {EXPORT_ROLE} cannot log in"
    # The throwaway cluster trusts every connection, so a login cannot test the
    # password; pg_authid shows whether one was stored.
    assert role[1], f"role {EXPORT_ROLE} has no password in pg_authid"
    assert stats_member, f"role {EXPORT_ROLE} is not a member of pg_read_all_stats"

    with pg_cluster.connect(seed_database, user=EXPORT_ROLE, password=PASSWORD) as exporter:
        readable = exporter.execute("SELECT count(*) FROM public.audit_partitioned").fetchone()[0]
    assert readable == HISTORY_ROWS, f"{EXPORT_ROLE} should read {HISTORY_ROWS} rows, read {readable}"

    assert "Skipping history" in caplog.text, "the second run did not log that it skipped the history"
    assert PASSWORD not in caplog.text, "the exporter password appears in the log"


def test_seed_rejects_unreachable_database(pg_cluster):
    missing = f"missing_{uuid.uuid4().hex[:8]}"

    exit_code = main(["--dsn", pg_cluster.uri(missing), "--connect-timeout", "0"])

    assert exit_code == 1, f"exit code 1 expected for a missing database, got {exit_code}"


def test_keep_writing_inserts_batches(pg_cluster, seed_database):
    assert run_seed(pg_cluster, seed_database) == 0, "seed run failed"

    inserted = keep_writing(
        pg_cluster.uri(seed_database),
        interval_seconds=0,
        batch_rows=4,
        stop=threading.Event(),
        max_batches=3,
    )

    with pg_cluster.connect(seed_database) as conn:
        rows = conn.execute("SELECT count(*) FROM public.audit_partitioned").fetchone()[0]
    assert inserted == 12, f"3 batches of 4 rows expected, the writer reported {inserted}"
    assert rows == HISTORY_ROWS + 12, f"{HISTORY_ROWS + 12} rows expected after writing, found {rows}"


def test_keep_writing_stops_when_requested(pg_cluster, seed_database):
    assert run_seed(pg_cluster, seed_database) == 0, "seed run failed"
    stop = threading.Event()
    stop.set()

    inserted = keep_writing(pg_cluster.uri(seed_database), interval_seconds=0, stop=stop)

    assert inserted == 0, f"a writer stopped before its first batch inserted {inserted} rows"
