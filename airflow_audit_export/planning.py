"""Pure planning steps: floors for a cursor, the xid range of a run, and adaptive timestamp slices.

Nothing here touches the database, so each rule can be read and tested on its own.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from airflow_audit_export.observation import Observation
from airflow_audit_export.state import MAX_HISTORY_ENTRIES


def parse_time(value: str | datetime) -> datetime:
    """Parse an ISO 8601 timestamp stored in the state; naive values are rejected."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"Stored timestamp {value!r} has no UTC offset; the state row is corrupt.")
    return parsed


@dataclasses.dataclass(frozen=True)
class CursorFloor:
    """The best known floor for a cursor position and the latest commit time it proves exported."""

    floor: datetime
    trusted: bool
    untrusted_reason: str | None
    exported_through: datetime
    history: list[dict]


def advance_floor(
    *,
    cursor: int,
    floor: datetime,
    trusted: bool,
    untrusted_reason: str | None,
    exported_through: datetime,
    history: list[dict],
) -> CursorFloor:
    """Fold every history entry with ``xmax <= cursor`` into the cursor's floor.

    Each entry ``j`` with ``xmax_j <= cursor`` proves that every xid ``>= cursor``
    started at or after ``floor_j``, so the floor for ``cursor`` is the largest
    of those floors and the current one. Entries with ``xmax_j <= cursor`` also
    prove that every transaction committed before their snapshot is below the
    cursor, which moves ``exported_through``.
    """
    best_floor, best_trusted, best_reason = floor, trusted, untrusted_reason
    through = exported_through
    kept = []
    for entry in history:
        if entry["xmax"] > cursor:
            kept.append(entry)
            continue
        entry_floor = parse_time(entry["floor"])
        if entry_floor > best_floor:
            best_floor = entry_floor
            best_trusted = entry["trusted"]
            best_reason = entry.get("untrusted_reason")
        through = max(through, parse_time(entry["taken_at"]))
    return CursorFloor(
        floor=best_floor,
        trusted=best_trusted,
        untrusted_reason=best_reason,
        exported_through=through,
        history=thin_history(kept),
    )


def append_observation(history: list[dict], observation: Observation) -> list[dict]:
    """Return ``history`` with ``observation`` appended, kept sorted by ``xmax`` and bounded in length."""
    entry = observation.to_history_entry()
    entry["untrusted_reason"] = observation.untrusted_reason
    merged = sorted([*history, entry], key=lambda e: (e["xmax"], e["taken_at"]))
    return thin_history(merged)


def thin_history(history: list[dict]) -> list[dict]:
    """Drop every other old entry once the history exceeds its bound.

    Dropping an entry can only make a later floor lower (older), which scans
    more but never loses a row. The newest entry is always kept.
    """
    entries = list(history)
    while len(entries) > MAX_HISTORY_ENTRIES:
        entries = entries[:-1][::2] + entries[-1:]
    return entries


@dataclasses.dataclass(frozen=True)
class XidRange:
    """The xid interval ``[lo, hi)`` one run exports, and whether it stops short of the snapshot."""

    lo: int
    hi: int
    draining: bool


def plan_xid_range(cursor: int, snapshot_xmin: int, max_xid_interval: int) -> XidRange:
    """Cap the run at ``max_xid_interval`` xids; ``hi`` never exceeds the snapshot's ``xmin``.

    Every xid below the snapshot's ``xmin`` is finished, so the set of rows with
    ``xmin`` in ``[lo, hi)`` can no longer change, and a retried attempt reads the
    same rows.
    """
    if snapshot_xmin < cursor:
        raise ValueError(f"Snapshot xmin {snapshot_xmin} is below the cursor {cursor}; the export must re-anchor.")
    hi = min(snapshot_xmin, cursor + max_xid_interval)
    return XidRange(lo=cursor, hi=hi, draining=hi < snapshot_xmin)


class SliceWidth:
    """Adapts the width of timestamp slices so each statement stays near a target duration.

    Halves the width after a slow statement or a cancelled one, doubles it after
    a fast one, within ``[minimum, maximum]``. The maximum keeps a statement from
    touching many daily partitions, which costs planning time.
    """

    def __init__(
        self,
        target: timedelta,
        *,
        initial: timedelta = timedelta(minutes=15),
        minimum: timedelta = timedelta(milliseconds=1),
        maximum: timedelta = timedelta(days=1),
    ) -> None:
        self.target = target.total_seconds()
        self.minimum = minimum
        self.maximum = maximum
        self.width = min(max(initial, minimum), maximum)

    def record(self, elapsed_seconds: float) -> None:
        """Adjust the width after a statement over a whole slice took ``elapsed_seconds``."""
        if elapsed_seconds > self.target:
            self.shrink()
        elif elapsed_seconds < self.target / 4:
            self.width = min(self.width * 2, self.maximum)

    def shrink(self) -> bool:
        """Halve the width; return ``False`` when it is already at the minimum."""
        if self.width <= self.minimum:
            return False
        self.width = max(self.width / 2, self.minimum)
        return True
