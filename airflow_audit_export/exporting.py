"""One steady-state export run: plan or resume an xid range, write its objects, move the cursor."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import psycopg

from airflow_audit_export.lineage import LineageCheck, LineageMarker, check_lineage, new_token, read_marker, write_marker
from airflow_audit_export.observation import take_observation
from airflow_audit_export.planning import SliceWidth, advance_floor, append_observation, plan_xid_range
from airflow_audit_export.reading import ExportRow, KeysetPosition, XminRangeReader
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import describe_source
from airflow_audit_export.state import ExportState, StateStore, StateTableError
from airflow_audit_export.writing import (
    WRITE_BLOCK_ROWS,
    Destination,
    StagedObject,
    object_key,
    steady_state_stem,
    utc_day,
)

log = logging.getLogger(__name__)

#: Called with an event name and its details at each step of a run. An exception raised
#: by the callback stops the run there, as a crash would.
ProgressCallback = Callable[[str, dict], None]


#: An open transaction older than this is named in a warning, because it keeps the cursor and the floor back.
LONG_TRANSACTION = timedelta(minutes=5)


class StaleCursorError(RuntimeError):
    """The source database's xids are below the stored cursor; exporting against it would skip rows."""


def run_export(
    conn: psycopg.Connection,
    settings: ExportSettings,
    destination: Destination,
    *,
    on_progress: ProgressCallback | None = None,
) -> dict:
    """Export the rows committed since the cursor, under the export's advisory lock.

    A pending range left by a failed attempt is resumed exactly: the same
    ``[lo, hi)``, floor, page and object sizes, from the recorded keyset
    position, so retried attempts rewrite the same keys with the same bytes.
    Otherwise a new observation plans the range, and the range is stored
    before any object is written. Returns the run's statistics.

    Raises :class:`~airflow_audit_export.state.LockNotAcquired` when another run
    holds the lock; nothing is written in that case.
    """
    store = StateStore(conn, settings.state_table)
    notify = on_progress or (lambda event, details: None)
    started = time.monotonic()

    with store.locked(settings.name, settings.lock_wait):
        state = store.load(settings.name)
        if state is None:
            raise StateTableError(f"Export {settings.name!r} has no state row: run the anchor task first.")
        table = describe_source(conn, settings)
        destination.check_writable()

        # NOTE: reading and writing the marker are two requests, so two copies of the database
        # that run at the same moment can both pass this check before either writes.
        marker = read_marker(destination, settings.name)
        lineage = check_lineage(state, marker)
        if lineage.diverged_reason:
            state = _move_to_new_epoch(store, settings, state, lineage)

        if state.pending:
            pending = dict(state.pending)
            history = state.floor_history
            log.info(
                "Export %s: resuming pending xid range [%s, %s) at object %s, %s rows already written",
                settings.name,
                pending["lo"],
                pending["hi"],
                pending["sequence"],
                pending["rows"],
            )
            _claim_for_resume(store, destination, state, pending, marker)
        else:
            pending, history = _plan(conn, store, settings, state, lineage)
            write_marker(destination, state, pending["lineage_token"], pending["key_epoch"], pending["lo"])
        notify("planned", dict(pending))

        if not pending["floor_trusted"]:
            log.warning(
                "Export %s: the timestamp floor is untrusted (%s), so this run scans back to %s",
                settings.name,
                pending.get("floor_untrusted_reason"),
                pending["floor"],
            )

        reader = XminRangeReader(
            conn,
            table,
            lo=pending["lo"],
            hi=pending["hi"],
            floor=datetime.fromisoformat(pending["floor"]),
            upper=datetime.fromisoformat(pending["upper"]),
            page_rows=pending["page_rows"],
            width=SliceWidth(settings.statement_target),
            export_name=settings.name,
        )
        finished = _write_objects(store, settings, destination, reader, pending, notify, started)

        if not finished:
            return _report_partial(store, settings, pending, reader, started)
        notify("before_commit", dict(pending))
        return _commit(store, settings, state, pending, history, reader, started)


def _move_to_new_epoch(
    store: StateStore, settings: ExportSettings, state: ExportState, lineage: LineageCheck
) -> ExportState:
    """Switch to the key epoch of a diverged lineage and drop its pending range, in one update.

    Dropping a pending range loses nothing: the cursor has not moved, so the next
    range starts at the same xid and its rows are written again under the new epoch.
    """
    store.update(
        settings.name,
        key_epoch=lineage.key_epoch,
        pending=None,
        lineage_token=None,
        previous_lineage_token=None,
    )
    log.warning(
        "Export %s: %s. Objects from now on use key epoch %s (was %s), so this database never overwrites the "
        "other copy's objects, and the rows from cursor %s on are exported again under the new keys%s.",
        settings.name,
        lineage.diverged_reason,
        lineage.key_epoch,
        state.key_epoch,
        state.cursor_xid,
        f"; abandoned pending xid range [{state.pending['lo']}, {state.pending['hi']})" if state.pending else "",
    )
    return dataclasses.replace(
        state, key_epoch=lineage.key_epoch, pending=None, lineage_token=None, previous_lineage_token=None
    )


def _claim_for_resume(
    store: StateStore, destination: Destination, state: ExportState, pending: dict, marker: LineageMarker | None
) -> None:
    """Write the pending range's token to the marker, unless it is there already, before more objects follow."""
    if marker is not None and state.lineage_token is not None and marker.token == state.lineage_token:
        return
    token = state.lineage_token
    if token is None:
        token = new_token()
        store.update(state.export_name, lineage_token=token, previous_lineage_token=None)
    write_marker(destination, state, token, pending.get("key_epoch", state.key_epoch), pending["lo"])


def _plan(
    conn: psycopg.Connection, store: StateStore, settings: ExportSettings, state: ExportState, lineage: LineageCheck
) -> tuple[dict, list]:
    """Take an observation, plan the xid range and store it as the pending range with a new lineage token."""
    observation = take_observation(conn, floor_margin=settings.floor_margin, fallback_window=settings.fallback_window)
    if observation.xmin < state.cursor_xid:
        raise StaleCursorError(
            f"Export {settings.name!r}: the snapshot xmin {observation.xmin} is below the stored cursor "
            f"{state.cursor_xid}, so this database has another xid history (restore, clone or failover). "
            "Run the anchor task: it re-anchors and records the gap."
        )
    history = append_observation(state.floor_history, observation)
    xids = plan_xid_range(state.cursor_xid, observation.xmin, settings.max_xid_interval)
    pending = {
        "lo": xids.lo,
        "hi": xids.hi,
        "snapshot_xmin": observation.xmin,
        "snapshot_xmax": observation.xmax,
        "draining": xids.draining,
        "floor": state.cursor_floor.isoformat(),
        "floor_trusted": state.cursor_floor_trusted,
        "floor_untrusted_reason": state.floor_untrusted_reason,
        "upper": observation.taken_at.isoformat(),
        "page_rows": settings.page_rows,
        "rows_per_object": settings.rows_per_object,
        "compression": settings.compression,
        "key_epoch": state.key_epoch,
        "lineage_token": new_token(),
        "lineage_diverged": lineage.diverged_reason,
        "position": None,
        "sequence": 0,
        "rows": 0,
        "bytes": 0,
        "keys": [],
        "planned_at": observation.taken_at.isoformat(),
        "observation_trusted": observation.trusted,
        "observation_untrusted_reason": observation.untrusted_reason,
    }
    store.update(
        settings.name,
        floor_history=history,
        pending=pending,
        lineage_token=pending["lineage_token"],
        previous_lineage_token=state.lineage_token,
    )
    if not observation.trusted:
        log.warning(
            "Export %s: this run's observation is untrusted (%s), so the floor stops advancing and every run "
            "scans further back until that is fixed",
            settings.name,
            observation.untrusted_reason,
        )
    oldest = observation.describe_oldest_transaction()
    if oldest and observation.taken_at - observation.oldest_transaction_start() > LONG_TRANSACTION:
        log.warning(
            "Export %s: the oldest open transaction is %s; rows committed after it started wait until it ends, "
            "and the floor stays at its start",
            settings.name,
            oldest,
        )
    log.info(
        "Export %s: planned xid range [%s, %s) of %s xids, floor %s, snapshot xmin %s%s",
        settings.name,
        xids.lo,
        xids.hi,
        xids.hi - xids.lo,
        pending["floor"],
        observation.xmin,
        " (draining: capped by max_xid_interval)" if xids.draining else "",
    )
    return pending, history


def _write_objects(
    store: StateStore,
    settings: ExportSettings,
    destination: Destination,
    reader: XminRangeReader,
    pending: dict,
    notify: ProgressCallback,
    started: float,
) -> bool:
    """Write objects for the pending range; return ``False`` when a per-run cap stopped it early.

    Objects are cut only by row count and by UTC day, never by timing, and the
    caps are checked between objects, so a resumed attempt cuts the same objects.
    """
    if pending["hi"] <= pending["lo"]:
        return True

    staged: StagedObject | None = None
    staged_day = None
    # Documents of the staged object not written yet: one gzip write per block costs far less than one per row.
    block: list[str] = []
    last_row: ExportRow | None = None
    rows_this_attempt = 0
    rows = reader.rows(KeysetPosition.from_json(pending["position"]))
    try:
        for row in rows:
            day = utc_day(row.timestamp)
            if staged is not None and (staged.rows + len(block) >= pending["rows_per_object"] or day != staged_day):
                staged.write_many(block)
                block = []
                rows_this_attempt += staged.rows
                _publish(store, settings, destination, pending, staged, staged_day, last_row, notify)
                staged = None
                if _cap_reached(settings, rows_this_attempt, started):
                    return False
            if staged is None:
                staged = StagedObject(destination.staging_dir(), pending["compression"])
                staged_day = day
            block.append(row.document)
            if len(block) >= WRITE_BLOCK_ROWS:
                staged.write_many(block)
                block = []
            last_row = row
        if staged is not None:
            staged.write_many(block)
            _publish(store, settings, destination, pending, staged, staged_day, last_row, notify)
            staged = None
        return True
    finally:
        rows.close()
        if staged is not None:
            staged.discard()


def _publish(
    store: StateStore,
    settings: ExportSettings,
    destination: Destination,
    pending: dict,
    staged: StagedObject,
    day,
    last_row: ExportRow,
    notify: ProgressCallback,
) -> None:
    """Publish one object, then record the keyset position after its last row."""
    sequence = pending["sequence"] + 1
    key = object_key(
        destination.prefix,
        day,
        steady_state_stem(settings.name, pending["lo"], pending["hi"], sequence, pending.get("key_epoch", 0)),
        pending["compression"],
    )
    size = staged.finish()
    destination.publish(staged.path, key)
    notify("object_published", {"key": key, "rows": staged.rows, "bytes": size, "sequence": sequence})

    pending["sequence"] = sequence
    pending["position"] = KeysetPosition(last_row.timestamp, last_row.id).to_json()
    pending["rows"] += staged.rows
    pending["bytes"] += size
    pending["keys"] = [*pending["keys"], key][-20:]
    store.update(settings.name, pending=pending)
    notify("progress_saved", dict(pending))
    log.info(
        "Export %s: wrote %s (%s rows, %s bytes); %s rows so far in xid range [%s, %s), last timestamp %s",
        settings.name,
        key,
        staged.rows,
        size,
        pending["rows"],
        pending["lo"],
        pending["hi"],
        last_row.timestamp.isoformat(),
    )


def _cap_reached(settings: ExportSettings, rows_this_attempt: int, started: float) -> bool:
    elapsed = time.monotonic() - started
    if rows_this_attempt >= settings.max_rows_per_run:
        log.info("Export %s: stopping at max_rows_per_run %s; the next run continues", settings.name, settings.max_rows_per_run)
        return True
    if elapsed >= settings.max_run_duration.total_seconds():
        log.info(
            "Export %s: stopping after %.1fs at max_run_duration %s; the next run continues",
            settings.name,
            elapsed,
            settings.max_run_duration,
        )
        return True
    return False


def _run_stats(pending: dict, reader: XminRangeReader, started: float) -> dict:
    return {
        "lo": pending["lo"],
        "hi": pending["hi"],
        "rows": pending["rows"],
        "objects": pending["sequence"],
        "bytes": pending["bytes"],
        "floor": pending["floor"],
        "floor_trusted": pending["floor_trusted"],
        "observation_trusted": pending.get("observation_trusted", True),
        "observation_untrusted_reason": pending.get("observation_untrusted_reason"),
        "statements": reader.statements,
        "slowest_statement_seconds": round(reader.slowest_statement, 4),
        "duration_seconds": round(time.monotonic() - started, 3),
        "last_keys": pending["keys"][-3:],
        "key_epoch": pending.get("key_epoch", 0),
        "lineage_diverged": pending.get("lineage_diverged"),
    }


def _report_partial(
    store: StateStore, settings: ExportSettings, pending: dict, reader: XminRangeReader, started: float
) -> dict:
    """Keep the pending range for the next run and record that this run stopped at a cap."""
    stats = _run_stats(pending, reader, started)
    stats.update(
        completed=False,
        draining=True,
        cursor=pending["lo"],
        lag_xids=pending["snapshot_xmin"] - pending["lo"],
        finished_at=datetime.now(timezone.utc).isoformat(),
    )
    store.update(settings.name, last_run=stats)
    return stats


def _commit(
    store: StateStore,
    settings: ExportSettings,
    state: ExportState,
    pending: dict,
    history: list,
    reader: XminRangeReader,
    started: float,
) -> dict:
    """Move the cursor to ``hi``, fold the history into its floor and clear the pending range, in one update."""
    folded = advance_floor(
        cursor=pending["hi"],
        floor=state.cursor_floor,
        trusted=state.cursor_floor_trusted,
        untrusted_reason=state.floor_untrusted_reason,
        exported_through=state.exported_through,
        history=history,
    )
    now = datetime.now(timezone.utc)
    stats = _run_stats(pending, reader, started)
    stats.update(
        completed=True,
        draining=pending["draining"],
        cursor=pending["hi"],
        lag_xids=pending["snapshot_xmin"] - pending["hi"],
        lag_seconds=round((now - folded.exported_through).total_seconds(), 3),
        next_floor=folded.floor.isoformat(),
        finished_at=now.isoformat(),
    )
    store.update(
        settings.name,
        new_cursor=pending["hi"],
        cursor_floor=folded.floor,
        cursor_floor_trusted=folded.trusted,
        floor_untrusted_reason=folded.untrusted_reason,
        exported_through=folded.exported_through,
        floor_history=folded.history,
        last_seen_xid=pending["snapshot_xmax"],
        pending=None,
        last_run=stats,
    )
    log.info(
        "Export %s: committed cursor %s -> %s: %s rows in %s objects (%s bytes), lag %s xids / %.1fs%s",
        settings.name,
        pending["lo"],
        pending["hi"],
        stats["rows"],
        stats["objects"],
        stats["bytes"],
        stats["lag_xids"],
        stats["lag_seconds"],
        ", still draining" if stats["draining"] else "",
    )
    return stats
