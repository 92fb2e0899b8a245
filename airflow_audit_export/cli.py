"""The ``airflow-audit-export`` command line: ``status`` prints the state of one or every export."""

from __future__ import annotations

import argparse
import json
import os
import sys

import psycopg

from airflow_audit_export.source import configure_connection
from airflow_audit_export.state import StateStore, StateTableError
from airflow_audit_export.status import format_status, read_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-audit-export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="print cursor, lag, floor trust, pending range, gaps and last run")
    source = status.add_mutually_exclusive_group()
    source.add_argument(
        "--conn-id",
        default=os.environ.get("AUDIT_EXPORT_POSTGRES_CONN_ID", "audit_db"),
        help="Airflow connection id of the source database (default: $AUDIT_EXPORT_POSTGRES_CONN_ID or audit_db)",
    )
    source.add_argument("--dsn", help="libpq connection string or URI, used instead of an Airflow connection")
    status.add_argument(
        "--state-table",
        default=os.environ.get("AUDIT_EXPORT_STATE_TABLE", "public.audit_export_state"),
        help="schema-qualified state table (default: $AUDIT_EXPORT_STATE_TABLE or public.audit_export_state)",
    )
    status.add_argument("--name", help="export name; every export in the state table when omitted")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _connect(args: argparse.Namespace) -> psycopg.Connection:
    if args.dsn:
        conn = psycopg.connect(args.dsn)
        configure_connection(conn)
        return conn
    from airflow_audit_export.source import open_connection

    return open_connection(args.conn_id)


def _read_statuses(args: argparse.Namespace) -> list[dict]:
    """Read the status of the requested exports; raise ``StatusError`` with the fix on any expected failure."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        with _connect(args) as conn:
            store = StateStore(conn, args.state_table)
            if not store.exists():
                raise StatusError(
                    f"State table {args.state_table!r} does not exist in database {conn.info.dbname!r}: the anchor "
                    "task has not run yet, or --state-table (AUDIT_EXPORT_STATE_TABLE) names another table."
                )
            names = [args.name] if args.name else store.list_names()
            return [read_status(conn, args.state_table, name) for name in names]
    except AirflowNotFoundException as err:
        raise StatusError(
            f"Connection {args.conn_id!r} is not defined: define it (for example AIRFLOW_CONN_"
            f"{args.conn_id.upper()}='postgresql://user:password@host:5432/dbname'), or pass --conn-id or --dsn."
        ) from err
    except psycopg.OperationalError as err:
        raise StatusError(f"Cannot connect to the source database: {str(err).strip()}") from err
    except psycopg.errors.UndefinedColumn as err:
        raise StatusError(
            f"Table {args.state_table!r} is not an export state table ({err.diag.message_primary}): pass the "
            "state table with --state-table."
        ) from err
    except (StateTableError, LookupError, ValueError) as err:
        raise StatusError(str(err)) from err


class StatusError(RuntimeError):
    """An expected failure of the status command, printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        statuses = _read_statuses(args)
    except StatusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(statuses, indent=2, default=str))
    elif not statuses:
        print(f"No exports in {args.state_table}: the anchor task has not run yet.")
    else:
        print("\n\n".join(format_status(status) for status in statuses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
