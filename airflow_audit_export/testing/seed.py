"""Seed a source database for the Docker Compose stack, and optionally keep writing rows to it.

Usage::

    python -m airflow_audit_export.testing.seed --dsn postgresql://admin:secret@audit-db:5432/audit \\
        [--history-rows N] [--history-days D] [--exporter-password PW] [--keep-writing SECONDS]

The command creates the reference schema of :mod:`airflow_audit_export.testing.schema`
with daily partitions from 40 days ago to 30 days ahead. It inserts sample
history rows unless the partitioned table already has rows. Then it runs the
shipped least-privilege script ``sql/export_role.sql`` and sets the password of
the ``audit_exporter`` role. Running it again changes nothing but the password.

With ``--keep-writing`` it then inserts a small batch of rows with the default
timestamp ``now()`` every SECONDS seconds until it receives SIGTERM or SIGINT,
which makes a demo writer for the Compose stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from airflow_audit_export.testing.schema import (
    EXPORT_ROLE,
    PARTITIONED_TABLE,
    apply_export_role,
    create_reference_schema,
    ensure_daily_partitions,
    generate_history,
    insert_rows,
)

log = logging.getLogger(__name__)

PARTITION_DAYS_BEFORE = 40
PARTITION_DAYS_AHEAD = 30
DEFAULT_HISTORY_ROWS = 2_000
DEFAULT_HISTORY_DAYS = 30
DEFAULT_BATCH_ROWS = 5
DEFAULT_CONNECT_TIMEOUT_SECONDS = 60.0
PASSWORD_ENV = "AUDIT_EXPORTER_PASSWORD"
"""Environment variable read when ``--exporter-password`` is not given."""

_CONNECT_RETRY_SECONDS = 2.0
_WRITE_RETRY_SECONDS = 5.0
_PROGRESS_LOG_SECONDS = 60.0


def describe_dsn(dsn: str) -> str:
    """Return ``user@host:port/dbname`` for ``dsn``, without its password, for log lines."""
    params = conninfo_to_dict(dsn)
    user = params.get("user", "")
    host = params.get("host", "")
    port = params.get("port", "5432")
    return f"{user}@{host}:{port}/{params.get('dbname', '')}"


def connect(dsn: str, *, timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS) -> psycopg.Connection:
    """Open an autocommit connection, retrying every 2 s until ``timeout_seconds`` have passed.

    A Compose stack starts the seed while the database may still be starting,
    so connection failures are retried instead of failing the first attempt.

    :raises psycopg.OperationalError: the last failure once the time is up.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning(
                "Connecting to %s failed, retrying in %.0f s: %s", describe_dsn(dsn), _CONNECT_RETRY_SECONDS, exc
            )
            time.sleep(_CONNECT_RETRY_SECONDS)


def set_role_password(conn: psycopg.Connection, role: str, password: str) -> None:
    """Set ``role``'s login password.

    The password travels as a quoted literal in the statement text, so a server
    with ``log_statement = 'ddl'`` or ``'all'`` writes it to its log.
    """
    if not password:
        raise ValueError(f"The password of role {role} is empty. Pass a non-empty password.")
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))


def count_rows(conn: psycopg.Connection, table: str = PARTITIONED_TABLE, schema: str = "public") -> int:
    """Return the number of rows in ``schema.table``."""
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
    return conn.execute(query).fetchone()[0]


def seed(
    conn: psycopg.Connection,
    *,
    history_rows: int = DEFAULT_HISTORY_ROWS,
    history_days: int = DEFAULT_HISTORY_DAYS,
    exporter_password: str | None = None,
    now: datetime | None = None,
) -> None:
    """Create the reference schema, the history rows and the export role in the database of ``conn``.

    History is inserted only while the partitioned table is empty, so a second
    call adds no rows. ``conn`` must be an autocommit connection of a role
    that can create tables and roles, such as the database owner or a superuser.
    """
    now = now or datetime.now(timezone.utc)
    today = now.astimezone(timezone.utc).date()
    first_day = today - timedelta(days=PARTITION_DAYS_BEFORE)
    last_day = today + timedelta(days=PARTITION_DAYS_AHEAD)
    log.info("Creating the reference schema with daily partitions from %s to %s", first_day, last_day)
    create_reference_schema(conn, first_day=first_day, last_day=last_day)

    existing = count_rows(conn)
    if existing:
        log.info("Skipping history: %s already has %s rows", PARTITIONED_TABLE, existing)
    elif history_rows == 0:
        log.info("Skipping history: --history-rows is 0")
    else:
        log.info("Inserting %s history rows over the %s days before %s", history_rows, history_days, now.isoformat())
        generate_history(conn, history_rows, days=history_days, end=now)

    log.info("Applying the least-privilege script for role %s", EXPORT_ROLE)
    apply_export_role(conn)

    if exporter_password:
        set_role_password(conn, EXPORT_ROLE, exporter_password)
        log.info("Set the password of role %s", EXPORT_ROLE)
    else:
        log.warning(
            "No password given for role %s (--exporter-password or %s), so it can log in only where "
            "pg_hba.conf allows it without one",
            EXPORT_ROLE,
            PASSWORD_ENV,
        )


def keep_writing(
    dsn: str,
    *,
    interval_seconds: float,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    stop: threading.Event,
    max_batches: int | None = None,
) -> int:
    """Insert ``batch_rows`` rows every ``interval_seconds`` until ``stop`` is set, and return the rows inserted.

    Each batch is one committed ``INSERT`` whose rows take the default
    timestamp ``now()``. Once per UTC day the writer creates the missing
    partitions up to 30 days ahead, so it can run longer than the seeded
    partitions last. A lost connection is logged and reopened after 5 s.
    ``max_batches`` ends the loop after that many batches, for tests.
    """
    target = describe_dsn(dsn)
    inserted = 0
    batches = 0
    conn: psycopg.Connection | None = None
    partitions_checked_on: date | None = None
    last_progress_log = time.monotonic()
    log.info("Writing %s rows every %s s to %s", batch_rows, interval_seconds, target)

    try:
        while not stop.is_set() and (max_batches is None or batches < max_batches):
            try:
                if conn is None:
                    conn = connect(dsn)
                today = datetime.now(timezone.utc).date()
                if partitions_checked_on != today:
                    ensure_daily_partitions(conn, today, today + timedelta(days=PARTITION_DAYS_AHEAD))
                    partitions_checked_on = today
                inserted += len(insert_rows(conn, batch_rows))
                batches += 1
            except psycopg.OperationalError as exc:
                log.warning("Writing to %s failed, reconnecting in %.0f s: %s", target, _WRITE_RETRY_SECONDS, exc)
                if conn is not None:
                    conn.close()
                    conn = None
                stop.wait(_WRITE_RETRY_SECONDS)
                continue

            if time.monotonic() - last_progress_log >= _PROGRESS_LOG_SECONDS:
                log.info("Inserted %s rows in %s batches so far", inserted, batches)
                last_progress_log = time.monotonic()
            stop.wait(interval_seconds)
    finally:
        if conn is not None:
            conn.close()

    log.info("Stopped writing after %s rows in %s batches", inserted, batches)
    return inserted


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text}: expected zero or a positive integer")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text}: expected a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text}: expected zero or a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_audit_export.testing.seed",
        description=(
            "Create the reference audit schema, sample history and the audit_exporter role in a "
            "PostgreSQL database. Safe to run again: history is skipped when the table has rows."
        ),
    )
    parser.add_argument(
        "--dsn",
        required=True,
        help="libpq URI or key=value string of the source database, as its owner or a superuser",
    )
    parser.add_argument(
        "--history-rows",
        type=_non_negative_int,
        default=DEFAULT_HISTORY_ROWS,
        help=f"history rows to insert into an empty table (default {DEFAULT_HISTORY_ROWS})",
    )
    parser.add_argument(
        "--history-days",
        type=_positive_int,
        default=DEFAULT_HISTORY_DAYS,
        help=f"days before now that the history rows cover (default {DEFAULT_HISTORY_DAYS})",
    )
    parser.add_argument(
        "--exporter-password",
        default=None,
        help=f"password to set for role {EXPORT_ROLE} (default: the {PASSWORD_ENV} environment variable)",
    )
    parser.add_argument(
        "--keep-writing",
        type=_non_negative_float,
        default=None,
        metavar="SECONDS_BETWEEN_BATCHES",
        help="after seeding, insert a batch of rows every this many seconds until stopped",
    )
    parser.add_argument(
        "--batch-rows",
        type=_positive_int,
        default=DEFAULT_BATCH_ROWS,
        help=f"rows per batch with --keep-writing (default {DEFAULT_BATCH_ROWS})",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_non_negative_float,
        default=DEFAULT_CONNECT_TIMEOUT_SECONDS,
        help=f"seconds to keep retrying the first connection (default {DEFAULT_CONNECT_TIMEOUT_SECONDS:.0f})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    password = args.exporter_password if args.exporter_password is not None else os.environ.get(PASSWORD_ENV)
    try:
        target = describe_dsn(args.dsn)
    except psycopg.ProgrammingError as exc:
        log.error("Invalid --dsn: %s. Pass a libpq URI such as postgresql://user@host:5432/dbname", str(exc).strip())
        return 2

    log.info("Seeding %s", target)
    try:
        with connect(args.dsn, timeout_seconds=args.connect_timeout) as conn:
            seed(conn, history_rows=args.history_rows, history_days=args.history_days, exporter_password=password)
            log.info("Seeded %s: %s has %s rows", target, PARTITIONED_TABLE, count_rows(conn))
    except psycopg.Error as exc:
        log.error("Seeding %s failed: %s", target, exc)
        return 1

    if args.keep_writing is None:
        return 0

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("Received %s, stopping the writer", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    keep_writing(args.dsn, interval_seconds=args.keep_writing, batch_rows=args.batch_rows, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
