"""Status text for operators: every field a person at 3 a.m. looks for."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow_audit_export.cli import main
from airflow_audit_export.state import ExportState
from airflow_audit_export.status import describe_state, format_status

NOW = datetime(2026, 12, 4, 3, 0, tzinfo=timezone.utc)


def untrusted_state() -> ExportState:
    return ExportState(
        export_name="audit",
        source_table="public.audit_partitioned",
        cursor_xid=1000,
        cursor_floor=NOW - timedelta(days=7),
        cursor_floor_trusted=False,
        floor_untrusted_reason="role 'audit_exporter' cannot see other sessions' xact_start; fix: GRANT pg_read_all_stats",
        exported_through=NOW - timedelta(minutes=6),
        anchored_at=NOW - timedelta(days=2),
        system_identifier="7300000000000000001",
        last_seen_xid=1010,
        pending={"lo": 1000, "hi": 1400, "floor": "x", "sequence": 3, "rows": 300, "position": None, "planned_at": "t"},
        gaps=[{"from": "2026-12-01T00:00:00+00:00", "to": "2026-12-02T00:00:00+00:00", "reason": "re-anchor requested"}],
        last_run={
            "rows": 300,
            "objects": 3,
            "bytes": 9000,
            "duration_seconds": 1.5,
            "finished_at": "2026-12-04T02:55:00+00:00",
            "completed": False,
            "draining": True,
            "observation_trusted": False,
            "observation_untrusted_reason": "role cannot see other sessions",
        },
    )


def test_status_describes_lag_and_trust():
    status = describe_state(untrusted_state(), current_xmin=1500, now=NOW, role="audit_exporter")

    assert status["lag_xids"] == 500
    assert status["lag_seconds"] == 360.0
    assert status["floor_trusted"] is False
    assert status["floor_fix"] == "GRANT pg_read_all_stats TO audit_exporter;"
    assert status["draining"] is True
    assert status["pending"]["lo"] == 1000


def test_status_text_names_every_section():
    text = format_status(describe_state(untrusted_state(), current_xmin=1500, now=NOW, role="audit_exporter"))

    for label in ("cursor", "anchored at", "floor", "floor fix", "latest observation", "lag", "draining",
                  "pending range", "gap", "last run"):
        assert f"{label}: " in text, label
    assert "backfill pending" in text
    assert "stopped at a per-run cap" in text
    assert "xids [1000, 1400)" in text


def test_status_text_shows_key_epoch():
    state = untrusted_state()
    state.key_epoch = 2
    text = format_status(describe_state(state, current_xmin=1500, now=NOW, role="audit_exporter"))
    plain = format_status(describe_state(untrusted_state(), current_xmin=1500, now=NOW, role="audit_exporter"))

    assert "cursor: 1000 (key epoch 2)" in text
    assert "key epoch" not in plain


def test_status_command_without_state_table(pg_cluster, database, capsys):
    code = main(["status", "--dsn", pg_cluster.uri(database), "--state-table", "public.missing_state"])
    error = capsys.readouterr().err

    assert code == 1
    assert "State table 'public.missing_state' does not exist" in error
    assert "the anchor task has not run yet" in error


def test_status_command_rejects_other_table(pg_cluster, database, capsys):
    code = main(["status", "--dsn", pg_cluster.uri(database), "--state-table", "public.audit"])
    error = capsys.readouterr().err

    assert code == 1
    assert "'public.audit' is not an export state table" in error


def test_status_command_names_missing_connection(capsys):
    code = main(["status", "--conn-id", "no_such_source"])
    error = capsys.readouterr().err

    assert code == 1
    assert "Connection 'no_such_source' is not defined" in error
    assert "AIRFLOW_CONN_NO_SUCH_SOURCE" in error
