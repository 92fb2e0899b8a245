"""Pure planning rules and input validation, without a database."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from airflow_audit_export.observation import widen_xid
from airflow_audit_export.planning import SliceWidth, advance_floor, plan_xid_range, thin_history
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.state import MAX_HISTORY_ENTRIES
from airflow_audit_export.writing import DestinationError, LocalDestination, S3Destination, object_key, parse_destination

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def entry(xmax: int, minutes: int, trusted: bool = True) -> dict:
    at = T0 + timedelta(minutes=minutes)
    return {"xmax": xmax, "floor": at.isoformat(), "trusted": trusted, "taken_at": at.isoformat()}


def test_advance_floor_takes_largest_passed_entry():
    history = [entry(100, 5), entry(200, 10), entry(300, 15)]

    folded = advance_floor(
        cursor=250, floor=T0, trusted=True, untrusted_reason=None, exported_through=T0, history=history
    )

    assert folded.floor == T0 + timedelta(minutes=10)
    assert folded.exported_through == T0 + timedelta(minutes=10)
    assert [e["xmax"] for e in folded.history] == [300]


def test_advance_floor_keeps_floor_below_unpassed_entries():
    history = [entry(300, 15)]

    folded = advance_floor(
        cursor=299, floor=T0, trusted=True, untrusted_reason=None, exported_through=T0, history=history
    )

    assert folded.floor == T0
    assert folded.history == history


def test_advance_floor_never_lowers_floor():
    older_untrusted = {**entry(100, -60 * 24 * 7, trusted=False), "untrusted_reason": "no stats"}

    folded = advance_floor(
        cursor=150,
        floor=T0,
        trusted=True,
        untrusted_reason=None,
        exported_through=T0,
        history=[older_untrusted],
    )

    assert folded.floor == T0
    assert folded.trusted is True


def test_thin_history_bounds_length_and_keeps_newest():
    history = [entry(i, i) for i in range(MAX_HISTORY_ENTRIES * 3)]

    thinned = thin_history(history)

    assert len(thinned) <= MAX_HISTORY_ENTRIES
    assert thinned[-1] == history[-1]
    assert thinned == sorted(thinned, key=lambda e: e["xmax"])


def test_plan_xid_range_caps_and_reports_draining():
    assert plan_xid_range(100, 150, 1000).draining is False
    capped = plan_xid_range(100, 5000, 1000)
    assert (capped.lo, capped.hi, capped.draining) == (100, 1100, True)


def test_plan_xid_range_rejects_snapshot_below_cursor():
    with pytest.raises(ValueError, match="re-anchor"):
        plan_xid_range(100, 99, 1000)


def test_slice_width_adapts_within_bounds():
    width = SliceWidth(timedelta(milliseconds=200), initial=timedelta(hours=1), maximum=timedelta(hours=4))

    width.record(0.01)
    assert width.width == timedelta(hours=2)
    width.record(0.01)
    width.record(0.01)
    assert width.width == timedelta(hours=4)
    width.record(0.5)
    assert width.width == timedelta(hours=2)


def test_slice_width_shrink_stops_at_minimum():
    width = SliceWidth(timedelta(seconds=1), initial=timedelta(milliseconds=4), minimum=timedelta(milliseconds=1))

    assert width.shrink() is True
    assert width.shrink() is True
    assert width.shrink() is False
    assert width.width == timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "bad name!", "Invalid export name"),
        ("table", "public.audit;drop", "Invalid table"),
        ("page_rows", 0, "Invalid page_rows"),
        ("max_xid_interval", -5, "Invalid max_xid_interval"),
        ("compression", "zstd", "Invalid compression"),
        ("floor_margin", -1, "Invalid floor_margin"),
        ("max_backlog", 0, "Invalid max_backlog"),
    ],
)
def test_settings_reject_invalid_values(field, value, message):
    arguments = {"name": "audit", "table": "public.audit_partitioned", field: value}

    with pytest.raises(ValueError, match=message):
        ExportSettings.create(**arguments)


def test_settings_accept_seconds_and_column_string():
    settings = ExportSettings.create(name="audit", table="audit", floor_margin=5, columns="id, timestamp")

    assert settings.floor_margin == timedelta(seconds=5)
    assert settings.columns == ("id", "timestamp")


def test_parse_destination_schemes():
    local = parse_destination("file:///var/lib/audit")
    s3 = parse_destination("s3://bucket/some/prefix/", aws_conn_id="minio")

    assert isinstance(local, LocalDestination)
    assert str(local.root) == "/var/lib/audit"
    assert isinstance(s3, S3Destination)
    assert (s3.bucket, s3.prefix, s3.aws_conn_id) == ("bucket", "some/prefix", "minio")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/x", "scheme 'ftp' is not supported"),
        ("file://relative/path", "three slashes"),
        ("s3:///prefix", "bucket name"),
        ("", "Invalid destination"),
    ],
)
def test_parse_destination_rejects(uri, message):
    with pytest.raises(DestinationError, match=message):
        parse_destination(uri)


def test_object_key_layout():
    key = object_key("exports/audit", T0.date(), "audit_xmin_1-2_000001", "gzip")

    assert key == "exports/audit/dt=2026-01-01/audit_xmin_1-2_000001.ndjson.gz"
    assert object_key("", T0.date(), "stem", "none") == "dt=2026-01-01/stem.ndjson"


@pytest.mark.parametrize(
    ("xid32", "reference", "expected"),
    [
        (726, 726, 726),
        (730, 726, 730),
        (700, 726, 700),
        (5, (1 << 32) + 10, (1 << 32) + 5),
        ((1 << 32) - 3, (1 << 32) + 10, (1 << 32) - 3),
        (20, (1 << 32) - 5, (1 << 32) + 20),
    ],
)
def test_widen_xid_picks_nearest_epoch(xid32, reference, expected):
    assert widen_xid(xid32, reference) == expected
