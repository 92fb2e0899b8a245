"""Backfill of one page range: keyset pages over ``(timestamp, id)``, objects, and the window manifest.

A range never touches the steady-state cursor. Objects are cut by row count
from the start of each UTC day of the window and named by the window and their
first id. Re-running a range, or the whole window with another split, therefore
writes the same keys with the same bytes, and a different window never
overwrites them.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from urllib.parse import quote

import psycopg

from airflow_audit_export.reading import KeysetPosition, build_page_query
from airflow_audit_export.source import SourceTable
from airflow_audit_export.window import Window
from airflow_audit_export.writing import Destination, StagedObject, object_key, utc_day

log = logging.getLogger(__name__)


def backfill_stem(name: str, window: Window, source: str, first_id: str) -> str:
    """Name a backfill object by its window, its source table role and its first id."""
    return f"{name}_backfill_{window.token}_{source}_{quote(first_id, safe='-_.')}"


def manifest_key(prefix: str, name: str, window: Window) -> str:
    """Key of the manifest that lists every object of a window."""
    parts = [p for p in (prefix.strip("/"), "manifests", f"{name}_backfill_{window.token}.json") if p]
    return "/".join(parts)


def export_range(
    conn: psycopg.Connection,
    tables: list[tuple[str, SourceTable]],
    destination: Destination,
    *,
    name: str,
    window: Window,
    start: datetime,
    end: datetime,
    page_rows: int,
    rows_per_object: int,
    compression: str,
) -> dict:
    """Export every row stamped in ``[start, end)`` from each ``(source, table)`` and return the written objects.

    Each page is one statement: an index scan from the last position that
    stops at ``LIMIT page_rows``.
    """
    objects: list[dict] = []
    total_rows = 0
    total_bytes = 0
    started = time.monotonic()

    for source, table in tables:
        for written in _export_table_range(
            conn,
            table,
            destination,
            source=source,
            name=name,
            window=window,
            start=start,
            end=end,
            page_rows=page_rows,
            rows_per_object=rows_per_object,
            compression=compression,
        ):
            objects.append(written)
            total_rows += written["rows"]
            total_bytes += written["bytes"]

    log.info(
        "Backfill %s: range [%s, %s) done: %s rows in %s objects (%s bytes) in %.1fs",
        name,
        start.isoformat(),
        end.isoformat(),
        total_rows,
        len(objects),
        total_bytes,
        time.monotonic() - started,
    )
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "rows": total_rows,
        "bytes": total_bytes,
        "objects": objects,
    }


def _export_table_range(
    conn: psycopg.Connection,
    table: SourceTable,
    destination: Destination,
    *,
    source: str,
    name: str,
    window: Window,
    start: datetime,
    end: datetime,
    page_rows: int,
    rows_per_object: int,
    compression: str,
):
    """Yield one ``{key, rows, bytes}`` record per object published for one table."""
    position: KeysetPosition | None = None
    staged: StagedObject | None = None
    staged_day = None
    first_id = ""
    rows_so_far = 0
    span = (end - start).total_seconds() or 1.0

    try:
        while True:
            after = position is not None
            query = build_page_query(table, xmin_range=False, bounded_above=True, after_position=after)
            params = {
                "slice_from": max(start, position.timestamp) if after else start,
                "slice_to": end,
                "limit": page_rows,
            }
            if after:
                params["after_ts"] = position.timestamp
                params["after_id"] = position.id
            page = conn.execute(query, params).fetchall()

            for timestamp, id_text, document in page:
                day = utc_day(timestamp)
                if staged is not None and (staged.rows >= rows_per_object or day != staged_day):
                    yield _publish(destination, staged, staged_day, name, window, source, first_id, compression)
                    staged = None
                if staged is None:
                    staged = StagedObject(destination.staging_dir(), compression)
                    staged_day = day
                    first_id = id_text
                staged.write(document)

            rows_so_far += len(page)
            if page:
                last_timestamp, last_id, _ = page[-1]
                position = KeysetPosition(last_timestamp, last_id)
                log.info(
                    "Backfill %s: %s rows so far from %s in [%s, %s), last timestamp %s, %.0f%% of the range",
                    name,
                    rows_so_far,
                    table.qualified_name,
                    start.isoformat(),
                    end.isoformat(),
                    last_timestamp.isoformat(),
                    100 * (last_timestamp - start).total_seconds() / span,
                )
            if len(page) < page_rows:
                break

        if staged is not None:
            yield _publish(destination, staged, staged_day, name, window, source, first_id, compression)
            staged = None
    finally:
        if staged is not None:
            staged.discard()


def _publish(destination, staged, day, name, window, source, first_id, compression) -> dict:
    key = object_key(destination.prefix, day, backfill_stem(name, window, source, first_id), compression)
    size = staged.finish()
    destination.publish(staged.path, key)
    log.info("Backfill %s: wrote %s (%s rows, %s bytes)", name, key, staged.rows, size)
    return {"key": key, "rows": staged.rows, "bytes": size}


def write_manifest(destination: Destination, name: str, window: Window, range_results: list[dict]) -> dict:
    """Write the window's manifest, every key with its row count, and return the totals.

    The manifest has no timestamp of its own, so re-running a window writes the same bytes.
    """
    objects = sorted((o for result in range_results for o in result["objects"]), key=lambda o: o["key"])
    totals = {
        "rows": sum(o["rows"] for o in objects),
        "objects": len(objects),
        "bytes": sum(o["bytes"] for o in objects),
        "ranges": len(range_results),
    }
    # The range count stays out of the manifest body: another split of the same window gives the same objects.
    manifest = {
        "export_name": name,
        "window": window.to_json(),
        "totals": {k: v for k, v in totals.items() if k != "ranges"},
        "objects": [{"key": o["key"], "rows": o["rows"]} for o in objects],
    }
    key = manifest_key(destination.prefix, name, window)
    staged = StagedObject(destination.staging_dir(), "none")
    staged.write(json.dumps(manifest, indent=1, sort_keys=True))
    staged.finish()
    destination.publish(staged.path, key)
    log.info(
        "Backfill %s: manifest %s lists %s objects, %s rows, %s bytes",
        name,
        key,
        totals["objects"],
        totals["rows"],
        totals["bytes"],
    )
    return {**totals, "manifest": key, "window": window.to_json()}
