"""Session fixtures: one throwaway PostgreSQL cluster, one S3 API server on loopback, an Airflow home.

Each test gets its own database with the reference audit schema, so tests never
see each other's rows, xids in flight or state rows.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

# Airflow reads AIRFLOW_HOME once, at its first import, so set it before any test module imports it.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="audit-export-airflow-home-")
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parent.parent / "dags")

from airflow_audit_export.settings import ExportSettings  # noqa: E402
from airflow_audit_export.source import configure_connection  # noqa: E402
from airflow_audit_export.testing.pgcluster import PostgresCluster  # noqa: E402
from airflow_audit_export.testing.s3server import S3Server  # noqa: E402
from airflow_audit_export.testing.schema import (  # noqa: E402
    EXPORT_ROLE,
    apply_export_role,
    create_reference_schema,
)
from airflow_audit_export.writing import LocalDestination, parse_destination  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster for the whole session, with prepared transactions enabled."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API served on 127.0.0.1."""
    with S3Server() as server:
        yield server


@pytest.fixture
def database(pg_cluster):
    """A fresh database with the reference schema (daily partitions from 40 days ago to 3 days ahead).

    The shipped least-privilege script has run in it, so exports can run as ``audit_exporter``.
    """
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    today = datetime.now(timezone.utc).date()
    with pg_cluster.connect(name) as conn:
        create_reference_schema(conn, first_day=today - timedelta(days=40), last_day=today + timedelta(days=3))
        apply_export_role(conn)
    yield name
    with pg_cluster.connect() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        for (gid,) in admin.execute("SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,)).fetchall():
            with pg_cluster.connect(name) as owner:
                owner.execute(f"ROLLBACK PREPARED '{gid}'")
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def connect(pg_cluster, database):
    """Open connections to the test database; all are closed at teardown."""
    opened: list[psycopg.Connection] = []

    def _connect(user: str | None = None, *, autocommit: bool = True) -> psycopg.Connection:
        conn = pg_cluster.connect(database, user=user, autocommit=autocommit)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.close()


@pytest.fixture
def exporter_conn(connect):
    """The exporter's own connection as the least-privilege role, configured as the operators configure it."""
    conn = connect(EXPORT_ROLE)
    configure_connection(conn)
    return conn


@pytest.fixture
def settings():
    """Export settings for the reference schema with small pages, so tests cross many boundaries."""
    return ExportSettings.create(
        name="audit",
        table="public.audit_partitioned",
        page_rows=7,
        rows_per_object=20,
        lock_wait=timedelta(seconds=1),
    )


@pytest.fixture
def local_destination(tmp_path) -> LocalDestination:
    return parse_destination(f"file://{tmp_path / 'bucket'}")
