"""Recorded gaps: windows skipped by a re-anchor, and the state of their backfills."""

from __future__ import annotations

import logging

import psycopg

from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.state import StateStore
from airflow_audit_export.window import Window, parse_instant

log = logging.getLogger(__name__)

GAP_POLICIES = ("backfill", "record")


def gap_window(gap: dict) -> Window:
    return Window(parse_instant("gap from", gap["from"]), parse_instant("gap to", gap["to"]))


def find_gap(conn: psycopg.Connection, settings: ExportSettings, window: Window) -> dict | None:
    """Return the recorded gap whose window equals ``window`` exactly, or ``None``."""
    store = StateStore(conn, settings.state_table)
    if not store.exists():
        return None
    state = store.load(settings.name)
    if state is None:
        return None
    for gap in state.gaps:
        if gap_window(gap) == window:
            return gap
    return None


def mark_gap_backfill(conn: psycopg.Connection, settings: ExportSettings, window: Window, outcome: dict) -> bool:
    """Record a finished backfill on every gap with this window; return ``False`` when no gap matches."""
    store = StateStore(conn, settings.state_table)
    if not store.exists():
        return False
    with store.locked(settings.name, settings.lock_wait):
        state = store.load(settings.name)
        if state is None:
            return False
        gaps = []
        matched = False
        for gap in state.gaps:
            # Re-anchors in quick succession can record the same window twice; one backfill covers both.
            if gap_window(gap) == window:
                gap = {**gap, "backfill": "done", "backfill_result": outcome}
                matched = True
            gaps.append(gap)
        if matched:
            store.update(settings.name, gaps=gaps)
            log.info("Export %s: gap [%s, %s) is backfilled", settings.name, window.start.isoformat(), window.end.isoformat())
        return matched


def gap_backfill_conf(anchor_result: dict | None, policy: str) -> dict | None:
    """Return the ``audit_backfill`` conf for a gap the anchor just recorded, or ``None`` when there is nothing to do.

    With policy ``record`` the gap is only recorded (and shown by the status command).
    """
    if policy not in GAP_POLICIES:
        raise ValueError(f"Invalid gap policy {policy!r}: expected one of {', '.join(GAP_POLICIES)}.")
    gap = (anchor_result or {}).get("gap")
    if not gap:
        return None
    if policy == "record":
        log.warning(
            "Gap [%s, %s) recorded and not backfilled (gap policy 'record'); trigger audit_backfill with "
            "this window to export it.",
            gap["from"],
            gap["to"],
        )
        return None
    log.info("Triggering a backfill of gap [%s, %s)", gap["from"], gap["to"])
    return {"from": gap["from"], "to": gap["to"]}
