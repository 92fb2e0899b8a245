"""The state table in the source database: one row per export, and the advisory lock around it.

Every write of ``cursor_xid`` is monotone: the ``UPDATE`` applies only when the
new cursor is ``>=`` the stored one, and a write that would move it backwards
raises :class:`CursorRegressionError` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from airflow_audit_export.settings import split_qualified_name

log = logging.getLogger(__name__)

#: Upper bound on kept floor-history entries. Dropping an entry only lowers later floors, which is safe.
MAX_HISTORY_ENTRIES = 64

CREATE_STATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    export_name text PRIMARY KEY,
    source_table text NOT NULL,
    cursor_xid bigint NOT NULL,
    cursor_floor timestamptz NOT NULL,
    cursor_floor_trusted boolean NOT NULL,
    floor_untrusted_reason text,
    exported_through timestamptz NOT NULL,
    anchored_at timestamptz NOT NULL,
    system_identifier text,
    last_seen_xid bigint NOT NULL,
    key_epoch integer NOT NULL DEFAULT 0,
    lineage_token text,
    previous_lineage_token text,
    floor_history jsonb NOT NULL DEFAULT '[]',
    pending jsonb,
    gaps jsonb NOT NULL DEFAULT '[]',
    last_run jsonb,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

STATE_COLUMNS = (
    "export_name",
    "source_table",
    "cursor_xid",
    "cursor_floor",
    "cursor_floor_trusted",
    "floor_untrusted_reason",
    "exported_through",
    "anchored_at",
    "system_identifier",
    "last_seen_xid",
    "key_epoch",
    "lineage_token",
    "previous_lineage_token",
    "floor_history",
    "pending",
    "gaps",
    "last_run",
    "updated_at",
)


class StateTableError(RuntimeError):
    """The state table is missing and cannot be created, or cannot be read or written."""


class CursorRegressionError(RuntimeError):
    """A write would have moved the cursor backwards; nothing was written."""


class LockNotAcquired(RuntimeError):
    """Another run of the same export holds the advisory lock."""


@dataclasses.dataclass
class ExportState:
    """One export's row.

    ``cursor_floor`` is a timestamp floor valid for every xid ``>= cursor_xid``.
    ``exported_through`` is a time before which every committed row is exported
    (or was history at the anchor). ``floor_history`` keeps observations whose
    ``xmax`` is above the cursor, ready to raise the floor once the cursor passes them.
    ``key_epoch`` counts re-anchors onto another xid history (a restore or a
    copy into another cluster). It is part of steady-state object keys, so the
    new history's xid ranges never overwrite the old history's objects.
    ``lineage_token`` is the token of the range planned last, also written to the
    destination's lineage marker, and ``previous_lineage_token`` the one before
    (see :mod:`airflow_audit_export.lineage`).
    """

    export_name: str
    source_table: str
    cursor_xid: int
    cursor_floor: datetime
    cursor_floor_trusted: bool
    floor_untrusted_reason: str | None
    exported_through: datetime
    anchored_at: datetime
    system_identifier: str | None
    last_seen_xid: int
    key_epoch: int = 0
    lineage_token: str | None = None
    previous_lineage_token: str | None = None
    floor_history: list[dict] = dataclasses.field(default_factory=list)
    pending: dict | None = None
    gaps: list[dict] = dataclasses.field(default_factory=list)
    last_run: dict | None = None
    updated_at: datetime | None = None


class StateStore:
    """Reads and writes export state rows in ``state_table`` of the source database."""

    def __init__(self, conn: psycopg.Connection, state_table: str) -> None:
        schema, name = split_qualified_name(state_table, what="state_table")
        self.conn = conn
        self.state_table = state_table
        self.identifier = sql.Identifier(schema, name)

    # -- table ---------------------------------------------------------------------------

    def exists(self) -> bool:
        """Return whether the state table exists (and is visible to the role)."""
        return self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self._regclass_name(),)).fetchone()[0]

    def ensure_table(self) -> bool:
        """Create the state table when it is missing; return whether it was created."""
        if self.exists():
            return False
        try:
            self.conn.execute(sql.SQL(CREATE_STATE_TABLE).format(table=self.identifier))
        except psycopg.errors.InsufficientPrivilege as err:
            schema = self.identifier.as_string(self.conn).rsplit(".", 1)[0]
            raise StateTableError(
                f"Role {self.conn.info.user!r} cannot create the state table {self.state_table!r}: run "
                f"GRANT CREATE ON SCHEMA {schema} TO {self.conn.info.user}; or set the state_table option "
                "to a table in a schema the role may create in."
            ) from err
        log.info("Created state table %s", self.state_table)
        return True

    def _regclass_name(self) -> str:
        return self.identifier.as_string(self.conn)

    def _has_column(self, column: str) -> bool:
        query = "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped)"
        return self.conn.execute(query, (self._regclass_name(), column)).fetchone()[0]

    # -- lock ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, export_name: str, wait: timedelta) -> Iterator[None]:
        """Hold the session-level advisory lock for ``export_name``, polling for up to ``wait``.

        Raises :class:`LockNotAcquired` when another session still has it.
        """
        key = f"airflow_audit_export:{export_name}"
        deadline = time.monotonic() + wait.total_seconds()
        while True:
            acquired = self.conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]
            if acquired:
                break
            if time.monotonic() >= deadline:
                holder = self.conn.execute(
                    """
                    SELECT l.pid FROM pg_locks l
                    WHERE l.locktype = 'advisory' AND l.granted
                      AND l.objid = (hashtextextended(%s, 0) & 4294967295)::oid
                    LIMIT 1
                    """,
                    (key,),
                ).fetchone()
                raise LockNotAcquired(
                    f"Export {export_name!r} is locked by another run (backend pid "
                    f"{holder[0] if holder else 'unknown'}) after waiting {wait.total_seconds():g}s."
                )
            time.sleep(0.2)
        try:
            yield
        finally:
            if not self.conn.closed:
                self.conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))

    # -- rows ----------------------------------------------------------------------------

    def load(self, export_name: str) -> ExportState | None:
        """Return the state row for ``export_name``, or ``None`` when the export was never anchored."""
        query = sql.SQL("SELECT {columns} FROM {table} WHERE export_name = %s").format(
            columns=sql.SQL(", ").join(map(sql.Identifier, STATE_COLUMNS)),
            table=self.identifier,
        )
        try:
            row = self.conn.execute(query, (export_name,)).fetchone()
        except psycopg.errors.UndefinedTable as err:
            raise StateTableError(
                f"State table {self.state_table!r} does not exist: run the anchor task first."
            ) from err
        except psycopg.errors.InsufficientPrivilege as err:
            raise StateTableError(
                f"Role {self.conn.info.user!r} cannot read {self.state_table!r}: run "
                f"GRANT SELECT, INSERT, UPDATE ON {self.state_table} TO {self.conn.info.user};"
            ) from err
        except psycopg.errors.UndefinedColumn as err:
            if not self._has_column("export_name"):
                raise StateTableError(
                    f"Table {self.state_table!r} is not an export state table (it has no export_name column): set "
                    "state_table (AUDIT_EXPORT_STATE_TABLE) to a table of its own, for example "
                    "'public.audit_export_state', which the anchor task creates."
                ) from err
            raise StateTableError(
                f"State table {self.state_table!r} was created by an older version and lacks a column "
                f"({err.diag.message_primary}). Run airflow_audit_export/sql/export_role.sql again as the "
                f"table's owner, or run: ALTER TABLE {self.state_table} ADD COLUMN IF NOT EXISTS lineage_token "
                "text, ADD COLUMN IF NOT EXISTS previous_lineage_token text;"
            ) from err
        if row is None:
            return None
        return ExportState(**dict(zip(STATE_COLUMNS, row)))

    def list_names(self) -> list[str]:
        """Return every export name stored in the state table."""
        query = sql.SQL("SELECT export_name FROM {table} ORDER BY export_name").format(table=self.identifier)
        return [row[0] for row in self.conn.execute(query).fetchall()]

    def insert(self, state: ExportState) -> bool:
        """Insert a fresh anchor; return ``False`` (and write nothing) when a row already exists."""
        values = dataclasses.asdict(state)
        values.pop("updated_at")
        columns = [c for c in STATE_COLUMNS if c != "updated_at"]
        query = sql.SQL("INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT (export_name) DO NOTHING").format(
            table=self.identifier,
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            values=sql.SQL(", ").join(sql.Placeholder(c) for c in columns),
        )
        cursor = self.conn.execute(query, _adapt_json(values))
        return cursor.rowcount == 1

    def update(self, export_name: str, *, new_cursor: int | None = None, **fields) -> None:
        """Update fields of one row; when ``new_cursor`` is given, only if it does not move the cursor back."""
        assignments = [sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in fields]
        assignments.append(sql.SQL("updated_at = clock_timestamp()"))
        params = _adapt_json(dict(fields))
        params["export_name"] = export_name
        condition = sql.SQL("export_name = %(export_name)s")
        if new_cursor is not None:
            assignments.append(sql.SQL("cursor_xid = %(new_cursor)s"))
            condition = sql.SQL("export_name = %(export_name)s AND cursor_xid <= %(new_cursor)s")
            params["new_cursor"] = new_cursor
        query = sql.SQL("UPDATE {table} SET {assignments} WHERE {condition}").format(
            table=self.identifier,
            assignments=sql.SQL(", ").join(assignments),
            condition=condition,
        )
        cursor = self.conn.execute(query, params)
        if cursor.rowcount == 1:
            return
        if new_cursor is not None:
            stored = self.load(export_name)
            if stored is not None:
                raise CursorRegressionError(
                    f"Refusing to move the cursor of export {export_name!r} back from {stored.cursor_xid} "
                    f"to {new_cursor}; nothing was written."
                )
        raise StateTableError(f"Export {export_name!r} has no state row in {self.state_table!r}: run the anchor task.")


def _adapt_json(values: dict) -> dict:
    """Wrap dict and list values for jsonb columns."""
    return {k: Jsonb(v) if isinstance(v, (dict, list)) else v for k, v in values.items()}
