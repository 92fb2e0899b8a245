"""Splitting a backfill window into page ranges aligned to UTC days and balanced by estimated rows."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql

from airflow_audit_export.source import SourceTable
from airflow_audit_export.window import Window

#: Upper bound on estimate statements per table. Longer windows are estimated in chunks of whole days.
MAX_ESTIMATE_BUCKETS = 366

#: Pages of estimated rows per backfill range: a window gets at most one range for each this many pages.
MIN_PAGES_PER_RANGE = 10


@dataclasses.dataclass(frozen=True)
class PageRange:
    """One mapped backfill task: ``[start, end)`` within the window, with its estimated row count."""

    index: int
    start: datetime
    end: datetime
    estimated_rows: int

    @property
    def label(self) -> str:
        return f"{_short(self.start)} to {_short(self.end)} (~{self.estimated_rows} rows)"

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "estimated_rows": self.estimated_rows,
            "label": self.label,
        }


def _short(value: datetime) -> str:
    if value == value.replace(hour=0, minute=0, second=0, microsecond=0):
        return value.strftime("%Y-%m-%d")
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def day_buckets(window: Window, max_buckets: int = MAX_ESTIMATE_BUCKETS) -> list[tuple[datetime, datetime]]:
    """Cut the window at UTC midnights into at most ``max_buckets`` runs of whole days (the ends may be partial)."""
    first_midnight = window.start.replace(hour=0, minute=0, second=0, microsecond=0)
    days = math.ceil((window.end - first_midnight) / timedelta(days=1))
    days_per_bucket = max(1, math.ceil(days / max_buckets))

    buckets = []
    start = window.start
    boundary = first_midnight
    while start < window.end:
        boundary = boundary + timedelta(days=days_per_bucket)
        end = min(boundary, window.end)
        buckets.append((start, end))
        start = end
    return buckets


def estimate_rows(conn: psycopg.Connection, table: SourceTable, start: datetime, end: datetime) -> int:
    """Return the planner's row estimate for ``[start, end)``; only planning runs, no row is read."""
    query = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} WHERE {ts} >= %s AND {ts} < %s").format(
        table=table.identifier, ts=sql.Identifier(table.timestamp_column)
    )
    plan = conn.execute(query, (start, end)).fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def plan_ranges(
    conn: psycopg.Connection,
    tables: list[SourceTable],
    window: Window,
    max_ranges: int,
    *,
    min_range_rows: int = 0,
) -> list[PageRange]:
    """Split the window into at most ``max_ranges`` contiguous ranges with similar estimated rows.

    Every boundary between two ranges is a UTC midnight, so objects, which are
    cut by row count from the start of each day, come out the same whatever
    the split. With ``min_range_rows``, the window gets no more ranges than
    its estimated rows divided by ``min_range_rows`` (at least one). Each
    range becomes a mapped task, whose start costs seconds of Airflow time,
    so a small window gains nothing from many ranges.
    """
    if max_ranges < 1:
        raise ValueError(f"Invalid max_ranges {max_ranges!r}: expected a positive integer.")
    if min_range_rows < 0:
        raise ValueError(f"Invalid min_range_rows {min_range_rows!r}: expected zero or a positive integer.")

    buckets = day_buckets(window)
    estimates = [sum(estimate_rows(conn, table, start, end) for table in tables) for start, end in buckets]
    count = min(max_ranges, len(buckets))
    if min_range_rows:
        count = min(count, max(1, sum(estimates) // min_range_rows))
    # One extra unit per bucket spreads an empty or unanalyzed window evenly over time.
    weights = [estimate + 1 for estimate in estimates]
    total = sum(weights)
    share = total / count

    groups: list[list[int]] = []
    cumulative = 0
    for position, weight in enumerate(weights):
        group = min(int((cumulative + weight / 2) / share), count - 1)
        if not groups or group > groups[-1][0]:
            groups.append([group, position, position])
        else:
            groups[-1][2] = position
        cumulative += weight

    ranges = []
    for index, (_, first, last) in enumerate(groups):
        ranges.append(
            PageRange(
                index=index,
                start=buckets[first][0],
                end=buckets[last][1],
                estimated_rows=sum(estimates[first : last + 1]),
            )
        )
    return ranges


def utc(value: str) -> datetime:
    """Parse a stored ISO timestamp back to an aware UTC datetime."""
    return datetime.fromisoformat(value).astimezone(timezone.utc)
