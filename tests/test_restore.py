"""Restored or copied databases: the export re-anchors with a recorded gap instead of using a stale cursor.

The source database is copied with ``pg_dump`` into a second, freshly initialised
cluster. That copy has another ``system_identifier`` and an xid counter below the
stored cursor, as a database restored into a new cluster would.
"""

from __future__ import annotations

import subprocess

import pytest

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.exporting import StaleCursorError, run_export
from airflow_audit_export.source import configure_connection
from airflow_audit_export.testing.objects import exported_ids, read_local_objects
from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.schema import EXPORT_ROLE, apply_export_role, insert_rows

#: xids burnt in the source so that its cursor is above the fresh cluster's xid counter.
BURNT_XIDS = 1500


@pytest.fixture
def copy_cluster():
    with PostgresCluster() as cluster:
        yield cluster


def burn_xids(conn, count: int) -> None:
    for _ in range(count):
        conn.execute("SELECT pg_current_xact_id()")


def copy_database(source: PostgresCluster, database: str, target: PostgresCluster) -> None:
    """Copy ``database`` with pg_dump into ``target``, with the export role and its grants."""
    dump = subprocess.run(
        [str(source.bin_dir / "pg_dump"), "--no-owner", "-d", source.uri(database)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    target.create_database(database)
    with target.connect() as admin:
        admin.execute(f"DO $$ BEGIN CREATE ROLE {EXPORT_ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN END $$")
    subprocess.run(
        [str(target.bin_dir / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-d", target.uri(database)],
        input=dump,
        check=True,
        capture_output=True,
        text=True,
    )
    with target.connect(database) as conn:
        apply_export_role(conn)


def exporter(cluster: PostgresCluster, database: str):
    conn = cluster.connect(database, user=EXPORT_ROLE)
    configure_connection(conn)
    return conn


def read_state(cluster: PostgresCluster, database: str) -> dict:
    with cluster.connect(database) as conn:
        row = conn.execute(
            "SELECT cursor_xid, key_epoch, gaps, system_identifier FROM audit_export_state WHERE export_name = 'audit'"
        ).fetchone()
    return {"cursor": row[0], "key_epoch": row[1], "gaps": row[2], "system_identifier": row[3]}


def prepare_source(pg_cluster, database, connect, settings, destination) -> list[int]:
    """Anchor and export some rows in the source, then burn xids; return the exported ids."""
    source_exporter = connect(EXPORT_ROLE)
    configure_connection(source_exporter)
    writer = connect()
    anchor_export(source_exporter, settings)
    ids = insert_rows(writer, 30)
    run_export(source_exporter, settings, destination)
    burn_xids(writer, BURNT_XIDS)
    run_export(source_exporter, settings, destination)
    return ids


def test_copy_reanchors_on_new_system_identifier(
    pg_cluster, database, connect, settings, local_destination, copy_cluster
):
    source_ids = prepare_source(pg_cluster, database, connect, settings, local_destination)
    source_objects = read_local_objects(local_destination)
    source_state = read_state(pg_cluster, database)
    copy_database(pg_cluster, database, copy_cluster)

    copy_conn = exporter(copy_cluster, database)
    result = anchor_export(copy_conn, settings)
    with copy_cluster.connect(database) as writer:
        new_ids = insert_rows(writer, 25)
    stats = run_export(copy_conn, settings, local_destination)
    copy_state = read_state(copy_cluster, database)
    copy_conn.close()

    assert result.action == "reanchored"
    assert "system_identifier changed" in result.gap["reason"]
    assert result.gap["old_cursor"] == source_state["cursor"]
    assert copy_state["cursor"] < source_state["cursor"]
    assert copy_state["system_identifier"] != source_state["system_identifier"]
    assert copy_state["key_epoch"] == 1
    assert len(copy_state["gaps"]) == 1
    assert stats["rows"] == 25
    assert all("_xmin_e1_" in key for key in stats["last_keys"])
    assert sorted(exported_ids(local_destination)) == sorted(source_ids + new_ids)
    for key, data in source_objects.items():
        assert read_local_objects(local_destination)[key] == data


def test_copy_reanchors_when_xid_below_cursor(
    pg_cluster, database, connect, settings, local_destination, copy_cluster
):
    source_ids = prepare_source(pg_cluster, database, connect, settings, local_destination)
    source_state = read_state(pg_cluster, database)
    copy_database(pg_cluster, database, copy_cluster)
    # Without a stored system_identifier, only the xid counter going backwards can reveal the copy.
    with copy_cluster.connect(database) as admin:
        admin.execute("UPDATE audit_export_state SET system_identifier = NULL")

    copy_conn = exporter(copy_cluster, database)
    with copy_cluster.connect(database) as writer:
        new_ids = insert_rows(writer, 12)
    with pytest.raises(StaleCursorError, match="Run the anchor task"):
        run_export(copy_conn, settings, local_destination)
    result = anchor_export(copy_conn, settings)
    with copy_cluster.connect(database) as writer:
        newer_ids = insert_rows(writer, 8)
    run_export(copy_conn, settings, local_destination)
    copy_conn.close()

    assert result.action == "reanchored"
    assert "is below the stored cursor" in result.gap["reason"]
    assert result.cursor < source_state["cursor"]
    assert read_state(copy_cluster, database)["key_epoch"] == 1
    exported = exported_ids(local_destination)
    assert sorted(set(exported)) == sorted(exported)
    assert set(source_ids) <= set(exported)
    assert set(newer_ids) <= set(exported)
    # Rows committed in the copy before the re-anchor are history: the recorded gap covers them.
    assert not set(new_ids) & set(exported)
