"""Bounded reads of rows whose ``xmin`` lies in an xid range, in ``(timestamp, id)`` keyset order.

``xmin`` cannot be indexed, so every statement is also bounded by a timestamp
slice that PostgreSQL can prune partitions and walk the timestamp index with,
and by ``LIMIT`` with keyset continuation. Slices adapt their width so each
statement stays near a target duration whatever the table size or backlog.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TypeVar

import psycopg
from psycopg import sql

from airflow_audit_export.planning import SliceWidth
from airflow_audit_export.source import SourceTable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: 2**32: row ``xmin`` values are 32-bit and wrap around.
XID_MODULUS = 4294967296


class StatementTimeoutError(RuntimeError):
    """A statement over the narrowest allowed timestamp slice still hit ``statement_timeout``."""


@dataclasses.dataclass(frozen=True)
class KeysetPosition:
    """The last exported row in ``(timestamp, id)`` order; the id is kept as text and cast on use."""

    timestamp: datetime
    id: str

    def to_json(self) -> dict:
        return {"timestamp": self.timestamp.isoformat(), "id": self.id}

    @classmethod
    def from_json(cls, value: dict | None) -> KeysetPosition | None:
        if not value:
            return None
        return cls(timestamp=datetime.fromisoformat(value["timestamp"]), id=value["id"])


@dataclasses.dataclass(frozen=True)
class ExportRow:
    """One row: its keyset position and its NDJSON document as produced by PostgreSQL."""

    timestamp: datetime
    id: str
    document: str


def build_page_query(
    table: SourceTable, *, xmin_range: bool, bounded_above: bool, after_position: bool
) -> sql.Composed:
    """Build one keyset page query over ``[slice_from, slice_to)`` in ``(timestamp, id)`` order.

    With ``xmin_range``, only rows whose ``xmin`` lies in ``[xid_lo, xid_hi)``
    qualify. The row's 32-bit ``xmin`` is widened to 64 bits against the
    ``xmax`` of the statement's own snapshot. Every row the statement can see
    was written by an xid below that ``xmax``, and wraparound protection keeps
    that xid less than 2**31 below it. Rows with ``xmin < 3`` (bootstrap, or
    frozen before PostgreSQL 9.4) are treated as ancient and skipped.
    """
    t = sql.Identifier("t")
    ts = sql.SQL("t.{}").format(sql.Identifier(table.timestamp_column))
    id_ = sql.SQL("t.{}").format(sql.Identifier(table.id_column))

    joins = [sql.SQL("CROSS JOIN LATERAL (SELECT {columns}) AS doc").format(
        columns=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in table.columns)
    )]
    conditions = [sql.SQL("{ts} >= %(slice_from)s").format(ts=ts)]
    if xmin_range:
        joins.insert(0, sql.SQL("CROSS JOIN (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS ref) AS r"))
        widened_xmin = sql.SQL(
            "(r.ref - (((r.ref - t.xmin::text::bigint) %% {m}) + {m}) %% {m})"
        ).format(m=sql.Literal(XID_MODULUS))
        conditions.append(sql.SQL("t.xmin::text::bigint >= 3"))
        conditions.append(sql.SQL("{x} >= %(xid_lo)s AND {x} < %(xid_hi)s").format(x=widened_xmin))
    if bounded_above:
        conditions.append(sql.SQL("{ts} < %(slice_to)s").format(ts=ts))
    if after_position:
        conditions.append(
            sql.SQL("({ts}, {id}) > (%(after_ts)s, %(after_id)s::{id_type})").format(
                ts=ts, id=id_, id_type=sql.SQL(table.id_type)
            )
        )

    # TODO: row_to_json copies a plain json column's text verbatim, so a raw newline inside it
    # breaks the one-document-per-line format; jsonb columns are re-serialized and unaffected.
    return sql.SQL(
        "SELECT {ts}, {id}::text, row_to_json(doc)::text "
        "FROM {table} AS {t} {joins} "
        "WHERE {conditions} "
        "ORDER BY {ts}, {id} "
        "LIMIT %(limit)s"
    ).format(
        ts=ts,
        id=id_,
        table=table.identifier,
        t=t,
        joins=sql.SQL(" ").join(joins),
        conditions=sql.SQL(" AND ").join(conditions),
    )


class XminRangeReader:
    """Streams the rows with ``xmin`` in ``[lo, hi)`` and ``timestamp >= floor`` in keyset order.

    Slices run from the floor (or the resume position) up to ``upper``, then one
    last slice ``[upper, +infinity)`` catches rows stamped in the future. A page
    cancelled by ``statement_timeout`` is retried over a narrower slice; its
    rows were never delivered, so nothing is skipped or repeated.
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        table: SourceTable,
        *,
        lo: int,
        hi: int,
        floor: datetime,
        upper: datetime,
        page_rows: int,
        width: SliceWidth,
        export_name: str = "",
    ) -> None:
        self.conn = conn
        self.table = table
        self.lo = lo
        self.hi = hi
        self.floor = floor
        self.upper = upper
        self.page_rows = page_rows
        self.width = width
        self.export_name = export_name
        self.statements = 0
        self.slowest_statement = 0.0

    def rows(self, position: KeysetPosition | None) -> Iterator[ExportRow]:
        """Yield rows after ``position`` (or from the floor) until the range is exhausted."""
        slice_from = self.floor if position is None else max(self.floor, position.timestamp)
        while True:
            open_ended = slice_from >= self.upper
            slice_to = None if open_ended else min(slice_from + self.width.width, self.upper)
            try:
                for row in self._slice_rows(slice_from, slice_to, position):
                    position = KeysetPosition(row.timestamp, row.id)
                    yield row
            except _SliceTooWide:
                if position is not None:
                    slice_from = max(slice_from, position.timestamp)
                continue
            if open_ended:
                return
            slice_from = slice_to

    def _slice_rows(
        self, slice_from: datetime, slice_to: datetime | None, position: KeysetPosition | None
    ) -> Iterator[ExportRow]:
        after = position is not None and position.timestamp >= slice_from
        params = {
            "slice_from": slice_from,
            "slice_to": slice_to,
            "xid_lo": self.lo,
            "xid_hi": self.hi,
            "limit": self.page_rows,
        }
        while True:
            query = build_page_query(
                self.table, xmin_range=True, bounded_above=slice_to is not None, after_position=after
            )
            if after:
                params["after_ts"] = position.timestamp
                params["after_id"] = position.id
            started = time.monotonic()
            try:
                page = self.conn.execute(query, params).fetchall()
            except psycopg.errors.QueryCanceled as err:
                elapsed = time.monotonic() - started
                if not self.width.shrink():
                    raise StatementTimeoutError(
                        f"Export {self.export_name!r}: a page over [{slice_from.isoformat()}, "
                        f"{slice_to.isoformat() if slice_to else 'infinity'}) was cancelled after {elapsed:.2f}s "
                        "even at the narrowest slice; raise statement_timeout for the export role or add an "
                        "index on the timestamp column."
                    ) from err
                log.warning(
                    "Export %s: page over [%s, %s) cancelled after %.2fs by statement_timeout; retrying with "
                    "slices of %s",
                    self.export_name,
                    slice_from.isoformat(),
                    slice_to.isoformat() if slice_to else "infinity",
                    elapsed,
                    self.width.width,
                )
                raise _SliceTooWide from err
            elapsed = time.monotonic() - started
            self.statements += 1
            self.slowest_statement = max(self.slowest_statement, elapsed)

            for timestamp, id_text, document in page:
                yield ExportRow(timestamp, id_text, document)

            if len(page) < self.page_rows:
                self.width.record(elapsed)
                return
            if elapsed > self.width.target:
                self.width.shrink()
            last_timestamp, last_id, _ = page[-1]
            position = KeysetPosition(last_timestamp, last_id)
            after = True


class _SliceTooWide(Exception):
    """Internal signal: the slice was cancelled and must be retried narrower from the same position."""


_ITEM, _DONE, _ERROR = "item", "done", "error"
#: Seconds between checks of the stop flag while the producer waits for a free slot.
_SLOT_POLL_SECONDS = 0.1


def read_ahead(items: Iterator[T], *, depth: int = 1, name: str = "read-ahead") -> Iterator[T]:
    """Yield the items of ``items`` while a background thread already produces up to ``depth`` more.

    Used to run the next page's statement while the caller compresses and
    uploads the previous page: psycopg waits for the server and zlib
    compresses without holding the GIL, so the two overlap on separate cores.
    At most ``depth + 1`` items exist at once: the one the caller holds, and
    the ones produced or being produced. The producer starts an item only
    when a slot is free, and the caller frees its slot when it requests the
    next item.

    ``items`` runs entirely in the thread, so nothing else may use its
    connection until this generator is exhausted or closed. An exception in
    ``items`` is raised here, in the caller's thread. When the caller stops
    early, the producer finishes its current item (one statement at most),
    then stops and is joined before this generator returns.
    """
    produced: queue.SimpleQueue = queue.SimpleQueue()
    slots = threading.Semaphore(depth + 1)
    stop = threading.Event()

    def take_slot() -> bool:
        while not stop.is_set():
            if slots.acquire(timeout=_SLOT_POLL_SECONDS):
                return True
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            while take_slot():
                try:
                    item = next(iterator)
                except StopIteration:
                    produced.put((_DONE, None))
                    return
                produced.put((_ITEM, item))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer's thread
            produced.put((_ERROR, err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            kind, value = produced.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise value
            yield value
            del value
            slots.release()
    finally:
        stop.set()
        producer.join()
