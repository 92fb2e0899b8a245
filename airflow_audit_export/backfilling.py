"""Backfill of one page range: keyset pages over ``(timestamp, id)``, objects, and the window manifest.

A range never touches the steady-state cursor. Objects are cut by row count
from the start of each UTC day of the window and named by the window and their
first id. Re-running a range, or the whole window with another split, therefore
writes the same keys with the same bytes, and a different window never
overwrites them.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from operator import itemgetter
from urllib.parse import quote

import psycopg

from airflow_audit_export.reading import KeysetPosition, build_page_query, read_ahead
from airflow_audit_export.source import SourceTable
from airflow_audit_export.window import Window
from airflow_audit_export.writing import WRITE_BLOCK_ROWS, Destination, StagedObject, object_key, utc_day

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
    """Yield one ``{key, rows, bytes}`` record per object published for one table.

    The next page's statement runs in a background thread while this one
    compresses the current page (see :func:`read_ahead`), and a finished
    object is published by another thread. Up to two pages are in memory at
    once.
    """
    writer = _ObjectWriter(
        destination, name=name, window=window, source=source, rows_per_object=rows_per_object, compression=compression
    )
    rows_so_far = 0
    span = (end - start).total_seconds() or 1.0
    pages = read_ahead(_pages(conn, table, start, end, page_rows), name=f"backfill-pages-{source}")

    try:
        for page in pages:
            yield from writer.write_page(page)
            rows_so_far += len(page)
            last_timestamp = page[-1][0]
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
        yield from writer.finish()
    finally:
        pages.close()
        writer.close()


def _pages(
    conn: psycopg.Connection, table: SourceTable, start: datetime, end: datetime, page_rows: int
) -> Iterator[list[tuple[datetime, str, str]]]:
    """Yield the non-empty keyset pages of ``(timestamp, id, document)`` rows stamped in ``[start, end)``.

    Each page is one statement: an index scan from the last position that
    stops at ``LIMIT page_rows``. Rows come in binary format, which saves
    parsing the timestamps from text. Documents and ids are text in both formats.
    """
    position: KeysetPosition | None = None
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
        page = conn.cursor(binary=True).execute(query, params).fetchall()
        if page:
            yield page
        if len(page) < page_rows:
            return
        last_timestamp, last_id, _ = page[-1]
        position = KeysetPosition(last_timestamp, last_id)


class _ObjectWriter:
    """Cuts rows into objects by row count from the start of each UTC day, and publishes them.

    Rows arrive in pages sorted by ``(timestamp, id)``. The rows of a page
    that go to the same object are written in blocks (see
    :func:`_write_documents`), which gives the same bytes as one write per
    row. A finished object is flushed and published by a background thread
    while the next one is written. At most one object is in flight, and a
    failed publish is raised before the next object is handed over, so no
    later object is published after a failure.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        name: str,
        window: Window,
        source: str,
        rows_per_object: int,
        compression: str,
    ) -> None:
        self.destination = destination
        self.name = name
        self.window = window
        self.source = source
        self.rows_per_object = rows_per_object
        self.compression = compression
        self.staged: StagedObject | None = None
        self.staged_day: date | None = None
        self.first_id = ""
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"backfill-publish-{source}")
        self._in_flight: Future | None = None

    def write_page(self, page: list[tuple[datetime, str, str]]) -> Iterator[dict]:
        """Write one page and yield a record for every object whose publication completed meanwhile."""
        index = 0
        while index < len(page):
            day = utc_day(page[index][0])
            if self.staged is not None and (self.staged.rows >= self.rows_per_object or day != self.staged_day):
                yield from self._hand_over()
            if self.staged is None:
                self.staged = StagedObject(self.destination.staging_dir(), self.compression)
                self.staged_day = day
                self.first_id = page[index][1]
            # Timestamps ascend within a page, so a binary search finds the first row of a later UTC day.
            next_midnight = datetime.combine(day + timedelta(days=1), dt_time(0), tzinfo=timezone.utc)
            day_end = bisect.bisect_left(page, next_midnight, lo=index, key=itemgetter(0))
            stop = min(day_end, index + self.rows_per_object - self.staged.rows)
            _write_documents(self.staged, [row[2] for row in page[index:stop]])
            index = stop

    def finish(self) -> Iterator[dict]:
        """Publish the last object, if any rows are staged, and yield the remaining records."""
        if self.staged is not None:
            yield from self._hand_over()
        yield from self._wait_in_flight()

    def close(self) -> None:
        """Wait for the publisher thread, and delete the staging file of an object that was not handed over."""
        self._publisher.shutdown(wait=True)
        if self.staged is not None:
            self.staged.discard()
            self.staged = None

    def _hand_over(self) -> Iterator[dict]:
        # Wait for the previous object first. If it failed, the staged object stays here, and close() deletes it.
        yield from self._wait_in_flight()
        staged, self.staged = self.staged, None
        self._in_flight = self._publisher.submit(
            _publish_or_discard,
            self.destination,
            staged,
            self.staged_day,
            self.name,
            self.window,
            self.source,
            self.first_id,
            self.compression,
        )

    def _wait_in_flight(self) -> Iterator[dict]:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            yield future.result()


def _publish_or_discard(destination, staged, day, name, window, source, first_id, compression) -> dict:
    try:
        return _publish(destination, staged, day, name, window, source, first_id, compression)
    except BaseException:
        staged.discard()
        raise


def _write_documents(staged: StagedObject, documents: list[str]) -> None:
    """Append documents to a staged object as NDJSON lines, one write per block of ``WRITE_BLOCK_ROWS``.

    The blocks keep the joined copies small.
    """
    for first in range(0, len(documents), WRITE_BLOCK_ROWS):
        staged.write_many(documents[first : first + WRITE_BLOCK_ROWS])


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
