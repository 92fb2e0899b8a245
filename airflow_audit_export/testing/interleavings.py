"""Seeded random interleavings of writer transactions and export actions, checked for lost rows.

A seed generates a history, which is a list of operations. Many writer
transactions run at the same time: late writers, long-open transactions,
savepoints, aborts, two-phase commits, and rows stamped near a UTC midnight or
slightly in the past. Between their steps come export actions: steady-state
runs with small pages, caps and crashes, anchor runs, forced re-anchors, gap
backfills and backfills of settled windows.

One thread executes the history on a fresh database, with one psycopg
connection per open writer transaction, so the server receives the statements
in exactly the generated order. Some writer operations run inside an export run,
from its progress callback, between the run's steps.

After the history, every transaction still open or prepared is rolled back,
export runs continue until the cursor passes every finished transaction, and
every recorded gap is backfilled. The checks in :data:`CHECKS` then compare
the destination with the rows the writers committed. A failing history is
shrunk by delta debugging: operations are removed as long as the shorter
history, run again on a fresh database, still fails the same check.

Run many seeds from the command line::

    python -m airflow_audit_export.testing.interleavings --count 1000 --seed-start 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TextIO

import psycopg
from psycopg import sql

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.backfilling import export_range, write_manifest
from airflow_audit_export.exporting import run_export
from airflow_audit_export.gaps import find_gap, gap_window, mark_gap_backfill
from airflow_audit_export.ranges import plan_ranges
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.source import configure_connection, describe_source
from airflow_audit_export.state import StateStore
from airflow_audit_export.testing.objects import decode_rows, read_local_objects
from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.schema import (
    EXPORT_ROLE,
    apply_export_role,
    create_reference_schema,
    insert_rows,
)
from airflow_audit_export.window import Window, WindowError, check_window_settled, parse_window
from airflow_audit_export.writing import LocalDestination, parse_destination

log = logging.getLogger(__name__)

UTC = timezone.utc
EXPORT_NAME = "audit"
SOURCE_TABLE = "public.audit_partitioned"
STATE_TABLE = "public.audit_export_state"
SECONDS_PER_DAY = 86_400.0

#: Checks run after quiescence, in the order reports list them.
CHECKS = (
    "lost rows",
    "duplicated steady-state rows",
    "cursor regressions",
    "gaps not backfilled",
    "aborted rows exported",
    "rows missing from settled backfills",
    "export errors",
)

#: Operation kinds of writer transactions.
WRITER_KINDS = (
    "begin",
    "read",
    "insert",
    "savepoint",
    "rollback_to",
    "release",
    "commit",
    "rollback",
    "prepare",
    "commit_prepared",
    "rollback_prepared",
)

#: Operation kinds of the exporter, and the pause that lets real time pass.
EXPORT_KINDS = ("anchor", "reanchor", "export", "backfill_gaps", "backfill_settled", "pause")

#: Steady-state keys contain the run's xid range. Backfill keys contain the window and the first id.
STEADY_STATE_KEY = re.compile(r"_xmin_")
BACKFILL_KEY = re.compile(r"_backfill_(\d{8}T\d{6}\.\d{6}Z-\d{8}T\d{6}\.\d{6}Z)_(main|legacy)_")

#: Days of partitions before today in the template database. Settled-window backfills reach 3 days back.
PARTITION_DAYS_BEFORE = 8
PARTITION_DAYS_AFTER = 3


class SimulatorError(RuntimeError):
    """The simulator failed: a writer statement raised, or its bookkeeping disagrees with the database."""


class SimulatedCrash(Exception):
    """Raised from an export run's progress callback to stop the run there, as a crashed worker would."""


# -- operations and histories ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a history.

    ``tx`` names the writer transaction of a writer operation. ``args`` contains
    the kind's parameters as ``(name, value)`` pairs. ``during`` is set on a
    writer operation that runs inside the export run before it, at that run's
    progress event number ``during`` (0 is the event right after planning).
    When the run reports fewer events, the operation runs after the run
    returns. When no export run precedes it, it runs in its place.
    """

    kind: str
    tx: str | None = None
    args: tuple[tuple[str, object], ...] = ()
    during: int | None = None

    def arg(self, name: str, default=None):
        """Return the value of parameter ``name``, or ``default`` when the operation has none."""
        for key, value in self.args:
            if key == name:
                return value
        return default

    def describe(self) -> str:
        """Describe the operation in one line for failure reports."""
        kind, tx = self.kind, self.tx
        savepoint = self.arg("name")

        writer_lines = {
            "begin": f"{tx} BEGIN; SELECT now() (the transaction has started, so its now() is fixed)",
            "read": f"{tx} SELECT count(*) FROM audit_partitioned (a read, no xid yet)",
            "savepoint": f"{tx} SAVEPOINT {savepoint}",
            "rollback_to": f"{tx} ROLLBACK TO SAVEPOINT {savepoint}",
            "release": f"{tx} RELEASE SAVEPOINT {savepoint}",
            "commit": f"{tx} COMMIT",
            "rollback": f"{tx} ROLLBACK",
            "prepare": f"{tx} PREPARE TRANSACTION",
            "commit_prepared": f"COMMIT PREPARED {tx}",
            "rollback_prepared": f"ROLLBACK PREPARED {tx}",
        }
        if kind in writer_lines:
            return writer_lines[kind]

        if kind == "insert":
            return f"{tx} INSERT {self.arg('count')} rows {self._describe_stamps()}"
        if kind == "export":
            return self._describe_export()
        if kind == "anchor":
            return "anchor_export(force=False), the anchor task of a scheduled run"
        if kind == "reanchor":
            return "anchor_export(force=True), a forced re-anchor that records a gap"
        if kind == "backfill_gaps":
            return f"backfill every recorded gap not backfilled yet (max_ranges={self.arg('max_ranges')})"
        if kind == "backfill_settled":
            return (
                f"backfill the settled window [to - {format_seconds(self.arg('length'))}, to) with "
                f"to = largest allowed to - {self.arg('back')}s (max_ranges={self.arg('max_ranges')})"
            )
        if kind == "pause":
            return f"sleep {self.arg('milliseconds')} ms"
        return f"{kind} {tx or ''} {dict(self.args)}"

    def _describe_stamps(self) -> str:
        stamp = self.arg("stamp")
        offsets = ", ".join(f"{offset:+.3f}s" for offset in self.arg("offsets"))
        if stamp == "now":
            return "stamped now() (the column default, the transaction start)"
        if stamp == "past":
            return f"stamped now() minus {offsets.replace('+', '')} (within floor_margin)"
        if stamp == "next_midnight":
            return f"stamped at the first UTC midnight more than an hour ahead, {offsets}"
        if stamp == "last_midnight":
            return f"stamped at today's UTC midnight, {offsets}"
        return f"stamped {stamp} {offsets}"

    def _describe_export(self) -> str:
        caps = [f"{name}={self.arg(name)}" for name in ("page_rows", "rows_per_object")]
        for name in ("max_rows_per_run", "max_xid_interval"):
            if self.arg(name) is not None:
                caps.append(f"{name}={self.arg(name)}")
        crash = ""
        if self.arg("crash_at") is not None:
            crash = f", crashing at its progress event {self.arg('crash_at')} (the exporter then reconnects)"
        return f"run_export({', '.join(caps)}){crash}"


def format_seconds(seconds: float) -> str:
    if seconds >= SECONDS_PER_DAY:
        return f"{seconds / SECONDS_PER_DAY:g} days"
    return f"{seconds:g}s"


@dataclasses.dataclass(frozen=True)
class History:
    """A history: its seed, the export settings it runs with, and its operations in execution order."""

    seed: int
    floor_margin: float
    max_backlog: float
    ops: tuple[Op, ...]

    def with_ops(self, ops: Sequence[Op]) -> History:
        return dataclasses.replace(self, ops=tuple(ops))

    def describe(self, executed: Sequence[bool] | None = None) -> str:
        """Number and describe every operation, marking those that an execution skipped as no-ops."""
        lines = [
            f"seed {self.seed}: floor_margin {self.floor_margin}s, max_backlog {format_seconds(self.max_backlog)}, "
            f"{len(self.ops)} operations"
        ]
        inside_run = False
        for index, op in enumerate(self.ops):
            prefix = f"{index + 1:4d}. "
            if op.during is not None and inside_run:
                prefix += f"    inside that run, at progress event {op.during}: "
            else:
                inside_run = op.kind == "export"
            suffix = ""
            if executed is not None and not executed[index]:
                suffix = "  [skipped: the transaction is not in that state]"
            lines.append(prefix + op.describe() + suffix)
        return "\n".join(lines)


# -- generation ------------------------------------------------------------------------------

#: Writer behaviours and their weights. Each generated transaction follows one.
BEHAVIOURS = {
    "quick": 3,
    "late_writer": 3,
    "long_open": 2,
    "savepoints": 2,
    "abort": 1,
    "two_phase": 3,
    "midnight_burst": 1,
    "past_stamps": 1,
}

#: Export actions (and pauses) and their weights.
EXPORT_ACTIONS = {
    "export": 60,
    "anchor": 10,
    "reanchor": 7,
    "backfill_gaps": 7,
    "backfill_settled": 7,
    "pause": 6,
}

#: Default maximum number of writer transactions in a generated history.
DEFAULT_SIZE = 8


def generate_history(seed: int, size: int = DEFAULT_SIZE) -> History:
    """Generate the history of ``seed`` with at most ``size`` writer transactions after the anchor.

    Each transaction follows a behaviour from :data:`BEHAVIOURS`, with its
    steps spread over its own span of a virtual timeline. Export actions from
    :data:`EXPORT_ACTIONS` fall at random times on the same timeline, after the
    anchor that creates the state row. Transactions can start before that
    anchor and stay open or prepared across it, and up to two history
    transactions commit rows stamped around today's UTC midnight before it.
    """
    rng = random.Random(seed)
    floor_margin = rng.choice([0.0, 0.0, 0.02, 0.25])
    max_backlog = rng.choice([SECONDS_PER_DAY, SECONDS_PER_DAY, SECONDS_PER_DAY, 0.1])
    timeline = 100.0
    anchor_at = rng.uniform(3.0, 15.0)

    timed: list[tuple[float, Op]] = [(anchor_at, Op("anchor"))]
    for number in range(rng.randint(0, 2)):
        start = rng.uniform(0.0, anchor_at * 0.6)
        steps = _history_writer(rng, f"H{number + 1}")
        timed += _place(steps, start, rng.uniform(0.1, anchor_at - start - 0.1))

    for number in range(1, rng.randint(max(3, size // 2), size) + 1):
        behaviour = rng.choices(list(BEHAVIOURS), weights=list(BEHAVIOURS.values()))[0]
        if behaviour == "past_stamps" and floor_margin == 0:
            behaviour = "quick"
        steps, duration = _writer_steps(rng, behaviour, f"T{number}", floor_margin)
        timed += _place(steps, rng.uniform(0.0, timeline), duration)

    for _ in range(rng.randint(size, 2 * size)):
        action = rng.choices(list(EXPORT_ACTIONS), weights=list(EXPORT_ACTIONS.values()))[0]
        timed.append((rng.uniform(anchor_at + 0.01, timeline + 20.0), _export_action(rng, action)))

    # The sort is stable, and each transaction's steps have nondecreasing times, so their order holds.
    timed.sort(key=lambda pair: pair[0])
    ops = _move_into_runs(rng, [op for _, op in timed])
    return History(seed=seed, floor_margin=floor_margin, max_backlog=max_backlog, ops=tuple(ops))


def _place(steps: list[tuple[float, Op]], start: float, duration: float) -> list[tuple[float, Op]]:
    """Turn steps at fractions of a transaction's duration into times on the timeline."""
    return [(start + fraction * duration, op) for fraction, op in steps]


def _spread(ops: list[Op], until: float = 1.0) -> list[tuple[float, Op]]:
    """Spread ``ops`` evenly over the fractions ``[0, until]`` of a transaction's duration."""
    return [(until * index / (len(ops) - 1), op) for index, op in enumerate(ops)]


def _insert(rng: random.Random, tx: str, stamp: str = "now", offsets: Sequence[float] = ()) -> Op:
    count = len(offsets) if offsets else rng.randint(1, 4)
    return Op("insert", tx, (("count", count), ("stamp", stamp), ("offsets", tuple(offsets))))


def _savepoint_block(rng: random.Random, tx: str, name: str, end: str) -> list[Op]:
    """Return SAVEPOINT, an insert, then ``end`` (``release`` or ``rollback_to``) of that savepoint."""
    return [Op("savepoint", tx, (("name", name),)), _insert(rng, tx), Op(end, tx, (("name", name),))]


def _history_writer(rng: random.Random, tx: str) -> list[tuple[float, Op]]:
    """Return the steps of a transaction that commits rows stamped around today's UTC midnight."""
    offsets = sorted(round(rng.uniform(-2.0, 2.0), 3) for _ in range(rng.randint(2, 5)))
    return [(0.0, Op("begin", tx)), (0.5, _insert(rng, tx, "last_midnight", offsets)), (1.0, Op("commit", tx))]


def _writer_steps(
    rng: random.Random, behaviour: str, tx: str, floor_margin: float
) -> tuple[list[tuple[float, Op]], float]:
    """Return the steps of one transaction, at fractions of its duration, and that duration."""
    begin, commit, rollback = Op("begin", tx), Op("commit", tx), Op("rollback", tx)

    if behaviour == "quick":
        return [(0.0, begin), (0.5, _insert(rng, tx)), (1.0, commit)], rng.uniform(0.5, 5.0)

    if behaviour == "late_writer":
        # It starts early and only reads, so it takes its xid after younger writers took theirs.
        steps = [(0.0, begin), (0.05, Op("read", tx)), (0.85, _insert(rng, tx)), (1.0, commit)]
        return steps, rng.uniform(10.0, 45.0)

    if behaviour == "long_open":
        steps = [(0.0, begin), (rng.uniform(0.0, 0.5), _insert(rng, tx))]
        if rng.random() < 0.6:
            steps.append((rng.uniform(0.5, 0.95), _insert(rng, tx)))
        steps.append((1.0, commit if rng.random() < 0.8 else rollback))
        return steps, rng.uniform(35.0, 90.0)

    if behaviour == "savepoints":
        ops = [begin, _insert(rng, tx), *_savepoint_block(rng, tx, "s1", "rollback_to"), _insert(rng, tx)]
        ops += _savepoint_block(rng, tx, "s2", "release")
        if rng.random() < 0.5:
            ops += _savepoint_block(rng, tx, "s3", "rollback_to")
        ops.append(commit if rng.random() < 0.85 else rollback)
        return _spread(ops), rng.uniform(3.0, 40.0)

    if behaviour == "abort":
        ops = [begin, _insert(rng, tx)]
        if rng.random() < 0.5:
            ops.append(Op("read", tx))
        ops.append(rollback)
        return _spread(ops), rng.uniform(1.0, 30.0)

    if behaviour == "two_phase":
        ops = [begin]
        if rng.random() < 0.5:
            ops.append(Op("read", tx))
        ops.append(_insert(rng, tx))
        if rng.random() < 0.6:
            # Rows written in a savepoint carry a subtransaction xid, which is above the top-level xid.
            ops += _savepoint_block(rng, tx, "s1", "release")
        ops.append(Op("prepare", tx))
        resolution = Op("commit_prepared", tx) if rng.random() < 0.75 else Op("rollback_prepared", tx)
        return [*_spread(ops, until=0.4), (1.0, resolution)], rng.uniform(10.0, 70.0)

    if behaviour == "midnight_burst":
        offsets = sorted(round(rng.uniform(-0.9, 0.9), 3) for _ in range(rng.randint(2, 6)))
        insert = _insert(rng, tx, "next_midnight", offsets)
        return [(0.0, begin), (0.5, insert), (1.0, commit)], rng.uniform(0.5, 10.0)

    if behaviour == "past_stamps":
        # Application-set timestamps up to 95% of floor_margin before the transaction start.
        offsets = [round(rng.uniform(0.0, 0.95) * floor_margin, 4) for _ in range(rng.randint(1, 4))]
        steps = [(0.0, begin), (0.3, Op("read", tx)), (0.8, _insert(rng, tx, "past", offsets)), (1.0, commit)]
        return steps, rng.uniform(1.0, 20.0)

    raise ValueError(f"Unknown writer behaviour {behaviour!r}. Expected one of: {', '.join(BEHAVIOURS)}.")


def _export_action(rng: random.Random, action: str) -> Op:
    if action == "export":
        args = [("page_rows", rng.choice([1, 2, 3, 5, 100])), ("rows_per_object", rng.choice([1, 2, 3, 8, 100]))]
        if rng.random() < 0.3:
            args.append(("max_rows_per_run", rng.choice([1, 2, 5])))
        if rng.random() < 0.25:
            args.append(("max_xid_interval", rng.choice([1, 2, 3])))
        if rng.random() < 0.15:
            args.append(("crash_at", rng.randint(0, 4)))
        return Op("export", args=tuple(args))
    if action == "backfill_settled":
        back = rng.choice([0.0, 0.0, 0.001, 0.05])
        length = rng.choice([0.2, 5.0, 3 * SECONDS_PER_DAY])
        return Op("backfill_settled", args=(("back", back), ("length", length), ("max_ranges", rng.choice([1, 2, 4]))))
    if action == "backfill_gaps":
        return Op("backfill_gaps", args=(("max_ranges", rng.choice([1, 2, 4])),))
    if action == "pause":
        return Op("pause", args=(("milliseconds", rng.choice([5, 20, 60])),))
    return Op(action)


def _move_into_runs(rng: random.Random, ops: list[Op]) -> list[Op]:
    """Move some writer operations that follow an export run inside it, at nondecreasing progress events."""
    moved: list[Op] = []
    inside_run = False
    last_event = 0
    for op in ops:
        if op.kind == "export":
            inside_run, last_event = True, 0
            moved.append(op)
        elif inside_run and op.kind in WRITER_KINDS and rng.random() < 0.35:
            last_event = rng.randint(last_event, last_event + 2)
            moved.append(dataclasses.replace(op, during=last_event))
        else:
            inside_run = False
            moved.append(op)
    return moved


# -- outcome of one execution ----------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """The result of one execution of a history: the details of each failed check, and what ran."""

    failures: dict[str, list[str]]
    executed: list[bool]
    cursor_trail: list[tuple[str, int]]
    gaps: list[dict]
    settled_windows: list[Window]
    rejected_windows: int
    required_rows: int
    duration_seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return any(self.failures.values())

    def count(self, check: str) -> int:
        return len(self.failures.get(check, []))

    def first_failed_check(self) -> str | None:
        return next((check for check in CHECKS if self.failures.get(check)), None)

    def describe_failures(self, limit: int = 12) -> str:
        lines = []
        for check in CHECKS:
            details = self.failures.get(check) or []
            if details:
                lines.append(f"{check}: {len(details)}")
                lines += [f"    {detail}" for detail in details[:limit]]
            if len(details) > limit:
                lines.append(f"    ... and {len(details) - limit} more")
        return "\n".join(lines)

    def describe_cursor_trail(self) -> str:
        return ", ".join(f"{cursor} after {label}" for label, cursor in self.cursor_trail)


def find_cursor_regressions(trail: Sequence[tuple[str, int]]) -> list[str]:
    """Describe each step of ``trail``, a list of ``(action, cursor)`` in order, where the cursor moved back."""
    regressions = []
    for (before_label, before), (after_label, after) in itertools.pairwise(trail):
        if after < before:
            regressions.append(f"cursor {before} after {before_label}, then {after} after {after_label}")
    return regressions


# -- execution -------------------------------------------------------------------------------


@dataclasses.dataclass
class RowRecord:
    """The writer side's record of one inserted row.

    ``status`` is ``pending`` until the row's transaction (or savepoint) ends,
    then ``committed`` or ``aborted``. ``after_anchor`` is true when it ended
    after the anchor that created the state row. A committed row with
    ``after_anchor`` is one that the export must deliver.
    """

    tx: str
    operation: int
    status: str = "pending"
    after_anchor: bool = False


@dataclasses.dataclass
class WriterTransaction:
    """A writer transaction's connection, status and rows by savepoint level.

    ``levels`` starts with the top level, named ``None``. Each savepoint pushes
    a level with its name, so a rollback to it drops the rows of its level and
    of the levels above.
    """

    name: str
    conn: psycopg.Connection | None = None
    status: str = "new"
    gid: str | None = None
    levels: list[tuple[str | None, list[int]]] = dataclasses.field(default_factory=lambda: [(None, [])])

    def all_rows(self) -> list[int]:
        return [row for _, rows in self.levels for row in rows]


class Execution:
    """Executes one history on one fresh database, then reaches quiescence and checks the destination.

    Writers connect as the superuser and the exporter as the least-privilege
    export role, which has ``pg_read_all_stats``. Every statement comes from
    the calling thread.
    """

    def __init__(self, cluster: PostgresCluster, database: str, history: History, destination_root: Path) -> None:
        self.cluster = cluster
        self.database = database
        self.history = history
        self.destination: LocalDestination = parse_destination(f"file://{destination_root}")
        self.settings = ExportSettings.create(
            name=EXPORT_NAME,
            table=SOURCE_TABLE,
            state_table=STATE_TABLE,
            floor_margin=timedelta(seconds=history.floor_margin),
            max_backlog=timedelta(seconds=history.max_backlog),
            page_rows=7,
            rows_per_object=20,
            lock_wait=timedelta(seconds=1),
        )
        self.transactions: dict[str, WriterTransaction] = {}
        self.rows: dict[int, RowRecord] = {}
        self.idle_connections: list[psycopg.Connection] = []
        self.opened: list[psycopg.Connection] = []
        self.anchored = False
        self.executed = [False] * len(history.ops)
        self.cursor_trail: list[tuple[str, int]] = []
        self.settled_windows: list[Window] = []
        self.rejected_windows = 0
        self.errors: list[str] = []
        self.exporter: psycopg.Connection | None = None
        self.admin: psycopg.Connection | None = None
        self.next_midnight: datetime | None = None
        self.last_midnight: datetime | None = None

    # -- connections ---------------------------------------------------------------------

    def _connect(self, user: str | None = None) -> psycopg.Connection:
        conn = self.cluster.connect(self.database, user=user)
        self.opened.append(conn)
        return conn

    def _connect_exporter(self) -> None:
        self.exporter = self._connect(EXPORT_ROLE)
        configure_connection(self.exporter)

    def close(self) -> None:
        for conn in self.opened:
            conn.close()

    # -- the run -------------------------------------------------------------------------

    def run(self, *, backfill_gaps_at_end: bool = True) -> Outcome:
        """Execute the history, reach quiescence, finish the export and return the checked outcome."""
        started = time.monotonic()
        self._connect_exporter()
        self.admin = self._connect()
        now = self.admin.execute("SELECT clock_timestamp()").fetchone()[0].astimezone(UTC)
        self.last_midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        # More than an hour ahead, so rows stamped around it are in the future for the whole run.
        later = now + timedelta(hours=1)
        self.next_midnight = later.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)

        ops = self.history.ops
        index = 0
        while index < len(ops):
            if ops[index].kind != "export":
                self._execute(index)
                index += 1
                continue
            following = index + 1
            while following < len(ops) and ops[following].during is not None:
                following += 1
            self._export(index, list(range(index + 1, following)))
            index = following

        self._quiesce()
        self._drain()
        if backfill_gaps_at_end:
            self._backfill_gaps(max_ranges=2, label="final gap backfill")
        outcome = self._check()
        outcome.duration_seconds = time.monotonic() - started
        return outcome

    def _execute(self, index: int) -> None:
        op = self.history.ops[index]
        if op.kind in WRITER_KINDS:
            self.executed[index] = self._writer(index, op)
            return
        self.executed[index] = True
        if op.kind in ("anchor", "reanchor"):
            self._anchor(index, force=op.kind == "reanchor")
        elif op.kind == "backfill_gaps":
            self._backfill_gaps(max_ranges=op.arg("max_ranges", 2), label=f"operation {index + 1}")
            self._record_cursor(f"operation {index + 1}")
        elif op.kind == "backfill_settled":
            self._backfill_settled(index, op)
            self._record_cursor(f"operation {index + 1}")
        elif op.kind == "pause":
            time.sleep(op.arg("milliseconds") / 1000)
        else:
            raise SimulatorError(f"Unknown operation kind {op.kind!r} at operation {index + 1}.")

    # -- writers -------------------------------------------------------------------------

    def _writer(self, index: int, op: Op) -> bool:
        """Execute one writer operation and return ``False`` when its transaction is in another state.

        Such an operation does nothing, which keeps every shortened history executable.
        """
        tx = self.transactions.setdefault(op.tx, WriterTransaction(op.tx))
        try:
            return self._writer_step(index, op, tx)
        except psycopg.Error as err:
            raise SimulatorError(f"Writer operation {index + 1} ({op.describe()}) failed: {err}") from err

    def _writer_step(self, index: int, op: Op, tx: WriterTransaction) -> bool:
        kind = op.kind
        if kind == "begin":
            if tx.status != "new":
                return False
            tx.conn = self.idle_connections.pop() if self.idle_connections else self._connect()
            tx.conn.execute("BEGIN")
            tx.conn.execute("SELECT now()")
            tx.status = "open"
            return True

        if kind in ("commit_prepared", "rollback_prepared"):
            if tx.status != "prepared":
                return False
            verb = "COMMIT PREPARED" if kind == "commit_prepared" else "ROLLBACK PREPARED"
            self.admin.execute(sql.SQL(verb + " {}").format(sql.Literal(tx.gid)))
            self._finish(tx, "committed" if kind == "commit_prepared" else "aborted")
            return True

        if tx.status != "open":
            return False
        if kind in ("rollback_to", "release"):
            return self._end_savepoint(tx, kind, op.arg("name"))

        conn = tx.conn
        if kind == "read":
            conn.execute("SELECT count(*) FROM audit_partitioned")
        elif kind == "insert":
            ids = self._insert_rows(conn, op)
            tx.levels[-1][1].extend(ids)
            for row_id in ids:
                self.rows[row_id] = RowRecord(tx=tx.name, operation=index + 1)
        elif kind == "savepoint":
            conn.execute(sql.SQL("SAVEPOINT {}").format(sql.Identifier(op.arg("name"))))
            tx.levels.append((op.arg("name"), []))
        elif kind == "commit":
            conn.execute("COMMIT")
            self._finish(tx, "committed")
        elif kind == "rollback":
            conn.execute("ROLLBACK")
            self._finish(tx, "aborted")
        elif kind == "prepare":
            tx.gid = f"{self.database}_{tx.name}"
            conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(tx.gid)))
            tx.status = "prepared"
            self._release_connection(tx)
        else:
            raise SimulatorError(f"Unknown writer operation kind {kind!r} at operation {index + 1}.")
        return True

    def _end_savepoint(self, tx: WriterTransaction, kind: str, name: str) -> bool:
        """Roll back to or release savepoint ``name``, and return ``False`` when it is not defined."""
        positions = [position for position, (level, _) in enumerate(tx.levels) if level == name]
        if not positions:
            return False
        position = positions[-1]
        if kind == "rollback_to":
            tx.conn.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(sql.Identifier(name)))
            for _, rows in tx.levels[position:]:
                self._mark(rows, "aborted")
            # The savepoint stays defined after ROLLBACK TO, with no rows of its own.
            tx.levels[position:] = [(name, [])]
        else:
            tx.conn.execute(sql.SQL("RELEASE SAVEPOINT {}").format(sql.Identifier(name)))
            released = [row for _, rows in tx.levels[position:] for row in rows]
            del tx.levels[position:]
            tx.levels[-1][1].extend(released)
        return True

    def _insert_rows(self, conn: psycopg.Connection, op: Op) -> list[int]:
        stamp = op.arg("stamp")
        if stamp == "now":
            return insert_rows(conn, op.arg("count"), workspace=op.tx)
        if stamp == "past":
            # Relative to now(), the transaction start, so each offset is exactly what floor_margin must cover.
            base = sql.SQL("now()")
        elif stamp == "next_midnight":
            base = sql.Literal(self.next_midnight)
        elif stamp == "last_midnight":
            base = sql.Literal(self.last_midnight)
        else:
            raise SimulatorError(f"Unknown timestamp kind {stamp!r} in {op.describe()}.")
        sign = sql.SQL("-" if stamp == "past" else "+")
        query = sql.SQL(
            'INSERT INTO audit_partitioned (workspace_id, username, operation, action_kind, "timestamp") '
            "SELECT %s, 'user1', 'jobs.run', 'create', {base}::timestamptz {sign} make_interval(secs => o) "
            "FROM unnest(%s::float8[]) AS u(o) RETURNING id"
        ).format(base=base, sign=sign)
        return [row[0] for row in conn.execute(query, (op.tx, list(op.arg("offsets")))).fetchall()]

    def _finish(self, tx: WriterTransaction, status: str) -> None:
        self._mark(tx.all_rows(), status)
        tx.status = status
        tx.levels = [(None, [])]
        self._release_connection(tx)

    def _release_connection(self, tx: WriterTransaction) -> None:
        if tx.conn is not None:
            self.idle_connections.append(tx.conn)
            tx.conn = None

    def _mark(self, row_ids: list[int], status: str) -> None:
        for row_id in row_ids:
            self.rows[row_id].status = status
            self.rows[row_id].after_anchor = self.anchored

    # -- export actions ------------------------------------------------------------------

    def _run_settings(self, op: Op) -> ExportSettings:
        changes = {"page_rows": op.arg("page_rows", 7), "rows_per_object": op.arg("rows_per_object", 20)}
        for name in ("max_rows_per_run", "max_xid_interval"):
            if op.arg(name) is not None:
                changes[name] = op.arg(name)
        settings = dataclasses.replace(self.settings, **changes)
        settings.validate()
        return settings

    def _export(self, index: int, inner: list[int]) -> None:
        """Run one export, executing the operations in ``inner`` at their progress events."""
        self.executed[index] = True
        op = self.history.ops[index]
        waiting = list(inner)
        events = 0
        crash_at = op.arg("crash_at")

        def on_progress(event: str, details: dict) -> None:
            nonlocal events
            while waiting and self.history.ops[waiting[0]].during <= events:
                self._execute(waiting.pop(0))
            if events == crash_at:
                raise SimulatedCrash(f"crash at progress event {events} ({event})")
            events += 1

        label = f"operation {index + 1} ({op.describe()})"
        try:
            settings = self._run_settings(op)
            self._guard(label, run_export, self.exporter, settings, self.destination, on_progress=on_progress)
        except SimulatedCrash:
            # The retry of a crashed task runs in a new process with a new session.
            self.exporter.close()
            self._connect_exporter()
        for rest in waiting:
            self._execute(rest)
        self._record_cursor(f"operation {index + 1}")

    def _anchor(self, index: int, *, force: bool) -> None:
        label = f"operation {index + 1} (anchor_export(force={force}))"
        if self._guard(label, anchor_export, self.exporter, self.settings, force=force) is not None:
            self.anchored = True
        self._record_cursor(f"operation {index + 1}")

    def _guard(self, label: str, function: Callable, *args, **kwargs):
        """Call a product function and return its result; record an exception it raises as an export error."""
        try:
            return function(*args, **kwargs)
        except (SimulatorError, SimulatedCrash):
            raise
        except Exception as err:  # noqa: BLE001 - any exception from the product is a finding
            log.exception("Interleaving seed %s: %s raised", self.history.seed, label)
            self.errors.append(f"{label} raised {type(err).__name__}: {err}")
            return None

    def _record_cursor(self, label: str) -> None:
        row = self.admin.execute(
            "SELECT cursor_xid FROM audit_export_state WHERE export_name = %s", (EXPORT_NAME,)
        ).fetchone()
        if row is not None:
            self.cursor_trail.append((label, row[0]))

    def _backfill_window(self, window: Window, max_ranges: int) -> dict:
        """Run the ``audit_backfill`` steps for ``window``: plan ranges, export each range, write the manifest."""
        table = describe_source(self.exporter, self.settings)
        ranges = plan_ranges(self.exporter, [table], window, max_ranges)
        results = [
            export_range(
                self.exporter,
                [("main", table)],
                self.destination,
                name=self.settings.name,
                window=window,
                start=page_range.start,
                end=page_range.end,
                page_rows=3,
                rows_per_object=4,
                compression=self.settings.compression,
            )
            for page_range in ranges
        ]
        return write_manifest(self.destination, self.settings.name, window, results)

    def _backfill_gaps(self, *, max_ranges: int, label: str) -> None:
        """Backfill each recorded gap whose backfill is pending, as the gap policy ``backfill`` does.

        A gap needs no settled ``to``, so, like the backfill DAG's plan task,
        this skips the settled check when ``find_gap`` matches the window.
        """
        state = StateStore(self.exporter, self.settings.state_table).load(self.settings.name)
        if state is None:
            return
        for gap in state.gaps:
            if gap.get("backfill") == "done":
                continue
            window = gap_window(gap)
            where = f"{label}, gap [{gap['from']}, {gap['to']})"
            if self._guard(where, find_gap, self.exporter, self.settings, window) is None:
                self.errors.append(f"{where}: find_gap did not find the recorded gap")
                continue
            summary = self._guard(where, self._backfill_window, window, max_ranges)
            if summary is None:
                continue
            outcome = {"manifest": summary["manifest"], "rows": summary["rows"]}
            if not self._guard(where, mark_gap_backfill, self.exporter, self.settings, window, outcome):
                self.errors.append(f"{where}: mark_gap_backfill found no matching gap")

    def _backfill_settled(self, index: int, op: Op) -> None:
        """Backfill a window that ends at or just before the largest settled ``to``, when there is one.

        A first settled check on an old window returns the largest allowed
        ``to``. It rejects every window while a prepared transaction exists,
        and then nothing is backfilled.
        """
        if not self.anchored:
            return
        now = self.admin.execute("SELECT clock_timestamp()").fetchone()[0]
        probe = Window(now - timedelta(days=10), now - timedelta(days=10) + timedelta(seconds=1))
        try:
            largest_to = check_window_settled(self.exporter, self.settings, probe)
            end = largest_to - timedelta(seconds=op.arg("back"))
            window = parse_window(end - timedelta(seconds=op.arg("length")), end)
            check_window_settled(self.exporter, self.settings, window)
        except WindowError:
            self.rejected_windows += 1
            return
        label = f"operation {index + 1} ({op.describe()})"
        if self._guard(label, self._backfill_window, window, op.arg("max_ranges", 2)) is not None:
            self.settled_windows.append(window)

    # -- quiescence ----------------------------------------------------------------------

    def _quiesce(self) -> None:
        """Roll back every transaction that the history left open or prepared."""
        for tx in self.transactions.values():
            if tx.status == "open":
                tx.conn.execute("ROLLBACK")
                self._finish(tx, "aborted")
            elif tx.status == "prepared":
                self.admin.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(tx.gid)))
                self._finish(tx, "aborted")

    def _drain(self, max_runs: int = 200) -> None:
        """Run exports until no range is pending and the cursor passes every transaction finished so far."""
        if not self.anchored:
            return
        target = self.admin.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()[0]
        store = StateStore(self.admin, self.settings.state_table)
        for attempt in range(1, max_runs + 1):
            self._guard(f"final export run {attempt}", run_export, self.exporter, self.settings, self.destination)
            self._record_cursor(f"final run {attempt}")
            state = store.load(self.settings.name)
            if state.pending is None and state.cursor_xid >= target:
                return
        self.errors.append(f"the final export runs did not move the cursor to xid {target} in {max_runs} runs")

    # -- checks --------------------------------------------------------------------------

    def _check(self) -> Outcome:
        """Compare the destination and the state row with the writers' records, check by check."""
        steady, by_window, exported = self._read_destination()
        stored = {
            row_id: (stamp, xmin)
            for row_id, stamp, xmin in self.admin.execute(
                'SELECT id, "timestamp", xmin::text::bigint FROM audit_partitioned'
            ).fetchall()
        }
        committed = sorted(row_id for row_id, record in self.rows.items() if record.status == "committed")
        if set(stored) != set(committed):
            raise SimulatorError(
                "The writers' records disagree with the table: committed but absent "
                f"{sorted(set(committed) - set(stored))[:10]}, present but not committed "
                f"{sorted(set(stored) - set(committed))[:10]}."
            )
        unknown = sorted(exported - set(self.rows))
        if unknown:
            raise SimulatorError(f"Row ids {unknown[:10]} in the destination were never inserted by this history.")

        state = StateStore(self.admin, self.settings.state_table).load(self.settings.name)
        gaps = state.gaps if state is not None else []
        failures: dict[str, list[str]] = {check: [] for check in CHECKS}

        # A row committed after the anchor must be in a steady-state object or in a gap backfill.
        gap_ids = set().union(*(by_window.get(gap_window(gap).token, set()) for gap in gaps))
        for row_id in committed:
            record = self.rows[row_id]
            if record.after_anchor and row_id not in steady and row_id not in gap_ids:
                stamp, xmin = stored[row_id]
                failures["lost rows"].append(
                    f"id {row_id} of {record.tx} (inserted by operation {record.operation}), "
                    f"timestamp {stamp.isoformat()}, xmin {xmin}"
                )

        for row_id, keys in sorted(steady.items()):
            if len(keys) > 1:
                failures["duplicated steady-state rows"].append(f"id {row_id} in {', '.join(sorted(keys))}")

        failures["cursor regressions"] = find_cursor_regressions(self.cursor_trail)

        for gap in gaps:
            if gap.get("backfill") != "done":
                failures["gaps not backfilled"].append(
                    f"gap [{gap['from']}, {gap['to']}) recorded because {gap['reason']}"
                )

        for row_id in sorted(exported):
            record = self.rows[row_id]
            if record.status != "committed":
                failures["aborted rows exported"].append(f"id {row_id} of {record.tx} ({record.status})")

        # A settled window is final: every committed row stamped in it must be in its backfill.
        for window in self.settled_windows:
            in_backfill = by_window.get(window.token, set())
            for row_id in committed:
                stamp, _ = stored[row_id]
                if window.start <= stamp < window.end and row_id not in in_backfill:
                    failures["rows missing from settled backfills"].append(
                        f"id {row_id} of {self.rows[row_id].tx}, timestamp {stamp.isoformat()}, "
                        f"window [{window.start.isoformat()}, {window.end.isoformat()})"
                    )

        failures["export errors"] = list(self.errors)
        return Outcome(
            failures=failures,
            executed=list(self.executed),
            cursor_trail=list(self.cursor_trail),
            gaps=list(gaps),
            settled_windows=list(self.settled_windows),
            rejected_windows=self.rejected_windows,
            required_rows=sum(1 for row_id in committed if self.rows[row_id].after_anchor),
        )

    def _read_destination(self) -> tuple[dict[int, list[str]], dict[str, set[int]], set[int]]:
        """Return the steady-state keys of each id, the ids of each backfill window token, and every id."""
        steady: dict[int, list[str]] = {}
        by_window: dict[str, set[int]] = {}
        exported: set[int] = set()
        for key, data in read_local_objects(self.destination).items():
            ids = [row["id"] for row in decode_rows({key: data})]
            exported.update(ids)
            if STEADY_STATE_KEY.search(key):
                for row_id in ids:
                    steady.setdefault(row_id, []).append(key)
                continue
            match = BACKFILL_KEY.search(key)
            if match is None:
                raise SimulatorError(f"Object key {key!r} is neither a steady-state key nor a backfill key.")
            by_window.setdefault(match.group(1), set()).update(ids)
        return steady, by_window, exported


# -- the harness: one cluster, one template, a fresh database per execution --------------------


class Harness:
    """Runs histories on one PostgreSQL cluster, each on a fresh database copied from a template.

    The template has the reference schema, with daily partitions from
    :data:`PARTITION_DAYS_BEFORE` days ago to :data:`PARTITION_DAYS_AFTER` days
    ahead, and the export role's grants. ``CREATE DATABASE ... TEMPLATE``
    copies it, which is much faster than building the schema for each execution.
    """

    def __init__(self, cluster: PostgresCluster, *, workdir: Path | None = None) -> None:
        self.cluster = cluster
        self.template = f"interleavings_template_{uuid.uuid4().hex[:8]}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="audit-export-interleavings-"))
        self._counter = itertools.count(1)
        self.cluster.create_database(self.template)
        today = datetime.now(UTC).date()
        with self.cluster.connect(self.template) as conn:
            create_reference_schema(
                conn,
                first_day=today - timedelta(days=PARTITION_DAYS_BEFORE),
                last_day=today + timedelta(days=PARTITION_DAYS_AFTER),
            )
            apply_export_role(conn)

    def close(self) -> None:
        """Drop the template database and delete the work folder."""
        with self.cluster.connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.template)))
        shutil.rmtree(self.workdir, ignore_errors=True)

    def execute(self, history: History, *, backfill_gaps_at_end: bool = True) -> Outcome:
        """Execute ``history`` on a fresh database, then drop the database and the destination folder."""
        database = f"interleaving_{history.seed}_{next(self._counter)}"
        destination_root = self.workdir / database
        with self.cluster.connect() as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(database), sql.Identifier(self.template)
                )
            )
        execution = Execution(self.cluster, database, history, destination_root)
        try:
            return execution.run(backfill_gaps_at_end=backfill_gaps_at_end)
        finally:
            execution.close()
            self._drop_database(database)
            shutil.rmtree(destination_root, ignore_errors=True)

    def _drop_database(self, database: str) -> None:
        with self.cluster.connect() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
            gids = admin.execute("SELECT gid FROM pg_prepared_xacts WHERE database = %s", (database,)).fetchall()
            if gids:
                with self.cluster.connect(database) as owner:
                    for (gid,) in gids:
                        owner.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))

    def check_seed(
        self,
        seed: int,
        *,
        size: int = DEFAULT_SIZE,
        shrink: bool = True,
        max_shrink_runs: int = 300,
        history: History | None = None,
        backfill_gaps_at_end: bool = True,
    ) -> SeedReport:
        """Execute the history of ``seed`` (or ``history``), and shrink it when a check fails."""
        history = history or generate_history(seed, size)
        outcome = self.execute(history, backfill_gaps_at_end=backfill_gaps_at_end)
        report = SeedReport(seed=seed, history=history, outcome=outcome)
        if not (outcome.failed and shrink):
            return report

        check = outcome.first_failed_check()

        def still_fails(candidate: History) -> Outcome | None:
            try:
                result = self.execute(candidate, backfill_gaps_at_end=backfill_gaps_at_end)
            except SimulatorError:
                log.exception("Seed %s: a shrunk candidate broke the simulator; it does not count as failing", seed)
                return None
            return result if result.failures.get(check) else None

        report.shrunk_check = check
        report.minimal, report.minimal_outcome, report.shrink_runs = shrink_history(
            history, outcome, still_fails, max_runs=max_shrink_runs
        )
        return report


@dataclasses.dataclass
class SeedReport:
    """The outcome of one seed and, after shrinking, the shortest history found that fails the same check."""

    seed: int
    history: History
    outcome: Outcome
    shrunk_check: str | None = None
    minimal: History | None = None
    minimal_outcome: Outcome | None = None
    shrink_runs: int = 0

    def describe(self) -> str:
        """Describe the seed's result: the failed checks and the minimal history, or the full history."""
        if not self.outcome.failed:
            return (
                f"seed {self.seed}: passed, {len(self.history.ops)} operations, "
                f"{self.outcome.required_rows} rows required, {len(self.outcome.gaps)} gaps, "
                f"{self.outcome.duration_seconds:.1f}s"
            )
        lines = [
            f"Interleaving seed {self.seed} FAILED ({len(self.history.ops)} operations).",
            self.outcome.describe_failures(),
        ]
        if self.minimal is None:
            lines += ["", "Full history:", self.history.describe(self.outcome.executed)]
            return "\n".join(lines)
        lines += [
            "",
            f"Shortest history found that still fails '{self.shrunk_check}' ({len(self.minimal.ops)} of "
            f"{len(self.history.ops)} operations, {self.shrink_runs} shrink runs):",
            self.minimal.describe(self.minimal_outcome.executed),
            "Its failures:",
            self.minimal_outcome.describe_failures(),
            f"Cursor: {self.minimal_outcome.describe_cursor_trail()}",
        ]
        return "\n".join(lines)


# -- shrinking -------------------------------------------------------------------------------


def shrink_history(
    history: History,
    outcome: Outcome,
    still_fails: Callable[[History], Outcome | None],
    *,
    max_runs: int = 300,
) -> tuple[History, Outcome, int]:
    """Shrink a failing history by delta debugging and return the shortest one found, its outcome and the runs.

    ``still_fails`` executes a candidate on a fresh database and returns its
    outcome when the candidate still fails the check being shrunk, else
    ``None``. The first anchor, which creates the state row, always stays.

    First the operations that the failing execution skipped as no-ops go,
    because without them the same statements run. Then ddmin removes one of
    ``n`` chunks at a time, starting with two chunks. It keeps the first
    removal after which the candidate still fails. When no chunk can go, it
    doubles ``n``, until chunks are single operations and none can go. A last
    candidate drops the no-ops left in the shortest failing history. After
    ``max_runs`` candidates it stops with the shortest failing history so far.
    """
    runs = 0
    best_history, best_outcome = history, outcome
    best_indices = list(range(len(history.ops)))
    pinned = next((index for index, op in enumerate(history.ops) if op.kind == "anchor"), None)

    def fails_without_others(indices: list[int]) -> bool:
        nonlocal runs, best_history, best_outcome, best_indices
        if runs >= max_runs:
            return False
        runs += 1
        candidate_indices = sorted(set(indices) | ({pinned} if pinned is not None else set()))
        candidate = history.with_ops([history.ops[index] for index in candidate_indices])
        result = still_fails(candidate)
        if result is None:
            return False
        best_history, best_outcome, best_indices = candidate, result, candidate_indices
        return True

    removable = [index for index in range(len(history.ops)) if index != pinned]
    executed = [index for index in removable if outcome.executed[index]]
    if len(executed) < len(removable) and fails_without_others(executed):
        removable = executed

    chunks = 2
    while removable and runs < max_runs:
        size = math.ceil(len(removable) / chunks)
        for start in range(0, len(removable), size):
            complement = removable[:start] + removable[start + size :]
            if fails_without_others(complement):
                removable = complement
                chunks = max(chunks - 1, 2)
                break
        else:
            if size == 1:
                break
            chunks = min(len(removable), chunks * 2)

    # A failure that depends on timing may not repeat on every run, so no-ops can survive ddmin.
    ran = [index for index, did_run in zip(best_indices, best_outcome.executed) if did_run and index != pinned]
    if len(ran) < len(best_indices) - (pinned is not None):
        fails_without_others(ran)
    return best_history, best_outcome, runs


# -- command line ----------------------------------------------------------------------------


def summary_line(count: int, totals: dict[str, int]) -> str:
    """Return the final report line, for example ``1000 interleavings: 0 lost rows, ...``."""
    return f"{count} interleavings: " + ", ".join(f"{totals.get(check, 0)} {check}" for check in CHECKS)


def run_seeds(
    harness: Harness,
    seeds: Sequence[int],
    *,
    size: int = DEFAULT_SIZE,
    shrink: bool = True,
    max_shrink_runs: int = 300,
    out: TextIO = sys.stdout,
) -> tuple[dict[str, int], list[int]]:
    """Check every seed, print each failure when it happens, and return the totals by check and the failing seeds.

    A seed that breaks the simulator is printed with its traceback and counted as failing.
    """
    totals = {check: 0 for check in CHECKS}
    failing: list[int] = []
    started = time.monotonic()
    for number, seed in enumerate(seeds, start=1):
        try:
            report = harness.check_seed(seed, size=size, shrink=shrink, max_shrink_runs=max_shrink_runs)
        except SimulatorError:
            log.exception("Seed %s broke the simulator", seed)
            print(f"Interleaving seed {seed}: the simulator failed; see the traceback above.", file=out, flush=True)
            failing.append(seed)
            continue
        for check in CHECKS:
            totals[check] += report.outcome.count(check)
        if report.outcome.failed:
            failing.append(seed)
            print(report.describe(), file=out, flush=True)
        if number % 25 == 0 or number == len(seeds):
            elapsed = time.monotonic() - started
            progress = f"{number}/{len(seeds)} interleavings in {elapsed:.0f}s, {len(failing)} failing"
            print(progress, file=out, flush=True)
    return totals, failing


def main(argv: Sequence[str] | None = None) -> int:
    """Run seeds on a throwaway cluster, print a summary line and return 1 when any seed failed."""
    parser = argparse.ArgumentParser(
        prog="python -m airflow_audit_export.testing.interleavings",
        description=(
            "Run seeded random interleavings of writer transactions and export actions on a throwaway "
            "PostgreSQL cluster on 127.0.0.1, and check that no committed row is lost."
        ),
    )
    parser.add_argument("--count", type=int, default=1000, help="number of consecutive seeds to run (default 1000)")
    parser.add_argument("--seed-start", type=int, default=1, help="first seed (default 1)")
    parser.add_argument("--seeds", help="comma-separated seeds to run instead of --count and --seed-start")
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        help=f"maximum number of writer transactions per history (default {DEFAULT_SIZE})",
    )
    parser.add_argument("--no-shrink", action="store_true", help="report failing seeds without shrinking them")
    parser.add_argument(
        "--max-shrink-runs",
        type=int,
        default=300,
        help="maximum executions spent shrinking one failing history (default 300)",
    )
    parser.add_argument("--verbose", action="store_true", help="log the exporter's INFO lines to stderr")
    args = parser.parse_args(argv)

    level = logging.INFO if args.verbose else logging.ERROR
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Each product exception is logged with its traceback, but without --verbose only the report shows it.
    logging.getLogger(__name__).setLevel(level if args.verbose else logging.CRITICAL)
    if args.seeds:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    else:
        seeds = list(range(args.seed_start, args.seed_start + args.count))
    # SIGTERM then unwinds like Ctrl-C, so the cluster below is stopped and deleted.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    started = time.monotonic()
    with PostgresCluster() as cluster:
        harness = Harness(cluster)
        try:
            totals, failing = run_seeds(
                harness, seeds, size=args.size, shrink=not args.no_shrink, max_shrink_runs=args.max_shrink_runs
            )
        finally:
            harness.close()

    if failing:
        print("Failing seeds: " + ", ".join(map(str, failing)))
    print(f"Took {time.monotonic() - started:.0f}s.")
    print(summary_line(len(seeds), totals))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
