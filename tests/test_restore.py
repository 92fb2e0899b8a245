"""Restored or copied databases never make the export skip rows or overwrite another copy's objects.

A logical copy (``pg_dump`` into a second, freshly initialised cluster) has
another ``system_identifier`` and an xid counter below the stored cursor, as a
database restored into a new cluster would: the anchor re-anchors with a gap.
A physical copy (``pg_basebackup``) keeps both, so only the destination's
lineage marker reveals it: the export moves to a new key epoch.
"""

from __future__ import annotations

import dataclasses
import subprocess
from datetime import timedelta

import pytest

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.exporting import StaleCursorError, run_export
from airflow_audit_export.source import configure_connection
from airflow_audit_export.testing.objects import decode_rows, exported_ids, read_local_objects
from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.schema import EXPORT_ROLE, apply_export_role, create_reference_schema, insert_rows
from airflow_audit_export.writing import parse_destination

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


#: One-row transactions written after the base backup, in the source and in the restored copy.
ROWS_AFTER_BACKUP = 60


@pytest.fixture
def source_cluster():
    with PostgresCluster() as cluster:
        yield cluster


def drain(conn, settings, destination) -> list[dict]:
    runs = [run_export(conn, settings, destination)]
    while runs[-1]["draining"]:
        runs.append(run_export(conn, settings, destination))
    return runs


def insert_one_per_transaction(cluster: PostgresCluster, database: str, count: int, workspace: str) -> list[int]:
    with cluster.connect(database) as writer:
        return [insert_rows(writer, 1, workspace=workspace)[0] for _ in range(count)]


def create_app_database(cluster: PostgresCluster) -> str:
    """Create database ``app`` with the reference schema around today and the export role."""
    cluster.create_database("app")
    with cluster.connect("app") as owner:
        today = owner.execute("SELECT (now() AT TIME ZONE 'UTC')::date").fetchone()[0]
        create_reference_schema(owner, first_day=today - timedelta(days=2), last_day=today + timedelta(days=2))
        apply_export_role(owner)
    return "app"


def test_base_backup_restore_moves_key_epoch(source_cluster, settings, tmp_path):
    # A small max_xid_interval makes both copies plan the same first range [cursor, cursor + 40),
    # so without the lineage marker the restored copy would overwrite the source's objects.
    settings = dataclasses.replace(settings, max_xid_interval=40)
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    database = create_app_database(source_cluster)

    source_conn = exporter(source_cluster, database)
    anchor_export(source_conn, settings)
    before_backup = insert_one_per_transaction(source_cluster, database, 10, "before-backup")
    drain(source_conn, settings, destination)

    restored_cluster = source_cluster.take_base_backup()
    try:
        source_only = insert_one_per_transaction(source_cluster, database, ROWS_AFTER_BACKUP, "source-only")
        source_runs = drain(source_conn, settings, destination)
        source_conn.close()
        source_objects = read_local_objects(destination)
        source_cluster.stop()

        restored_cluster.start()
        restored_conn = exporter(restored_cluster, database)
        anchor = anchor_export(restored_conn, settings)
        restored_only = insert_one_per_transaction(restored_cluster, database, ROWS_AFTER_BACKUP, "restored-only")
        restored_runs = drain(restored_conn, settings, destination)
        restored_conn.close()
        restored_state = read_state(restored_cluster, database)
    finally:
        restored_cluster.cleanup()

    final_objects = read_local_objects(destination)
    rows = decode_rows(final_objects)
    restored_keys = set(final_objects) - set(source_objects)

    # The in-database checks cannot see a physical copy: same system_identifier, xids above the cursor.
    assert anchor.action == "unchanged"
    assert source_runs[0]["lo"] == restored_runs[0]["lo"]
    assert "restored from a backup" in restored_runs[0]["lineage_diverged"]
    assert restored_state["key_epoch"] == 1
    assert restored_state["gaps"] == []
    assert restored_keys
    assert all("_xmin_e1_" in key for key in restored_keys)
    for key, data in source_objects.items():
        assert final_objects[key] == data, f"{key} was overwritten by the restored copy"
    exported_by_workspace = {
        workspace: {row["id"] for row in rows if row["workspace_id"] == workspace}
        for workspace in ("before-backup", "source-only", "restored-only")
    }
    assert exported_by_workspace["before-backup"] == set(before_backup)
    assert exported_by_workspace["source-only"] == set(source_only)
    assert exported_by_workspace["restored-only"] == set(restored_only)


def test_running_clone_never_overwrites_objects(source_cluster, settings, tmp_path):
    settings = dataclasses.replace(settings, max_xid_interval=40)
    destination = parse_destination(f"file://{tmp_path / 'bucket'}")
    database = create_app_database(source_cluster)
    source_conn = exporter(source_cluster, database)
    anchor_export(source_conn, settings)
    drain(source_conn, settings, destination)

    # A copy of the data directory that keeps running and, by mistake, exports to the same destination.
    clone_cluster = source_cluster.take_base_backup()
    clone_cluster.start()
    try:
        clone_conn = exporter(clone_cluster, database)
        written: dict[str, bytes] = {}
        inserted = {"source": [], "clone": []}
        epochs = []
        for _ in range(2):
            for workspace, cluster, conn in (("source", source_cluster, source_conn), ("clone", clone_cluster, clone_conn)):
                inserted[workspace] += insert_one_per_transaction(cluster, database, 45, workspace)
                epochs.append(drain(conn, settings, destination)[0]["key_epoch"])
                objects = read_local_objects(destination)
                for key, data in written.items():
                    assert objects[key] == data, f"{key} was overwritten by the {workspace}"
                written = objects
        clone_conn.close()
        source_conn.close()
    finally:
        clone_cluster.cleanup()

    rows = decode_rows(written)

    # Each side finds the other's marker before it writes, so every run takes a new key epoch.
    assert epochs == [0, 1, 2, 3]
    for workspace, ids in inserted.items():
        assert {row["id"] for row in rows if row["workspace_id"] == workspace} == set(ids)
