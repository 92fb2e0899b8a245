"""Backfill windows: parsing, validation and the check that a window's end is settled.

A window ``[from, to)`` is settled when no transaction that is still open, or
that is prepared, could commit a row stamped before ``to``. Exporting an
unsettled window could report it complete while such rows are still invisible.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import psycopg

from airflow_audit_export.observation import take_observation
from airflow_audit_export.settings import ExportSettings


class WindowError(ValueError):
    """The requested backfill window is invalid or not yet settled; nothing was written."""


@dataclasses.dataclass(frozen=True)
class Window:
    """A UTC time window ``[start, end)`` at microsecond precision."""

    start: datetime
    end: datetime

    @property
    def token(self) -> str:
        """The window as it appears in object keys, for example ``20260101T000000.000000Z-20260102T000000.000000Z``."""
        return f"{format_key_time(self.start)}-{format_key_time(self.end)}"

    def to_json(self) -> dict:
        return {"from": self.start.isoformat(), "to": self.end.isoformat()}


def format_key_time(value: datetime) -> str:
    """Format a timestamp for object keys: UTC, microseconds, no separators that need escaping."""
    return value.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def parse_instant(name: str, value: str | datetime) -> datetime:
    """Parse an ISO 8601 date-time with a UTC offset; naive or malformed values raise :class:`WindowError`."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as err:
            raise WindowError(
                f"Invalid {name} {value!r}: expected an ISO 8601 date-time with an offset, "
                "for example 2026-01-01T00:00:00Z."
            ) from err
    else:
        raise WindowError(
            f"Missing {name}: give an ISO 8601 date-time with an offset, for example 2026-01-01T00:00:00Z."
        )
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise WindowError(
            f"Invalid {name} {value!r}: the date-time has no UTC offset, so it is ambiguous; "
            f"add one, for example {parsed.isoformat()}Z."
        )
    return parsed.astimezone(timezone.utc)


def parse_window(start: str | datetime, end: str | datetime) -> Window:
    """Parse and order-check a window; ``from >= to`` raises :class:`WindowError`."""
    window = Window(parse_instant("from", start), parse_instant("to", end))
    if window.start >= window.end:
        raise WindowError(
            f"Invalid window: from {window.start.isoformat()} is not before to {window.end.isoformat()}; "
            "swap them or widen the window."
        )
    return window


def check_window_settled(conn: psycopg.Connection, settings: ExportSettings, window: Window) -> datetime:
    """Reject a window that lies in the future or whose end is not settled; return the largest allowed ``to``.

    ``to`` is settled when it is at or before a fresh observation's floor, the
    observation is trusted (the role can read every session's ``xact_start``), and
    no prepared transaction exists in the database.
    """
    observation = take_observation(conn, floor_margin=settings.floor_margin, fallback_window=settings.fallback_window)
    if window.start >= observation.taken_at:
        raise WindowError(
            f"Invalid window: from {window.start.isoformat()} is in the future (database time "
            f"{observation.taken_at.isoformat()}); rows after now are exported by the scheduled audit_export DAG."
        )
    if not observation.trusted:
        raise WindowError(
            f"Cannot prove that to {window.end.isoformat()} is settled: {observation.untrusted_reason}. "
            "Then trigger the backfill again."
        )
    if observation.prepared:
        blocking = ", ".join(f"{p.gid!r} (prepared {p.prepared.isoformat()} by {p.owner})" for p in observation.prepared)
        raise WindowError(
            f"Cannot prove that to {window.end.isoformat()} is settled: prepared transactions {blocking} may still "
            "commit older rows. COMMIT PREPARED or ROLLBACK PREPARED them, then trigger the backfill again."
        )
    if window.end > observation.floor:
        blocker = observation.describe_oldest_transaction()
        if blocker:
            cause = f"the oldest open transaction, {blocker}, may still commit rows stamped before it"
        else:
            cause = "transactions that start now may stamp rows up to floor_margin earlier"
        raise WindowError(
            f"Invalid to {window.end.isoformat()}: it is not settled yet, because {cause}. The largest allowed "
            f"to is {observation.floor.isoformat()} (the oldest open transaction's start, or now, minus "
            f"floor_margin {settings.floor_margin})."
        )
    return observation.floor
