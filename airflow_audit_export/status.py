"""The status of an export in plain words: cursor, lag, draining, pending range, gaps, floor trust, last run."""

from __future__ import annotations

from datetime import datetime

import psycopg

from airflow_audit_export.observation import STATS_GRANT_HINT
from airflow_audit_export.state import ExportState, StateStore


def read_status(conn: psycopg.Connection, state_table: str, export_name: str) -> dict:
    """Return the status of one export; raise ``LookupError`` when it was never anchored."""
    store = StateStore(conn, state_table)
    state = store.load(export_name)
    if state is None:
        names = store.list_names()
        raise LookupError(
            f"Export {export_name!r} has no state row in {state_table!r}; known exports: {', '.join(names) or 'none'}."
        )
    xmin, now = conn.execute(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, clock_timestamp()"
    ).fetchone()
    return describe_state(state, current_xmin=xmin, now=now, role=conn.info.user)


def describe_state(state: ExportState, *, current_xmin: int, now: datetime, role: str) -> dict:
    """Turn a state row into the status fields, computing lag against the current snapshot."""
    fix = None
    if not state.cursor_floor_trusted:
        reason = state.floor_untrusted_reason or ""
        fix = STATS_GRANT_HINT.format(role=role) if "pg_read_all_stats" in reason else None
    return {
        "export_name": state.export_name,
        "source_table": state.source_table,
        "cursor": state.cursor_xid,
        "key_epoch": state.key_epoch,
        "anchored_at": state.anchored_at.isoformat(),
        "floor": state.cursor_floor.isoformat(),
        "floor_trusted": state.cursor_floor_trusted,
        "floor_untrusted_reason": state.floor_untrusted_reason,
        "floor_fix": fix,
        "lag_xids": max(current_xmin - state.cursor_xid, 0),
        "lag_seconds": round((now - state.exported_through).total_seconds(), 3),
        "exported_through": state.exported_through.isoformat(),
        "draining": bool(state.pending and state.pending.get("draining"))
        or bool(state.last_run and state.last_run.get("draining")),
        "pending": _pending_summary(state.pending),
        "gaps": state.gaps,
        "last_run": state.last_run,
        "updated_at": state.updated_at.isoformat() if state.updated_at else None,
    }


def _pending_summary(pending: dict | None) -> dict | None:
    if not pending:
        return None
    return {k: pending.get(k) for k in ("lo", "hi", "floor", "sequence", "rows", "position", "planned_at")}


def format_status(status: dict) -> str:
    """Render a status as aligned ``label: value`` lines for logs and the command line."""
    floor_trust = "trusted" if status["floor_trusted"] else f"untrusted ({status['floor_untrusted_reason']})"
    lines = [
        ("export", f"{status['export_name']} ({status['source_table']})"),
        ("cursor", status["cursor"] if not status["key_epoch"] else f"{status['cursor']} (key epoch {status['key_epoch']})"),
        ("anchored at", status["anchored_at"]),
        ("floor", f"{status['floor']}, {floor_trust}"),
    ]
    if status["floor_fix"]:
        lines.append(("floor fix", status["floor_fix"]))
    last = status["last_run"] or {}
    if last.get("observation_trusted") is False:
        lines.append(("latest observation", f"untrusted, so the floor stops advancing ({last.get('observation_untrusted_reason')})"))
    lines += [
        ("lag", f"{status['lag_xids']} xids, {status['lag_seconds']:.1f} s (exported through {status['exported_through']})"),
        ("draining", "yes" if status["draining"] else "no"),
    ]

    pending = status["pending"]
    if pending:
        lines.append(
            (
                "pending range",
                f"xids [{pending['lo']}, {pending['hi']}), {pending['sequence']} objects and {pending['rows']} rows "
                f"written, planned at {pending['planned_at']}",
            )
        )
    else:
        lines.append(("pending range", "none"))

    if status["gaps"]:
        for gap in status["gaps"]:
            lines.append(("gap", f"[{gap['from']}, {gap['to']}) backfill {gap.get('backfill', 'pending')}: {gap['reason']}"))
    else:
        lines.append(("gaps", "none"))

    last = status["last_run"]
    if last:
        lines.append(
            (
                "last run",
                f"{last.get('rows')} rows, {last.get('objects')} objects, {last.get('bytes')} bytes in "
                f"{last.get('duration_seconds')} s, finished {last.get('finished_at')}"
                f"{'' if last.get('completed', True) else ' (stopped at a per-run cap)'}",
            )
        )
    else:
        lines.append(("last run", "none yet"))

    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label.rjust(width)}: {value}" for label, value in lines)
