"""Tests of the test support modules against a real PostgreSQL server and moto S3 server."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.s3server import S3Server
from airflow_audit_export.testing.schema import (
    create_reference_schema,
    ensure_daily_partitions,
    generate_history,
    insert_rows,
    partition_name,
)

DAY_1 = date(2024, 3, 30)
DAY_3 = date(2024, 4, 1)
RANGE_START = datetime(2024, 3, 30, tzinfo=timezone.utc)
RANGE_END = datetime(2024, 4, 2, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def cluster():
    with PostgresCluster() as pg:
        yield pg


@pytest.fixture
def conn(cluster):
    with cluster.connect() as connection:
        yield connection


@pytest.fixture
def schema(conn):
    """Name of a new schema with the reference tables and partitions for DAY_1 to DAY_3."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    create_reference_schema(conn, schema=name, first_day=DAY_1, last_day=DAY_3)
    return name


def partition_counts(conn, schema: str) -> dict[str, int]:
    rows = conn.execute(
        f'SELECT tableoid::regclass::text, count(*) FROM "{schema}".audit_partitioned GROUP BY 1'
    ).fetchall()
    return {name.split(".")[-1]: count for name, count in rows}


def test_cluster_server_settings(conn):
    settings = dict(conn.execute("SELECT name, setting FROM pg_settings").fetchall())

    assert settings["max_prepared_transactions"] == "20"
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["fsync"] == "off"
    assert settings["server_encoding"] == "UTF8"
    assert settings["lc_collate"] == "C"


def test_cluster_stop_restart_cleanup():
    # pytest's tmp_path has mode 0700, but the server may run as the postgres
    # user, which must be able to enter the base directory.
    base_dir = Path(tempfile.mkdtemp(prefix="audit-export-test-"))
    base_dir.chmod(0o755)
    pg = PostgresCluster(base_dir)
    pg.start()
    with pg.connect() as c:
        c.execute("CREATE TABLE kept (x int)")

    pg.restart()
    with pg.connect() as c:
        assert c.execute("SELECT to_regclass('kept') IS NOT NULL").fetchone()[0]

    pg.stop()
    pg.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.conninfo(), connect_timeout=5)

    pg.start()
    pg.cleanup()
    assert not pg.data_dir.exists()
    assert not pg.log_file.exists()
    # cleanup() keeps a base directory that the caller created.
    assert base_dir.exists()
    shutil.rmtree(base_dir)


def test_cluster_uri_and_create_database(cluster):
    cluster.create_database("audit db")
    cluster.create_database("audit db")

    with psycopg.connect(cluster.uri("audit db")) as c:
        assert c.execute("SELECT current_database()").fetchone()[0] == "audit db"
    with psycopg.connect(cluster.conninfo("audit db")) as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "postgres"


def test_prepare_transaction_commits_later(cluster, conn, schema):
    gid = f"gid-{schema}"
    with cluster.connect(autocommit=False) as writer:
        ids = insert_rows(writer, 1, schema=schema, start=RANGE_START, end=RANGE_END)
        writer.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))

        prepared = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
        assert (gid,) in prepared
        visible = conn.execute(f'SELECT count(*) FROM "{schema}".audit_partitioned').fetchone()[0]
        assert visible == 0

        conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
    visible_ids = conn.execute(f'SELECT id FROM "{schema}".audit_partitioned').fetchall()
    assert visible_ids == [(ids[0],)]


def test_reference_schema_is_idempotent(conn, schema):
    create_reference_schema(conn, schema=schema, first_day=DAY_1, last_day=DAY_3)

    partitions = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass ORDER BY 1",
        (f'"{schema}".audit_partitioned',),
    ).fetchall()
    assert [row[0] for row in partitions] == ["audit_20240330", "audit_20240331", "audit_20240401"]
    assert ensure_daily_partitions(conn, DAY_1, DAY_3, schema=schema) == 0
    assert ensure_daily_partitions(conn, DAY_1, DAY_3 + timedelta(days=1), schema=schema) == 1


def test_rows_route_to_daily_partitions(conn, schema):
    ids = insert_rows(conn, 30, schema=schema, start=RANGE_START, end=RANGE_END, seed=5)

    rows = conn.execute(
        f'SELECT id, "timestamp", tableoid::regclass::text FROM "{schema}".audit_partitioned ORDER BY id'
    ).fetchall()
    assert [row[0] for row in rows] == sorted(ids)
    for _, timestamp, partition in rows:
        assert RANGE_START <= timestamp < RANGE_END
        expected = partition_name("audit_partitioned", timestamp.astimezone(timezone.utc).date())
        assert partition == f"{schema}.{expected}"
    assert set(partition_counts(conn, schema)) == {"audit_20240330", "audit_20240331", "audit_20240401"}


def test_insert_rows_default_timestamp(conn, schema):
    today = datetime.now(timezone.utc).date()
    ensure_daily_partitions(conn, today - timedelta(days=1), today + timedelta(days=1), schema=schema)

    before = datetime.now(timezone.utc)
    ids = insert_rows(conn, 3, schema=schema)
    after = datetime.now(timezone.utc)

    rows = conn.execute(
        f'SELECT "timestamp", tableoid::regclass::text FROM "{schema}".audit_partitioned WHERE id = ANY(%s)',
        (ids,),
    ).fetchall()
    assert len(rows) == 3
    for timestamp, partition in rows:
        # The server clock is this machine's clock, so allow only a small skew.
        assert before - timedelta(seconds=5) <= timestamp <= after + timedelta(seconds=5)
        expected = partition_name("audit_partitioned", timestamp.astimezone(timezone.utc).date())
        assert partition == f"{schema}.{expected}"


def test_insert_rows_timestamps_follow_seed(conn, schema):
    def timestamps(ids):
        rows = conn.execute(
            f'SELECT "timestamp" FROM "{schema}".audit_partitioned WHERE id = ANY(%s) ORDER BY id', (ids,)
        ).fetchall()
        return [row[0] for row in rows]

    first = timestamps(insert_rows(conn, 20, schema=schema, start=RANGE_START, end=RANGE_END, seed=1))
    again = timestamps(insert_rows(conn, 20, schema=schema, start=RANGE_START, end=RANGE_END, seed=1))
    other = timestamps(insert_rows(conn, 20, schema=schema, start=RANGE_START, end=RANGE_END, seed=2))

    assert first == again
    assert first != other
    assert len(set(first)) == 20


def test_insert_rows_rejects_naive_datetime(conn, schema):
    with pytest.raises(ValueError, match="no time zone"):
        insert_rows(conn, 1, schema=schema, start=datetime(2024, 3, 30), end=datetime(2024, 3, 31))


def test_legacy_table_shares_sequence(conn, schema):
    legacy_ids = insert_rows(conn, 5, schema=schema, table="audit", start=RANGE_START, end=RANGE_END)
    partitioned_ids = insert_rows(conn, 5, schema=schema, start=RANGE_START, end=RANGE_END)

    assert len(legacy_ids) == 5
    assert min(partitioned_ids) > max(legacy_ids)
    legacy_count = conn.execute(f'SELECT count(*) FROM "{schema}".audit').fetchone()[0]
    assert legacy_count == 5


def test_generate_history_counts_and_ranges(conn, schema):
    end = datetime(2024, 3, 10, 12, tzinfo=timezone.utc)
    generate_history(conn, 1000, days=3, end=end, schema=schema, legacy_rows=200, batch=300)

    count, first, last, min_id = conn.execute(
        f'SELECT count(*), min("timestamp"), max("timestamp"), min(id) FROM "{schema}".audit_partitioned'
    ).fetchone()
    assert count == 1000
    assert first == end - timedelta(days=3)
    assert last < end

    legacy_count, legacy_last, legacy_max_id = conn.execute(
        f'SELECT count(*), max("timestamp"), max(id) FROM "{schema}".audit'
    ).fetchone()
    assert legacy_count == 200
    assert legacy_last < first
    assert legacy_max_id < min_id

    # 2024-03-07 12:00 to 2024-03-10 12:00 touches four UTC days.
    assert set(partition_counts(conn, schema)) == {f"audit_2024030{day}" for day in (7, 8, 9)} | {"audit_20240310"}


def test_pg_control_system_for_plain_role(cluster, conn):
    # In PostgreSQL 15 a role without superuser or pg_monitor can call
    # pg_control_system() because EXECUTE on it is granted to PUBLIC by default.
    role = f"plain_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")

    with cluster.connect(user=role) as plain:
        identifier = plain.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]

    expected = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]
    assert identifier == expected


@pytest.fixture
def s3_server():
    with S3Server() as server:
        yield server


def test_s3_hook_round_trip(s3_server, tmp_path, monkeypatch):
    # Airflow reads AIRFLOW_HOME on first import, so the import stays below
    # the setenv. If another test imported Airflow before, the setting has no effect.
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW_CONN_TEST_S3", s3_server.airflow_connection_uri())
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    s3_server.create_bucket("audit-export")
    hook = S3Hook(aws_conn_id="test_s3")
    hook.load_bytes(b'{"id": 1}\n', key="exports/day=2024-03-30/part-0.jsonl", bucket_name="audit-export")

    assert hook.conn_config.endpoint_url == s3_server.endpoint_url
    assert hook.conn_config.region_name == "us-east-1"
    assert hook.list_keys("audit-export", prefix="exports/") == ["exports/day=2024-03-30/part-0.jsonl"]
    assert s3_server.list_keys("audit-export") == ["exports/day=2024-03-30/part-0.jsonl"]
    assert s3_server.get_bytes("audit-export", "exports/day=2024-03-30/part-0.jsonl") == b'{"id": 1}\n'


def test_s3_list_keys_follows_pages(s3_server):
    s3_server.create_bucket("many-keys")
    client = s3_server.client()
    expected = [f"k/{i:02d}" for i in range(7)]
    for key in expected:
        client.put_object(Bucket="many-keys", Key=key, Body=b"")
    client.put_object(Bucket="many-keys", Key="other/0", Body=b"")

    # A page size of 2 needs four requests for the seven keys under k/.
    assert s3_server.list_keys("many-keys", prefix="k/", page_size=2) == expected
    assert len(s3_server.list_keys("many-keys")) == 8
