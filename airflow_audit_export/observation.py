"""Observations: a timestamp floor read from ``pg_stat_activity``, then a snapshot.

The invariant every export relies on: for an observation whose activity read gave
``floor`` and whose later snapshot gave ``xmax``, every transaction with an xid
``>= xmax`` started at or after ``floor``. A snapshot's ``xmax`` is the latest
completed xid plus one, so such a transaction either received its xid after the
snapshot or was still running at the snapshot. If it started before the
activity read, it was open during that read and its ``xact_start`` was counted.
Otherwise it started after the read, so after ``floor``. Reading the snapshot
first breaks the claim, because a transaction can take an xid and commit
between the two reads.

Prepared (two-phase) transactions are the exception: they leave
``pg_stat_activity`` at ``PREPARE TRANSACTION`` but keep running, possibly with
an xid at or above ``xmax``. They are read between the activity read and the
snapshot, and the observation's ``xmax`` is raised above the newest of them.

A floor taken as "the oldest open transaction at snapshot time" and applied to
the snapshot's ``xmin`` is not safe. Xids are assigned at a transaction's first
write, so an old transaction that only read so far gets a larger xid than a
newer transaction that already wrote.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

import psycopg

log = logging.getLogger(__name__)

STATS_GRANT_HINT = "GRANT pg_read_all_stats TO {role};"

ACTIVITY_QUERY = """
WITH a AS (
    SELECT pid, usename, state, xact_start, backend_xid, backend_xmin
    FROM pg_stat_activity
    WHERE datname = current_database()
      AND pid <> pg_backend_pid()
      AND backend_type IS DISTINCT FROM 'autovacuum worker'
)
SELECT
    clock_timestamp() AS read_at,
    min(a.xact_start) AS oldest_xact_start,
    count(*) FILTER (
        WHERE a.xact_start IS NULL AND (a.backend_xid IS NOT NULL OR a.backend_xmin IS NOT NULL)
    ) AS backends_without_start,
    count(*) FILTER (WHERE a.state = 'disabled') AS backends_untracked,
    pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS can_read_stats,
    (
        SELECT json_build_object('pid', o.pid, 'user', o.usename, 'state', o.state, 'xact_start', o.xact_start)
        FROM a AS o
        WHERE o.xact_start IS NOT NULL
        ORDER BY o.xact_start
        LIMIT 1
    ) AS oldest_transaction
FROM a
"""

SNAPSHOT_QUERY = """
SELECT
    pg_snapshot_xmin(s)::text::bigint AS xmin,
    pg_snapshot_xmax(s)::text::bigint AS xmax,
    clock_timestamp() AS taken_at
FROM pg_current_snapshot() AS s
"""

PREPARED_QUERY = """
SELECT gid, prepared, owner, transaction::text::bigint
FROM pg_prepared_xacts
WHERE database = current_database()
ORDER BY prepared
"""

ASSIGN_XID_QUERY = "SELECT pg_current_xact_id()::text::bigint"


@dataclasses.dataclass(frozen=True)
class PreparedTransaction:
    """A two-phase transaction prepared in the source database and not yet committed or rolled back."""

    gid: str
    prepared: datetime
    owner: str
    xid32: int


@dataclasses.dataclass(frozen=True)
class Observation:
    """One activity read, a read of prepared transactions, then one snapshot.

    ``floor`` is already reduced by the margin. ``xmax`` is the snapshot's
    ``xmax``, raised above every prepared transaction's xid, and ``floor`` is
    safe for every xid ``>= xmax``. It is also safe for every xid ``>= xmin``
    when ``prepared`` is empty, because each transaction running at snapshot
    time was either open and visible during the activity read or started after
    it. Prepared transactions no longer appear in ``pg_stat_activity``, so they
    are the exception.
    """

    floor: datetime
    trusted: bool
    untrusted_reason: str | None
    xmin: int
    xmax: int
    taken_at: datetime
    prepared: tuple[PreparedTransaction, ...]
    oldest_transaction: dict | None = None

    def oldest_transaction_start(self) -> datetime | None:
        """Return the ``xact_start`` of the oldest open transaction, or ``None`` when none is open."""
        if not self.oldest_transaction:
            return None
        return datetime.fromisoformat(self.oldest_transaction["xact_start"])

    def describe_oldest_transaction(self) -> str | None:
        """Describe the oldest open transaction for log lines and messages, without its query text."""
        oldest = self.oldest_transaction
        if not oldest:
            return None
        return (
            f"backend pid {oldest['pid']} (user {oldest['user']}, {oldest['state']}) "
            f"open since {oldest['xact_start']}"
        )

    def to_history_entry(self) -> dict:
        """Serialize the parts the floor history keeps."""
        return {
            "xmax": self.xmax,
            "floor": self.floor.isoformat(),
            "trusted": self.trusted,
            "taken_at": self.taken_at.isoformat(),
        }


def take_observation(
    conn: psycopg.Connection,
    *,
    floor_margin: timedelta,
    fallback_window: timedelta,
) -> Observation:
    """Read ``pg_stat_activity``, then ``pg_prepared_xacts``, then ``pg_current_snapshot()``.

    Each read is its own autocommit statement, in that order: a transaction
    prepared before the activity read is in the prepared list, and one prepared
    later was still visible in ``pg_stat_activity`` during the activity read.

    The floor is untrusted, and falls back to ``now - fallback_window``, when the
    role cannot see other roles' ``xact_start`` (no ``pg_read_all_stats``), or when
    a backend has an xid or xmin without publishing ``xact_start``, or when a
    backend runs with ``track_activities`` off.
    """
    if not conn.autocommit:
        raise RuntimeError("take_observation needs an autocommit connection: the two reads must be two transactions.")

    activity = conn.execute(ACTIVITY_QUERY).fetchone()
    read_at, oldest_xact_start, without_start, untracked, can_read_stats, oldest_transaction = activity

    prepared = tuple(PreparedTransaction(*row) for row in conn.execute(PREPARED_QUERY).fetchall())
    # Rows a prepared transaction wrote inside a savepoint carry subtransaction xids, which
    # pg_prepared_xacts does not list and which can lie above the snapshot's xmax. An xid
    # assigned after the prepared list was read is above every one of them.
    assigned_xid = conn.execute(ASSIGN_XID_QUERY).fetchone()[0] if prepared else None
    snapshot_xmin, snapshot_xmax, taken_at = conn.execute(SNAPSHOT_QUERY).fetchone()
    prepared_xids = [widen_xid(p.xid32, snapshot_xmax) for p in prepared]
    xmax = max([snapshot_xmax, *(xid + 1 for xid in prepared_xids), *([assigned_xid] if prepared else [])])

    reason = None
    if not can_read_stats:
        reason = (
            f"role {conn.info.user!r} cannot see other sessions' xact_start in pg_stat_activity; "
            f"fix: {STATS_GRANT_HINT.format(role=conn.info.user)}"
        )
    elif without_start:
        reason = f"{without_start} backend(s) hold an xid or xmin but publish no xact_start"
    elif untracked:
        reason = f"{untracked} backend(s) run with track_activities off, so their xact_start is hidden"

    if reason is None:
        floor = min(read_at, oldest_xact_start) if oldest_xact_start is not None else read_at
    else:
        floor = read_at - fallback_window

    return Observation(
        floor=floor - floor_margin,
        trusted=reason is None,
        untrusted_reason=reason,
        xmin=snapshot_xmin,
        xmax=xmax,
        taken_at=taken_at,
        prepared=prepared,
        oldest_transaction=oldest_transaction,
    )


def widen_xid(xid32: int, reference: int) -> int:
    """Return the 64-bit xid nearest to ``reference`` whose low 32 bits are ``xid32``.

    Live xids lie within 2**31 of the current xid, which wraparound protection
    guarantees, so the nearest candidate is the right one.
    """
    modulus = 1 << 32
    offset = (xid32 - reference) % modulus
    if offset >= modulus // 2:
        offset -= modulus
    return reference + offset


def anchor_floor(observation: Observation, *, fallback_window: timedelta, floor_margin: timedelta) -> tuple[datetime, str | None]:
    """Return the floor that covers every xid ``>= observation.xmin`` and why it fell back, if it did.

    Prepared transactions are open at the snapshot but absent from
    ``pg_stat_activity``, and their start time is unknown, so any of them forces
    the fallback window.
    """
    if observation.prepared:
        gids = ", ".join(p.gid for p in observation.prepared)
        reason = f"prepared transactions are open ({gids}), and their start time is unknown"
        return observation.taken_at - fallback_window - floor_margin, reason
    if not observation.trusted:
        return observation.floor, observation.untrusted_reason
    return observation.floor, None


def read_system_identifier(conn: psycopg.Connection) -> str | None:
    """Return the cluster's ``system_identifier``, or ``None`` when the role may not read it."""
    try:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        log.warning(
            "Role %s may not call pg_control_system(), so a restored or cloned database is detected only by "
            "its xid going backwards; fix: GRANT EXECUTE ON FUNCTION pg_control_system() TO %s;",
            conn.info.user,
            conn.info.user,
        )
        return None
    return row[0]
