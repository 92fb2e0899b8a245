"""Anchoring: the first cursor of an export, and re-anchoring with a recorded gap."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

import psycopg
from psycopg import sql

from airflow_audit_export.observation import anchor_floor, read_system_identifier, take_observation
from airflow_audit_export.source import SourceTable, describe_source
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.state import ExportState, StateStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AnchorResult:
    """Outcome of the anchor step: ``created``, ``unchanged`` or ``reanchored``, and the gap it recorded."""

    action: str
    cursor: int
    floor: datetime
    floor_trusted: bool
    floor_untrusted_reason: str | None
    gap: dict | None = None

    def to_xcom(self) -> dict:
        return {
            "action": self.action,
            "cursor": self.cursor,
            "floor": self.floor.isoformat(),
            "floor_trusted": self.floor_trusted,
            "floor_untrusted_reason": self.floor_untrusted_reason,
            "gap": self.gap,
        }


def anchor_export(conn: psycopg.Connection, settings: ExportSettings, *, force: bool = False) -> AnchorResult:
    """Create the state row on first use, or re-anchor when forced, restored or too far behind.

    Re-anchoring moves the cursor to a fresh snapshot's ``xmin`` and records the
    skipped gap ``[old floor, anchored_at)``: rows committed before the new
    snapshot with a timestamp in that window are left to a backfill. The cursor
    only ever moves forward, except after a restore or clone, where the stored
    cursor belongs to another xid history and is replaced.
    """
    store = StateStore(conn, settings.state_table)
    with store.locked(settings.name, settings.lock_wait):
        table = describe_source(conn, settings)
        store.ensure_table()
        state = store.load(settings.name)
        system_identifier = read_system_identifier(conn)

        if state is None:
            return _create_anchor(conn, store, settings, system_identifier)

        reason, history_changed = _reanchor_reason(conn, state, settings, system_identifier, force)
        if reason is None:
            log.info(
                "Export %s: anchor unchanged at cursor %s (floor %s, %s)",
                settings.name,
                state.cursor_xid,
                state.cursor_floor.isoformat(),
                "trusted" if state.cursor_floor_trusted else "untrusted",
            )
            return AnchorResult(
                action="unchanged",
                cursor=state.cursor_xid,
                floor=state.cursor_floor,
                floor_trusted=state.cursor_floor_trusted,
                floor_untrusted_reason=state.floor_untrusted_reason,
            )
        return _reanchor(conn, store, settings, table, state, system_identifier, reason, history_changed)


def _create_anchor(
    conn: psycopg.Connection, store: StateStore, settings: ExportSettings, system_identifier: str | None
) -> AnchorResult:
    observation = take_observation(conn, floor_margin=settings.floor_margin, fallback_window=settings.fallback_window)
    floor, untrusted_reason = anchor_floor(
        observation, fallback_window=settings.fallback_window, floor_margin=settings.floor_margin
    )
    state = ExportState(
        export_name=settings.name,
        source_table=settings.table,
        cursor_xid=observation.xmin,
        cursor_floor=floor,
        cursor_floor_trusted=untrusted_reason is None,
        floor_untrusted_reason=untrusted_reason,
        exported_through=observation.taken_at,
        anchored_at=observation.taken_at,
        system_identifier=system_identifier,
        last_seen_xid=observation.xmax,
    )
    store.insert(state)
    log.info(
        "Export %s: anchored at cursor %s, floor %s (%s); rows committed before %s are history for a backfill",
        settings.name,
        observation.xmin,
        floor.isoformat(),
        "trusted" if untrusted_reason is None else f"untrusted: {untrusted_reason}",
        observation.taken_at.isoformat(),
    )
    return AnchorResult(
        action="created",
        cursor=observation.xmin,
        floor=floor,
        floor_trusted=untrusted_reason is None,
        floor_untrusted_reason=untrusted_reason,
    )


def _reanchor_reason(
    conn: psycopg.Connection,
    state: ExportState,
    settings: ExportSettings,
    system_identifier: str | None,
    force: bool,
) -> tuple[str | None, bool]:
    """Return why the export must re-anchor (or ``None``), and whether the xid history changed.

    A physical copy (restored base backup, failover, cloned data directory) passes
    both history checks, because its state row came with its data and is valid
    for it. The export run catches it through the destination's lineage marker.
    """
    if system_identifier and state.system_identifier and system_identifier != state.system_identifier:
        return (
            f"the database's system_identifier changed from {state.system_identifier} to {system_identifier} "
            "(restored or cloned cluster)",
            True,
        )

    current_xmin, current_xmax, now = conn.execute(
        "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint, clock_timestamp() "
        "FROM pg_current_snapshot() AS s"
    ).fetchone()
    if current_xmax < state.cursor_xid:
        return (
            f"the current xid {current_xmax} is below the stored cursor {state.cursor_xid} "
            "(restored database or failover to a node with another history)",
            True,
        )
    if force:
        return "re-anchor requested", False

    lag = now - state.exported_through
    if lag > settings.max_backlog and current_xmin > state.cursor_xid:
        return (
            f"the backlog is {lag} old, more than max_backlog {settings.max_backlog}",
            False,
        )
    return None, False


def _reanchor(
    conn: psycopg.Connection,
    store: StateStore,
    settings: ExportSettings,
    table: SourceTable,
    state: ExportState,
    system_identifier: str | None,
    reason: str,
    history_changed: bool,
) -> AnchorResult:
    observation = take_observation(conn, floor_margin=settings.floor_margin, fallback_window=settings.fallback_window)
    floor, untrusted_reason = anchor_floor(
        observation, fallback_window=settings.fallback_window, floor_margin=settings.floor_margin
    )
    new_cursor = observation.xmin if history_changed else max(observation.xmin, state.cursor_xid)

    # A row skipped by the new cursor can carry an application-set timestamp after the
    # re-anchor, so the gap reaches past the latest such timestamp.
    gap_to = observation.taken_at
    latest = _latest_timestamp_from(conn, table, observation.taken_at)
    if latest is not None:
        gap_to = max(gap_to, latest + timedelta(microseconds=1))

    gap = {
        "from": state.cursor_floor.isoformat(),
        "to": gap_to.isoformat(),
        "reason": reason,
        "old_cursor": state.cursor_xid,
        "new_cursor": new_cursor,
        "recorded_at": observation.taken_at.isoformat(),
        "backfill": "pending",
    }
    if state.pending:
        gap["abandoned_pending"] = {k: state.pending.get(k) for k in ("lo", "hi", "sequence", "rows")}

    fields = dict(
        cursor_floor=floor,
        cursor_floor_trusted=untrusted_reason is None,
        floor_untrusted_reason=untrusted_reason,
        exported_through=observation.taken_at,
        anchored_at=observation.taken_at,
        system_identifier=system_identifier or state.system_identifier,
        last_seen_xid=observation.xmax,
        floor_history=[],
        pending=None,
        gaps=[*state.gaps, gap],
    )
    if history_changed:
        store.update(settings.name, cursor_xid=new_cursor, key_epoch=state.key_epoch + 1, **fields)
    else:
        store.update(settings.name, new_cursor=new_cursor, **fields)

    log.warning(
        "Export %s: re-anchored because %s; cursor %s -> %s. Rows stamped in [%s, %s) and committed before the "
        "re-anchor were skipped and need a backfill of that window.",
        settings.name,
        reason,
        state.cursor_xid,
        new_cursor,
        gap["from"],
        gap["to"],
    )
    return AnchorResult(
        action="reanchored",
        cursor=new_cursor,
        floor=floor,
        floor_trusted=untrusted_reason is None,
        floor_untrusted_reason=untrusted_reason,
        gap=gap,
    )


def _latest_timestamp_from(conn: psycopg.Connection, table: SourceTable, start: datetime) -> datetime | None:
    """Return the latest timestamp at or after ``start`` in the main table, read backwards on its timestamp index."""
    query = sql.SQL("SELECT {ts} FROM {table} WHERE {ts} >= %s ORDER BY {ts} DESC LIMIT 1").format(
        ts=sql.Identifier(table.timestamp_column), table=table.identifier
    )
    row = conn.execute(query, (start,)).fetchone()
    return row[0] if row else None
