"""The lineage marker: written before objects, tolerant of a failed write, and a new key epoch on divergence."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.exporting import run_export
from airflow_audit_export.lineage import marker_key, read_marker
from airflow_audit_export.source import configure_connection
from airflow_audit_export.state import StateStore
from airflow_audit_export.testing.objects import exported_ids, read_local_objects
from airflow_audit_export.testing.schema import EXPORT_ROLE, apply_export_role, create_reference_schema, insert_rows
from airflow_audit_export.writing import DestinationError, LocalDestination


class FailingMarkerWrites(LocalDestination):
    """A local destination whose next ``failures`` small writes raise, as an S3 outage would."""

    def __init__(self, uri, root, failures: int) -> None:
        super().__init__(uri, root)
        self.failures = failures

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(f"injected failure writing {key}")
        super().write_bytes(key, data)


def load_state(conn, name: str = "audit"):
    return StateStore(conn, "public.audit_export_state").load(name)


def test_marker_written_before_first_object(exporter_conn, connect, settings, local_destination):
    anchor_export(exporter_conn, settings)
    insert_rows(connect(), 30)
    seen = {}

    def on_progress(event: str, details: dict) -> None:
        if event == "planned":
            seen["marker"] = read_marker(local_destination, settings.name)
            seen["objects"] = read_local_objects(local_destination)

    stats = run_export(exporter_conn, settings, local_destination, on_progress=on_progress)
    state = load_state(exporter_conn)

    assert stats["rows"] == 30
    assert seen["objects"] == {}
    assert seen["marker"].token == state.lineage_token
    assert seen["marker"].key_epoch == 0
    assert seen["marker"].cursor == stats["lo"]


def test_failed_marker_write_stops_before_objects(exporter_conn, connect, settings, tmp_path):
    destination = FailingMarkerWrites(f"file://{tmp_path}", tmp_path, failures=0)
    anchor_export(exporter_conn, settings)
    first_ids = insert_rows(connect(), 10)
    run_export(exporter_conn, settings, destination)
    second_ids = insert_rows(connect(), 25)

    destination.failures = 1
    with pytest.raises(OSError, match="injected failure"):
        run_export(exporter_conn, settings, destination)
    objects_after_failure = read_local_objects(destination)
    stale_marker = read_marker(destination, settings.name)
    pending_state = load_state(exporter_conn)

    stats = run_export(exporter_conn, settings, destination)
    final_state = load_state(exporter_conn)

    assert len(objects_after_failure) == 1
    assert pending_state.pending is not None
    assert stale_marker.token == pending_state.previous_lineage_token
    assert stats["lineage_diverged"] is None
    assert stats["rows"] == 25
    assert final_state.key_epoch == 0
    assert read_marker(destination, settings.name).token == final_state.lineage_token
    assert sorted(exported_ids(destination)) == sorted(first_ids + second_ids)


def test_foreign_marker_moves_fresh_export(pg_cluster, exporter_conn, connect, settings, local_destination):
    anchor_export(exporter_conn, settings)
    first_ids = insert_rows(connect(), 12)
    run_export(exporter_conn, settings, local_destination)
    first_objects = read_local_objects(local_destination)

    # Another database anchors an export of the same name into the same destination.
    other = f"{exporter_conn.info.dbname}_other"
    pg_cluster.create_database(other)
    with pg_cluster.connect(other) as owner:
        today = owner.execute("SELECT (now() AT TIME ZONE 'UTC')::date").fetchone()[0]
        create_reference_schema(owner, first_day=today - timedelta(days=2), last_day=today + timedelta(days=2))
        apply_export_role(owner)
        other_exporter = pg_cluster.connect(other, user=EXPORT_ROLE)
        configure_connection(other_exporter)
        anchor_export(other_exporter, settings)
        other_ids = insert_rows(owner, 9, workspace="other")
        stats = run_export(other_exporter, settings, local_destination)
        other_state = load_state(other_exporter)
        other_exporter.close()
    with pg_cluster.connect() as admin:
        admin.execute(f'DROP DATABASE "{other}" WITH (FORCE)')

    final_objects = read_local_objects(local_destination)

    assert "written by another state row" in stats["lineage_diverged"]
    assert other_state.key_epoch == 1
    assert other_state.gaps == []
    assert all("_xmin_e1_" in key for key in stats["last_keys"])
    for key, data in first_objects.items():
        assert final_objects[key] == data
    assert sorted(exported_ids(local_destination)) == sorted(first_ids + other_ids)


def test_invalid_marker_rejected_before_objects(exporter_conn, connect, settings, local_destination):
    anchor_export(exporter_conn, settings)
    insert_rows(connect(), 5)
    run_export(exporter_conn, settings, local_destination)
    insert_rows(connect(), 5)
    path = local_destination.path_of(marker_key("", settings.name))
    path.write_text("{not json")
    objects_before = read_local_objects(local_destination)

    with pytest.raises(DestinationError, match="lineage marker 'lineage/audit.json'.*delete it"):
        run_export(exporter_conn, settings, local_destination)

    assert read_local_objects(local_destination) == objects_before
    assert load_state(exporter_conn).pending is None


def test_marker_records_epoch_and_cursor(exporter_conn, connect, settings, local_destination):
    anchor_export(exporter_conn, settings)
    insert_rows(connect(), 3)
    stats = run_export(exporter_conn, settings, local_destination)
    path = local_destination.path_of(marker_key("", settings.name))
    marker = json.loads(path.read_text())
    state = load_state(exporter_conn)

    assert marker["export_name"] == "audit"
    assert marker["token"] == state.lineage_token
    assert marker["key_epoch"] == 0
    assert marker["cursor"] == stats["lo"]
    assert marker["system_identifier"] == state.system_identifier
