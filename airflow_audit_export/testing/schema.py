"""Reference audit schema and synthetic row generators for tests and benchmarks.

The reference schema has a table ``audit_partitioned``, range-partitioned by
``"timestamp"`` into daily UTC partitions named ``audit_YYYYMMDD``, and a
legacy unpartitioned table ``audit`` with the same columns. Both tables take
their ids from the shared sequence ``audit_id_seq``.

Every function takes a psycopg 3 connection in autocommit mode.
"""

from __future__ import annotations

import logging
import time
from datetime import date, datetime, timedelta, timezone
from importlib import resources

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

ACTION_KINDS = ("create", "update", "delete", "execute")
"""Labels of the ``action_kind`` enum type, in declaration order."""

OPERATIONS = (
    "jobs.run",
    "jobs.create",
    "jobs.delete",
    "clusters.start",
    "clusters.resize",
    "tokens.create",
    "secrets.read",
    "workspace.login",
)
"""Operation names that generated rows cycle through."""

PARTITIONED_TABLE = "audit_partitioned"
LEGACY_TABLE = "audit"
SEQUENCE = "audit_id_seq"
USER_COUNT = 50
"""Number of distinct synthetic users (``user0`` to ``user49``)."""

# insert_rows places row g at fraction ((g * _HASH_MULTIPLIER + seed offset)
# mod _HASH_MODULUS) / _HASH_MODULUS of the time range. The modulus is prime,
# so the first _HASH_MODULUS rows get distinct fractions, and the multiplier is
# the modulus times the golden ratio minus 1, so even a few rows spread over
# the whole range.
_HASH_MODULUS = 1_000_003
_HASH_MULTIPLIER = 618_036
_SEED_MULTIPLIER = 104_729


def create_reference_schema(
    conn: psycopg.Connection,
    *,
    schema: str = "public",
    first_day: date,
    last_day: date,
    legacy: bool = True,
) -> None:
    """Create the reference audit schema with daily partitions from ``first_day`` to ``last_day``.

    Creates the schema, the ``action_kind`` enum type, the shared sequence, the
    partitioned table with its timestamp index, one partition per UTC day in
    the inclusive range, and the legacy table ``audit`` when ``legacy`` is
    true. Objects that already exist are kept, so calling it again only adds
    missing partitions.
    """
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))

        enum_exists = conn.execute(
            "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE n.nspname = %s AND t.typname = 'action_kind'",
            (schema,),
        ).fetchone()
        if not enum_exists:
            labels = sql.SQL(", ").join(sql.Literal(kind) for kind in ACTION_KINDS)
            conn.execute(
                sql.SQL("CREATE TYPE {} AS ENUM ({})").format(sql.Identifier(schema, "action_kind"), labels)
            )

        conn.execute(sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(sql.Identifier(schema, SEQUENCE)))

        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY (id, \"timestamp\")) "
                'PARTITION BY RANGE ("timestamp")'
            ).format(
                table=sql.Identifier(schema, PARTITIONED_TABLE),
                columns=_column_definitions(conn, schema, id_is_primary_key=False),
            )
        )
        conn.execute(
            sql.SQL('CREATE INDEX IF NOT EXISTS {index} ON {table} ("timestamp" DESC)').format(
                index=sql.Identifier(f"{PARTITIONED_TABLE}_timestamp_idx"),
                table=sql.Identifier(schema, PARTITIONED_TABLE),
            )
        )

        if legacy:
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {table} ({columns})").format(
                    table=sql.Identifier(schema, LEGACY_TABLE),
                    columns=_column_definitions(conn, schema, id_is_primary_key=True),
                )
            )
            conn.execute(
                sql.SQL('CREATE INDEX IF NOT EXISTS {index} ON {table} ("timestamp")').format(
                    index=sql.Identifier(f"{LEGACY_TABLE}_timestamp_idx"),
                    table=sql.Identifier(schema, LEGACY_TABLE),
                )
            )

    created = ensure_daily_partitions(conn, first_day, last_day, schema=schema)
    log.info(
        "Created reference audit schema %s with %s new daily partitions for %s to %s",
        schema, created, first_day, last_day,
    )  # fmt: skip


def _column_definitions(conn: psycopg.Connection, schema: str, *, id_is_primary_key: bool) -> sql.Composed:
    # nextval() takes the sequence name as text, so the quoted qualified name
    # goes in as a string literal.
    sequence_name = sql.Identifier(schema, SEQUENCE).as_string(conn)
    id_column = sql.SQL("id bigint NOT NULL DEFAULT nextval({}::regclass)").format(sql.Literal(sequence_name))
    if id_is_primary_key:
        id_column = sql.SQL("{} PRIMARY KEY").format(id_column)
    return sql.SQL(", ").join(
        [
            sql.SQL("workspace_id varchar(50) NOT NULL"),
            id_column,
            sql.SQL('"timestamp" timestamptz NOT NULL DEFAULT now()'),
            sql.SQL("username varchar(255) NOT NULL"),
            sql.SQL("operation varchar(50) NOT NULL"),
            sql.SQL("action_kind {} NOT NULL").format(sql.Identifier(schema, "action_kind")),
            sql.SQL("resource varchar(255)"),
            sql.SQL("parameters jsonb"),
            sql.SQL("email varchar(255)"),
            sql.SQL("span varchar(255)"),
        ]
    )


def partition_name(table: str, day: date) -> str:
    """Return the name of the daily partition of ``table`` for ``day``.

    Partitions of ``audit_partitioned`` are named ``audit_YYYYMMDD``, and
    partitions of any other table ``<table>_YYYYMMDD``.
    """
    prefix = LEGACY_TABLE if table == PARTITIONED_TABLE else table
    return f"{prefix}_{day:%Y%m%d}"


def ensure_daily_partitions(
    conn: psycopg.Connection,
    first_day: date,
    last_day: date,
    *,
    schema: str = "public",
    table: str = PARTITIONED_TABLE,
) -> int:
    """Create the missing daily partitions of ``table`` from ``first_day`` to ``last_day`` inclusive.

    Each partition covers one UTC day, from 00:00+00 to 00:00+00 of the next
    day, and is named by :func:`partition_name`. Returns how many partitions
    were created. The function locks the parent table for its transaction, so
    concurrent callers do not both create the same partition.

    :raises ValueError: if ``first_day`` is after ``last_day``.
    :raises psycopg.errors.DuplicateTable: if a relation with a partition's
        name exists but is not a partition of ``table``.
    """
    if first_day > last_day:
        raise ValueError(f"first_day {first_day} is after last_day {last_day}. Pass the earlier day first.")

    parent = sql.Identifier(schema, table)
    created = 0
    with conn.transaction():
        # SHARE ROW EXCLUSIVE conflicts with itself, which serializes
        # concurrent callers, but still lets other sessions read the table.
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(parent))
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            (parent.as_string(conn),),
        ).fetchall()
        existing = {row[0] for row in rows}

        day = first_day
        while day <= last_day:
            name = partition_name(table, day)
            if name not in existing:
                conn.execute(
                    sql.SQL("CREATE TABLE {partition} PARTITION OF {parent} FOR VALUES FROM ({lower}) TO ({upper})").format(
                        partition=sql.Identifier(schema, name),
                        parent=parent,
                        lower=sql.Literal(f"{day.isoformat()} 00:00+00"),
                        upper=sql.Literal(f"{(day + timedelta(days=1)).isoformat()} 00:00+00"),
                    )
                )
                created += 1
            day += timedelta(days=1)

    if created:
        log.info("Created %s daily partitions of %s.%s for %s to %s", created, schema, table, first_day, last_day)
    return created


def _row_values(
    schema: str, timestamp: sql.Composable | None, seed: sql.Composable, workspace: sql.Composable
) -> sql.Composed:
    """Build the SELECT list of one synthetic row for each ``g`` of ``generate_series``.

    The column order matches :func:`_column_list`. ``timestamp`` None leaves
    the timestamp column out, so the table default ``now()`` applies. The
    fragments escape ``%`` as ``%%`` because they run with query parameters.
    """
    user = sql.SQL("'user' || ((g + {seed}) %% {users})").format(seed=seed, users=sql.Literal(USER_COUNT))
    operations = sql.SQL("(ARRAY[{}]::text[])").format(sql.SQL(", ").join(sql.Literal(op) for op in OPERATIONS))
    kinds = sql.SQL("(ARRAY[{labels}]::{enum}[])").format(
        labels=sql.SQL(", ").join(sql.Literal(kind) for kind in ACTION_KINDS),
        enum=sql.Identifier(schema, "action_kind"),
    )
    values = [
        workspace,
        sql.SQL("{user}").format(user=user),
        sql.SQL("{ops}[1 + (g %% {n})]").format(ops=operations, n=sql.Literal(len(OPERATIONS))),
        sql.SQL("{kinds}[1 + (g %% {n})]").format(kinds=kinds, n=sql.Literal(len(ACTION_KINDS))),
        sql.SQL("'resources/' || g"),
        sql.SQL("jsonb_build_object('request_id', g, 'seed', {seed}, 'dry_run', g %% 2 = 0)").format(seed=seed),
        sql.SQL("{user} || '@example.com'").format(user=user),
        sql.SQL("'span-' || substr(md5(g::text || ':' || {seed}), 1, 16)").format(seed=seed),
    ]
    if timestamp is not None:
        values.append(timestamp)
    return sql.SQL(", ").join(values)


def _column_list(with_timestamp: bool) -> sql.Composed:
    names = ["workspace_id", "username", "operation", "action_kind", "resource", "parameters", "email", "span"]
    if with_timestamp:
        names.append("timestamp")
    return sql.SQL(", ").join(sql.Identifier(name) for name in names)


def _check_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} {value.isoformat()} has no time zone. Pass an aware datetime such as one in UTC.")


def insert_rows(
    conn: psycopg.Connection,
    count: int,
    *,
    schema: str = "public",
    table: str = PARTITIONED_TABLE,
    start: datetime | None = None,
    end: datetime | None = None,
    seed: int = 0,
    workspace: str = "demo",
) -> list[int]:
    """Insert ``count`` synthetic rows into ``table`` with one statement and return their ids.

    With ``start`` and ``end`` both None, the rows take the column default
    ``now()``, which is the same transaction start time for all of them.
    Otherwise each timestamp lies in ``[start, end)`` at an offset that depends
    only on ``seed`` and the row's position, so the same arguments give the
    same timestamps. The partitions for those timestamps must exist, or
    PostgreSQL raises ``psycopg.errors.CheckViolation`` ("no partition of
    relation found for row").

    :raises ValueError: if ``count`` is negative, only one of ``start`` and
        ``end`` is given, either is naive, or ``start`` is not before ``end``.
    """
    if count < 0:
        raise ValueError(f"count is {count}. Pass zero or a positive number of rows.")
    if (start is None) != (end is None):
        raise ValueError("Pass both start and end to spread timestamps, or neither to use now().")
    if count == 0:
        return []

    params: dict[str, object] = {"count": count, "seed": seed, "workspace": workspace}
    timestamp = None
    if start is not None and end is not None:
        _check_aware("start", start)
        _check_aware("end", end)
        if start >= end:
            raise ValueError(f"start {start.isoformat()} is not before end {end.isoformat()}.")
        params["start"] = start
        params["span_us"] = (end - start) // timedelta(microseconds=1)
        # Python's % is never negative, so a negative seed cannot move a row before start.
        params["seed_offset"] = (seed * _SEED_MULTIPLIER) % _HASH_MODULUS
        # The offset is floor(span * hash / modulus) with hash < modulus, so it
        # stays below the span. Microsecond intervals avoid day arithmetic, which
        # follows the session time zone and its daylight saving changes.
        timestamp = sql.SQL(
            "%(start)s::timestamptz + floor(%(span_us)s::numeric * ((g * {mult} + %(seed_offset)s::bigint) %% {mod}) "
            "/ {mod})::bigint * interval '1 microsecond'"
        ).format(mult=sql.Literal(_HASH_MULTIPLIER), mod=sql.Literal(_HASH_MODULUS))

    query = sql.SQL(
        "INSERT INTO {table} ({columns}) SELECT {values} FROM generate_series(1, %(count)s) AS g RETURNING id"
    ).format(
        table=sql.Identifier(schema, table),
        columns=_column_list(timestamp is not None),
        values=_row_values(schema, timestamp, sql.SQL("%(seed)s::bigint"), sql.SQL("%(workspace)s::text")),
    )
    ids = [row[0] for row in conn.execute(query, params).fetchall()]
    log.debug("Inserted %s rows into %s.%s", len(ids), schema, table)
    return ids


def generate_history(
    conn: psycopg.Connection,
    rows: int,
    *,
    days: int,
    end: datetime,
    schema: str = "public",
    table: str = PARTITIONED_TABLE,
    legacy_rows: int = 0,
    batch: int = 100_000,
) -> None:
    """Fill ``table`` with a backlog of ``rows`` synthetic rows over the ``days`` days before ``end``.

    Timestamps are evenly spaced over ``[end - days, end)`` in id order, so
    ids grow with time. The ``legacy_rows`` rows go to the legacy table
    ``audit`` first, evenly spaced over the ``days`` days before that range,
    so they are older and have lower ids. Missing partitions are created
    first. Each batch of ``batch`` rows is one ``INSERT ... SELECT`` that
    commits on its own, and both tables are analyzed at the end.

    :raises ValueError: if a count is negative, ``days`` or ``batch`` is below
        1, or ``end`` is naive.
    :raises RuntimeError: if ``legacy_rows`` is positive and the legacy table
        does not exist.
    """
    if rows < 0 or legacy_rows < 0:
        raise ValueError(f"rows is {rows} and legacy_rows is {legacy_rows}, but both must be zero or positive.")
    if days < 1:
        raise ValueError(f"days is {days}. Pass at least 1.")
    if batch < 1:
        raise ValueError(f"batch is {batch}. Pass at least 1.")
    _check_aware("end", end)

    start = end - timedelta(days=days)
    last_instant = (end - timedelta(microseconds=1)).astimezone(timezone.utc)
    ensure_daily_partitions(conn, start.astimezone(timezone.utc).date(), last_instant.date(), schema=schema, table=table)

    if legacy_rows:
        legacy = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, LEGACY_TABLE).as_string(conn),))
        if legacy.fetchone()[0] is None:
            raise RuntimeError(
                f"legacy_rows is {legacy_rows}, but table {schema}.{LEGACY_TABLE} does not exist. "
                "Call create_reference_schema(..., legacy=True) first."
            )
        _insert_evenly(conn, schema, LEGACY_TABLE, legacy_rows, start - timedelta(days=days), start, batch)
    _insert_evenly(conn, schema, table, rows, start, end, batch)

    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)))
    if legacy_rows:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, LEGACY_TABLE)))


def _insert_evenly(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    rows: int,
    start: datetime,
    end: datetime,
    batch: int,
) -> None:
    if rows == 0:
        return
    began = time.monotonic()
    span_us = (end - start) // timedelta(microseconds=1)
    timestamp = sql.SQL(
        "%(start)s::timestamptz + floor((g - 1)::numeric * %(span_us)s::bigint / %(rows)s)::bigint * interval '1 microsecond'"
    )
    query = sql.SQL(
        "INSERT INTO {table} ({columns}) SELECT {values} FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g"
    ).format(
        table=sql.Identifier(schema, table),
        columns=_column_list(True),
        values=_row_values(schema, timestamp, sql.Literal(0), sql.Literal("demo")),
    )

    for first in range(1, rows + 1, batch):
        last = min(first + batch - 1, rows)
        params = {"start": start, "span_us": span_us, "rows": rows, "first": first, "last": last}
        conn.execute(query, params)
        log.info("Inserted rows %s to %s of %s into %s.%s", first, last, rows, schema, table)

    log.info("Inserted %s rows into %s.%s in %.1f s", rows, schema, table, time.monotonic() - began)


#: Login role that ``airflow_audit_export/sql/export_role.sql`` creates.
EXPORT_ROLE = "audit_exporter"


def apply_export_role(conn: psycopg.Connection) -> str:
    """Run the shipped least-privilege script in the connected database and return the role name.

    The script grants on the reference schema's table names, so create that
    schema first.
    """
    script = resources.files("airflow_audit_export").joinpath("sql/export_role.sql").read_text(encoding="utf-8")
    conn.execute(script)
    return EXPORT_ROLE
