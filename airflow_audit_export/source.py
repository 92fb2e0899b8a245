"""Connections to the source database and validation of the source table against its catalog."""

from __future__ import annotations

import dataclasses
import logging

import psycopg
from psycopg import sql

from airflow_audit_export.settings import ExportSettings, split_qualified_name

log = logging.getLogger(__name__)

#: Id column types whose order is total and stable, so they can serve as the keyset tie-breaker.
ID_TYPES = ("bigint", "integer", "smallint", "uuid", "text", "character varying", "numeric")

#: Relation kinds whose unique indexes the catalog lists. Views and foreign tables have none to check.
INDEXED_KINDS = ("r", "p", "m")

#: The setting that names each kind of table, for messages that tell which setting to fix.
TABLE_SETTINGS = {
    "table": "AUDIT_EXPORT_TABLE or the operator's table argument",
    "legacy_table": "AUDIT_EXPORT_LEGACY_TABLE or the operator's legacy_table argument",
}


class SourceTableError(ValueError):
    """The configured source table, or one of its columns, cannot be exported as configured."""


@dataclasses.dataclass(frozen=True)
class SourceTable:
    """A source table checked against the catalog: quoted identifiers and the id column's type."""

    schema: str
    name: str
    timestamp_column: str
    id_column: str
    id_type: str
    columns: tuple[str, ...]
    partitioned: bool

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


def open_connection(postgres_conn_id: str) -> psycopg.Connection:
    """Open an autocommit psycopg 3 connection through the Airflow postgres provider.

    Server-side prepared statements are disabled (``prepare_threshold = None``) and
    ``plan_cache_mode`` is forced to custom plans: a generic plan on a partitioned
    table prunes partitions only at run time, and planning every partition can
    alone exceed a one-second ``statement_timeout``.
    """
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=postgres_conn_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        conn.close()
        raise RuntimeError(
            f"Connection {postgres_conn_id!r} opened a {type(conn).__module__} connection, but psycopg 3 is "
            "required: install 'psycopg[binary]>=3.2' alongside SQLAlchemy 2 so the postgres provider uses it."
        )
    configure_connection(conn)
    return conn


def configure_connection(conn: psycopg.Connection) -> None:
    """Put a connection in the mode every exporter statement expects.

    The session settings that change how ``row_to_json`` writes values are
    pinned, so the same rows give the same bytes whatever the role's or the
    database's defaults. Timestamps are written in UTC, intervals in the
    default style, and floats in their shortest exact form.
    """
    conn.autocommit = True
    conn.prepare_threshold = None
    conn.execute("SET plan_cache_mode = force_custom_plan")
    conn.execute("SET application_name = 'airflow-audit-export'")
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute("SET IntervalStyle = 'postgres'")
    conn.execute("SET extra_float_digits = 1")


def describe_table(
    conn: psycopg.Connection,
    qualified_name: str,
    *,
    timestamp_column: str,
    id_column: str,
    columns: tuple[str, ...] | None,
    what: str = "table",
) -> SourceTable:
    """Check a source table in the catalog and return its description.

    Raises :class:`SourceTableError` when the table is missing or unreadable, when the
    timestamp column is not a ``NOT NULL timestamptz``, when the id column has a type
    without a stable order, is nullable or is not unique together with the timestamp,
    or when a configured column does not exist.
    """
    schema, name = split_qualified_name(qualified_name, what=what)
    setting = TABLE_SETTINGS.get(what, f"the {what} setting")
    row = conn.execute(
        """
        SELECT c.oid, c.relkind
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        """,
        (schema, name),
    ).fetchone()
    if row is None:
        raise SourceTableError(
            f"Source {what} {qualified_name!r} was not found: check the schema and table name ({setting})."
        )
    oid, relkind = row

    privilege = conn.execute("SELECT has_table_privilege(%s::oid, 'SELECT')", (oid,)).fetchone()[0]
    if not privilege:
        raise SourceTableError(
            f"The role {conn.info.user!r} cannot read {qualified_name!r}: run "
            f"GRANT SELECT ON {schema}.{name} TO {conn.info.user};"
        )

    rows = conn.execute(
        """
        SELECT attname, format_type(atttypid, atttypmod), attnum, attnotnull
        FROM pg_attribute
        WHERE attrelid = %s::oid AND attnum > 0 AND NOT attisdropped
        ORDER BY attnum
        """,
        (oid,),
    ).fetchall()
    attributes = {column: column_type for column, column_type, _, _ in rows}
    numbers = {column: number for column, _, number, _ in rows}
    not_null = {column: flag for column, _, _, flag in rows}
    quoted_table = sql.Identifier(schema, name).as_string(conn)

    timestamp_type = attributes.get(timestamp_column)
    if timestamp_type is None:
        raise SourceTableError(
            f"Timestamp column {timestamp_column!r} was not found in {qualified_name!r}; its columns are: "
            f"{', '.join(attributes)}. Set timestamp_column (AUDIT_EXPORT_TIMESTAMP_COLUMN) to one of them."
        )
    if timestamp_type != "timestamp with time zone":
        raise SourceTableError(
            f"Timestamp column {timestamp_column!r} of {qualified_name!r} has type {timestamp_type!r}, "
            "but timestamptz is required so that every bound compares in UTC: set timestamp_column "
            f"(AUDIT_EXPORT_TIMESTAMP_COLUMN) to a timestamptz column, or convert this one with ALTER TABLE "
            f"{quoted_table} ALTER COLUMN {sql.Identifier(timestamp_column).as_string(conn)} TYPE timestamptz."
        )

    id_type = attributes.get(id_column)
    if id_type is None:
        raise SourceTableError(
            f"Id column {id_column!r} was not found in {qualified_name!r}; its columns are: {', '.join(attributes)}. "
            "Set id_column (AUDIT_EXPORT_ID_COLUMN) to its unique id column."
        )
    if id_type.split("(")[0] not in ID_TYPES:
        raise SourceTableError(
            f"Id column {id_column!r} of {qualified_name!r} has type {id_type!r}; "
            f"expected one of: {', '.join(ID_TYPES)}. Set id_column (AUDIT_EXPORT_ID_COLUMN) to such a column."
        )
    # Rows are read in keyset pages after the last (timestamp, id). A NULL in either
    # column, or two rows with the same pair, would fall between two pages and be skipped.
    for what_column, column in (("timestamp column", timestamp_column), ("id column", id_column)):
        if relkind in INDEXED_KINDS and not not_null[column]:
            raise SourceTableError(
                f"The {what_column} {column!r} of {qualified_name!r} allows NULL, and rows with a NULL there "
                f"would never be exported: run ALTER TABLE {quoted_table} ALTER COLUMN "
                f"{sql.Identifier(column).as_string(conn)} SET NOT NULL."
            )
    _check_unique_key(conn, oid, relkind, qualified_name, quoted_table, timestamp_column, id_column, numbers)

    if columns is None:
        exported = tuple(attributes)
    else:
        missing = [c for c in columns if c not in attributes]
        if missing:
            if what == "legacy_table":
                fix = (
                    "A legacy table needs every exported column of the main table: add them, or set columns to "
                    "those both tables have."
                )
            else:
                fix = "Remove them from the columns argument, or leave it empty to export every column."
            raise SourceTableError(
                f"Columns {', '.join(map(repr, missing))} were not found in {qualified_name!r}; "
                f"its columns are: {', '.join(attributes)}. {fix}"
            )
        exported = tuple(columns)

    return SourceTable(
        schema=schema,
        name=name,
        timestamp_column=timestamp_column,
        id_column=id_column,
        id_type=id_type,
        columns=exported,
        partitioned=relkind == "p",
    )


def _check_unique_key(
    conn: psycopg.Connection,
    oid: int,
    relkind: str,
    qualified_name: str,
    quoted_table: str,
    timestamp_column: str,
    id_column: str,
    numbers: dict[str, int],
) -> None:
    """Raise :class:`SourceTableError` unless a unique index makes ``(timestamp, id)`` unique.

    A unique, non-partial index on plain columns, all of them among the timestamp
    and the id, proves it: a primary key on ``id``, or on ``(id, timestamp)`` as a
    partitioned table needs. Views and foreign tables have no index to check, so
    they are accepted with a warning.
    """
    if relkind not in INDEXED_KINDS:
        log.warning(
            "Cannot check that %s is unique in %s, which is a view or a foreign table. Rows that share a "
            "timestamp and an id can be skipped",
            id_column,
            qualified_name,
        )
        return
    unique = conn.execute(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_index i
            WHERE i.indrelid = %(oid)s::oid AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
              AND (
                  SELECT array_agg(key.attnum)
                  FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS key(attnum, position)
                  WHERE key.position <= i.indnkeyatts
              ) <@ ARRAY[%(timestamp)s, %(id)s]::int2[]
        )
        """,
        {"oid": oid, "timestamp": numbers[timestamp_column], "id": numbers[id_column]},
    ).fetchone()[0]
    if not unique:
        key = sql.SQL(", ").join([sql.Identifier(id_column), sql.Identifier(timestamp_column)]).as_string(conn)
        raise SourceTableError(
            f"Id column {id_column!r} of {qualified_name!r} is not proven unique: no unique index covers only "
            f"{id_column!r} and {timestamp_column!r}, and rows that share a timestamp and an id would be skipped. "
            "Set id_column (AUDIT_EXPORT_ID_COLUMN) to the table's unique id, or add a key, for example "
            f"ALTER TABLE {quoted_table} ADD PRIMARY KEY ({key})."
        )


def describe_source(conn: psycopg.Connection, settings: ExportSettings) -> SourceTable:
    """Describe the export's main source table."""
    return describe_table(
        conn,
        settings.table,
        timestamp_column=settings.timestamp_column,
        id_column=settings.id_column,
        columns=settings.columns,
    )


def describe_backfill_sources(conn: psycopg.Connection, settings: ExportSettings) -> list[tuple[str, SourceTable]]:
    """Describe the main table and, when configured, the legacy table, which must have the main table's columns.

    Returns ``(source, table)`` pairs, where ``source`` is ``main`` or ``legacy`` as in backfill object keys.
    """
    main = describe_source(conn, settings)
    tables = [("main", main)]
    if settings.legacy_table:
        legacy = describe_table(
            conn,
            settings.legacy_table,
            timestamp_column=settings.timestamp_column,
            id_column=settings.id_column,
            columns=main.columns,
            what="legacy_table",
        )
        tables.append(("legacy", legacy))
    return tables
