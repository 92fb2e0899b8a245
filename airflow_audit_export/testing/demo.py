"""End-to-end demo: the ``audit_export`` DAG on a throwaway PostgreSQL with live writes.

Run ``python -m airflow_audit_export.testing.demo`` from the directory that
should hold the ``.demo/`` folder, usually the repository root. The demo:

1. starts a throwaway PostgreSQL cluster on 127.0.0.1 with a database
   ``audit_demo`` that has the reference schema and some history rows;
2. creates a fresh Airflow home in ``.demo/airflow-home`` and migrates its
   metadata database;
3. runs ``airflow dags test audit_export`` several times while a background
   writer commits small batches and keeps one transaction open across every
   even-numbered run;
4. stops the writer, runs the DAG once more and checks that every row
   committed after the first anchor is in the destination exactly once, and
   that no history row was exported;
5. backfills the history before the anchor with ``airflow dags test
   audit_backfill``, prints the summary from its manifest and checks that
   every history row is in the backfill objects exactly once.

The DAG runs with its embedded defaults, so the objects land in
``$AIRFLOW_HOME/audit-export``. The cluster is removed on exit unless
``--keep`` is given.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import gzip
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg

from airflow_audit_export.status import read_status
from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.schema import (
    EXPORT_ROLE,
    PARTITIONED_TABLE,
    apply_export_role,
    create_reference_schema,
    generate_history,
    insert_rows,
)

DATABASE = "audit_demo"
DAG_ID = "audit_export"
BACKFILL_DAG_ID = "audit_backfill"
# The DAG's defaults for AUDIT_EXPORT_NAME and AUDIT_EXPORT_STATE_TABLE, which the demo leaves unset.
EXPORT_NAME = "audit"
STATE_TABLE = "public.audit_export_state"

HISTORY_ROWS = 2_000
HISTORY_DAYS = 30
WRITER_INTERVAL_SECONDS = 0.3
WRITER_MAX_BATCH_ROWS = 10
HELD_TRANSACTION_ROWS = 5
# Batches the writer commits at least before it stops, so that even --runs 1 has rows to verify.
MIN_WRITER_BATCHES = 10
# Upper bound for one `airflow dags test`. A failing task retries twice with 30 s
# between attempts (the DAG's default_args), so a failed run took 88 s on a 2-core machine.
DAG_TEST_TIMEOUT_SECONDS = 600
#: The default floor_margin plus a little clock slack.
SETTLE_WAIT = timedelta(seconds=65)
LOG_TAIL_LINES = 30
# The last line of a Python traceback, such as "airflow_audit_export.source.SourceTableError: Source table ...".
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")

# Inherited variables with these prefixes could point the demo at another
# metadata database, connection or destination, so the demo drops them.
DROPPED_ENV_PREFIXES = ("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "AUDIT_EXPORT_")


class DemoError(RuntimeError):
    """A failed step of the demo; the message names the step and its log file."""


def find_dags_folder() -> Path:
    """Return ``<repo>/dags``, located from this module's path in a source checkout."""
    repo = Path(__file__).resolve().parents[2]
    dags = repo / "dags"
    if not (dags / f"{DAG_ID}.py").is_file():
        raise DemoError(
            f"DAG file {dags / (DAG_ID + '.py')} not found. The demo runs the DAG from a source checkout: "
            "install the repository in editable mode (pip install -e .) and run the demo from there."
        )
    return dags


def find_airflow_command() -> str:
    """Return the ``airflow`` program next to this Python, or the one on ``PATH``."""
    beside_python = Path(sys.executable).parent / "airflow"
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("airflow")
    if on_path is None:
        raise DemoError("The airflow command was not found next to this Python or on PATH. Install apache-airflow.")
    return on_path


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_exception(path: Path) -> str | None:
    """Return the last exception line of a log, which the retry polling at its end can push out of the tail."""
    found = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if EXCEPTION_LINE.match(line):
            found = line
    return found


class BackgroundWriter:
    """Commit small batches of rows from a thread, and hold a transaction open on request.

    The thread uses two connections of its own: one in autocommit mode for the
    batches, and one for the held transaction, whose rows stay invisible until
    :meth:`commit_held` commits them.
    """

    def __init__(self, cluster: PostgresCluster, dbname: str) -> None:
        self._cluster = cluster
        self._dbname = dbname
        self._stop_requested = threading.Event()
        self._hold_requested = threading.Event()
        self._commit_requested = threading.Event()
        self._held_open = threading.Event()
        self._held_committed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-writer", daemon=True)
        self._held_conn: psycopg.Connection | None = None
        self._held_rows = 0
        self.committed_rows = 0
        self.batches = 0
        self.held_transactions = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def open_held(self, timeout: float = 30) -> None:
        """Begin a transaction, insert rows in it and leave it open."""
        self._held_committed.clear()
        self._hold_requested.set()
        self._wait_for(self._held_open, "open the held transaction", timeout)

    def commit_held(self, timeout: float = 30) -> None:
        """Commit the held transaction opened by :meth:`open_held`."""
        self._held_open.clear()
        self._commit_requested.set()
        self._wait_for(self._held_committed, "commit the held transaction", timeout)

    def wait_for_batches(self, count: int, timeout: float = 60) -> None:
        """Wait until the writer has committed at least ``count`` batches."""
        deadline = time.monotonic() + timeout
        while self.batches < count:
            if not self._thread.is_alive():
                raise DemoError(f"The background writer stopped after {self.batches} batches: {self.error}")
            if time.monotonic() > deadline:
                raise DemoError(f"The background writer committed {self.batches} batches in {timeout} s, not {count}.")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        """Stop the thread after it commits any held transaction, and re-raise its error."""
        self._stop_requested.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise DemoError(f"The background writer did not stop within {timeout} s.")
        if self.error is not None:
            raise DemoError(f"The background writer failed: {self.error}") from self.error

    def _wait_for(self, event: threading.Event, action: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not event.wait(0.1):
            if not self._thread.is_alive():
                raise DemoError(f"The background writer stopped before it could {action}: {self.error}")
            if time.monotonic() > deadline:
                raise DemoError(f"The background writer did not {action} within {timeout} s.")

    def _run(self) -> None:
        rng = random.Random(7)
        try:
            with (
                self._cluster.connect(self._dbname) as batch_conn,
                self._cluster.connect(self._dbname, autocommit=False) as held_conn,
            ):
                self._held_conn = held_conn
                while not self._stop_requested.is_set():
                    self._serve_requests()
                    count = rng.randint(1, WRITER_MAX_BATCH_ROWS)
                    insert_rows(batch_conn, count, seed=self.batches, workspace="demo-writer")
                    self.committed_rows += count
                    self.batches += 1
                    self._stop_requested.wait(WRITER_INTERVAL_SECONDS)
                if self._held_rows:
                    self._commit_held_now()
        except BaseException as err:  # noqa: BLE001 - stored and re-raised by stop() in the main thread
            self.error = err

    def _serve_requests(self) -> None:
        if self._hold_requested.is_set():
            self._hold_requested.clear()
            insert_rows(self._held_conn, HELD_TRANSACTION_ROWS, seed=-self.batches, workspace="demo-held")
            self._held_rows = HELD_TRANSACTION_ROWS
            self._held_open.set()
        if self._commit_requested.is_set():
            self._commit_requested.clear()
            self._commit_held_now()

    def _commit_held_now(self) -> None:
        self._held_conn.commit()
        self.committed_rows += self._held_rows
        self.held_transactions += 1
        self._held_rows = 0
        self._held_committed.set()


class Demo:
    """The demo's steps, sharing the cluster, the Airflow environment and the timings."""

    def __init__(self, cluster: PostgresCluster, home: Path, dags: Path, airflow: str) -> None:
        self.cluster = cluster
        self.home = home
        self.logs = home / "demo-logs"
        self.destination = home.resolve() / "audit-export"
        self.airflow = airflow
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
        self.dropped_env = sorted(set(os.environ) - set(self.env))
        self.env.update(
            AIRFLOW_HOME=str(home.resolve()),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(dags),
            AIRFLOW_CONN_AUDIT_DB=cluster.uri(DATABASE, user=EXPORT_ROLE),
        )

    def prepare_database(self) -> int:
        """Create the demo database with the reference schema and history; return the max history id."""
        self.cluster.create_database(DATABASE)
        today = datetime.now(timezone.utc).date()
        with self.cluster.connect(DATABASE) as conn:
            create_reference_schema(conn, first_day=today - timedelta(days=40), last_day=today + timedelta(days=3))
            generate_history(conn, HISTORY_ROWS, days=HISTORY_DAYS, end=datetime.now(timezone.utc))
            apply_export_role(conn)
            return conn.execute(f"SELECT coalesce(max(id), 0) FROM {PARTITIONED_TABLE}").fetchone()[0]

    def migrate(self) -> float:
        """Run ``airflow db migrate`` into a log file; return its duration in seconds."""
        log_file = self.logs / "db-migrate.log"
        began = time.monotonic()
        with open(log_file, "w", encoding="utf-8") as output:
            result = subprocess.run(
                [self.airflow, "db", "migrate"],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=DAG_TEST_TIMEOUT_SECONDS,
                check=False,
            )
        if result.returncode != 0:
            raise DemoError(
                f"airflow db migrate failed with exit code {result.returncode}. "
                f"Last lines of {log_file}:\n{tail(log_file)}"
            )
        return time.monotonic() - began

    def run_dag(self, label: str) -> tuple[dict, float]:
        """Run ``airflow dags test`` once; return the export's ``last_run`` and the run's duration in seconds."""
        self.test_dag(DAG_ID, label)
        return self.read_last_run(), self.last_duration

    def test_dag(self, dag_id: str, label: str, conf: dict | None = None) -> None:
        """Run ``airflow dags test`` for ``dag_id``; raise :class:`DemoError` with the log tail when it fails."""
        log_file = self.logs / f"dags-test-{label}.log"
        command = [self.airflow, "dags", "test", dag_id]
        if conf is not None:
            command += ["-c", json.dumps(conf)]
        began = time.monotonic()
        with open(log_file, "w", encoding="utf-8") as output:
            result = subprocess.run(
                command,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=DAG_TEST_TIMEOUT_SECONDS,
                check=False,
            )
        self.last_duration = time.monotonic() - began
        if result.returncode != 0:
            error = last_exception(log_file)
            raise DemoError(
                f"Run {label}: airflow dags test {dag_id} failed with exit code {result.returncode} "
                f"after {self.last_duration:.1f} s. Last lines of {log_file}:\n{tail(log_file)}"
                + (f"\nLast exception in that log: {error}" if error else "")
            )

    def read_last_run(self) -> dict:
        with self.cluster.connect(DATABASE) as conn:
            row = conn.execute(
                f"SELECT last_run FROM {STATE_TABLE} WHERE export_name = %s", (EXPORT_NAME,)
            ).fetchone()
        if row is None or row[0] is None:
            raise DemoError(f"The export {EXPORT_NAME!r} has no last_run in {STATE_TABLE} after a successful run.")
        return row[0]

    def read_status(self) -> dict:
        with self.cluster.connect(DATABASE) as conn:
            return read_status(conn, STATE_TABLE, EXPORT_NAME)

    def read_exported(self, kind: str = "_xmin_") -> tuple[collections.Counter, int, int]:
        """Return the ids in objects whose name contains ``kind``, with counts, the object count and total bytes."""
        ids: collections.Counter = collections.Counter()
        objects = 0
        size = 0
        if not self.destination.is_dir():
            return ids, objects, size
        for path in sorted(self.destination.rglob("*.ndjson*")):
            if ".staging" in path.relative_to(self.destination).parts or kind not in path.name:
                continue
            data = path.read_bytes()
            objects += 1
            size += len(data)
            if path.name.endswith(".gz"):
                data = gzip.decompress(data)
            for line in data.decode("utf-8").splitlines():
                if line:
                    ids[json.loads(line)["id"]] += 1
        return ids, objects, size

    def read_anchored_at(self) -> datetime:
        with self.cluster.connect(DATABASE) as conn:
            return conn.execute(
                f"SELECT anchored_at FROM {STATE_TABLE} WHERE export_name = %s", (EXPORT_NAME,)
            ).fetchone()[0]

    def read_ids_up_to(self, last_history_id: int) -> set[int]:
        with self.cluster.connect(DATABASE) as conn:
            rows = conn.execute(f"SELECT id FROM {PARTITIONED_TABLE} WHERE id <= %s", (last_history_id,))
            return {row[0] for row in rows}

    def read_ids_after(self, last_history_id: int) -> set[int]:
        with self.cluster.connect(DATABASE) as conn:
            rows = conn.execute(f"SELECT id FROM {PARTITIONED_TABLE} WHERE id > %s", (last_history_id,))
            return {row[0] for row in rows}


def verify(demo: Demo, last_history_id: int) -> bool:
    """Compare the exported ids with the rows committed after the anchor; print the result."""
    expected = demo.read_ids_after(last_history_id)
    exported, objects, size = demo.read_exported()
    missing = sorted(expected - exported.keys())
    duplicated = sorted(row_id for row_id, count in exported.items() if count > 1)
    history = sorted(row_id for row_id in exported if row_id <= last_history_id)
    unknown = sorted(exported.keys() - expected - set(history))

    problems = []
    if not expected:
        problems.append("no rows were committed after the anchor, so there was nothing to verify")
    if missing:
        problems.append(f"{len(missing)} committed rows are missing from the destination, ids {sample(missing)}")
    if duplicated:
        problems.append(f"{len(duplicated)} rows were exported more than once, ids {sample(duplicated)}")
    if history:
        problems.append(f"{len(history)} history rows committed before the anchor were exported, ids {sample(history)}")
    if unknown:
        problems.append(f"{len(unknown)} exported ids are not in the table, ids {sample(unknown)}")

    status = demo.read_status()
    print(f"Rows exported: {sum(exported.values())} in {objects} objects, {size} bytes")
    print(f"Lag: {status['lag_xids']} xids, {status['lag_seconds']:.1f} s")
    print(f"Destination: {demo.destination}")
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}")
        return False
    print(
        f"Verified: all {len(expected)} rows committed after the anchor are in the destination exactly once, "
        f"and none of the {HISTORY_ROWS} history rows."
    )
    return True


def backfill_history(demo: Demo, last_history_id: int) -> bool:
    """Backfill the history before the anchor through ``audit_backfill``; check every history row arrives once."""
    anchored_at = demo.read_anchored_at()
    # A backfill's `to` is settled once it is older than every open transaction by floor_margin (60 s).
    settled_at = anchored_at + SETTLE_WAIT
    wait = (settled_at - datetime.now(timezone.utc)).total_seconds()
    if wait > 0:
        print(f"Waiting {wait:.0f} s until the anchor time is settled for a backfill")
        time.sleep(wait)
    window_from = (anchored_at - timedelta(days=HISTORY_DAYS + 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    conf = {"from": window_from.isoformat(), "to": anchored_at.isoformat()}
    demo.test_dag(BACKFILL_DAG_ID, "backfill", conf)
    print(f"Backfill of [{conf['from']}, {conf['to']}) done in {demo.last_duration:.1f} s")

    manifests = sorted((demo.destination / "manifests").glob("*.json"))
    if not manifests:
        print(f"FAILED: the backfill wrote no manifest under {demo.destination / 'manifests'}")
        return False
    totals = json.loads(manifests[-1].read_text(encoding="utf-8"))["totals"]
    print(
        f"Backfill summary: {totals['rows']} rows in {totals['objects']} objects, {totals['bytes']} bytes; "
        f"manifest {manifests[-1]}"
    )

    expected = demo.read_ids_up_to(last_history_id)
    exported, _, _ = demo.read_exported("_backfill_")
    missing = sorted(expected - exported.keys())
    duplicated = sorted(row_id for row_id, count in exported.items() if count > 1)
    if missing or duplicated:
        print(f"FAILED: backfill missed ids {sample(missing)} and duplicated ids {sample(duplicated)}")
        return False
    print(f"Verified: all {len(expected)} history rows are in the backfill objects exactly once.")
    return True


def sample(ids: list[int], limit: int = 10) -> str:
    listed = ", ".join(map(str, ids[:limit]))
    return listed + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def run_demo(cluster: PostgresCluster, runs: int, workdir: Path) -> bool:
    """Run the demo's steps on a started cluster; return whether the verification passed."""
    dags = find_dags_folder()
    airflow = find_airflow_command()

    home = workdir / ".demo" / "airflow-home"
    if home.exists():
        shutil.rmtree(home)
    (home / "demo-logs").mkdir(parents=True)
    demo = Demo(cluster, home, dags, airflow)
    if demo.dropped_env:
        print(f"Ignoring {len(demo.dropped_env)} inherited AIRFLOW_* and AUDIT_EXPORT_* variables")

    last_history_id = demo.prepare_database()
    print(f"Database {DATABASE}: reference schema and {HISTORY_ROWS} history rows over {HISTORY_DAYS} days")
    seconds = demo.migrate()
    print(f"Airflow home {home}: metadata database migrated in {seconds:.1f} s, logs in {demo.logs}")

    last_run, seconds = demo.run_dag("1")
    print(f"Run 1/{runs}: anchored and exported {last_run['rows']} rows, cursor {last_run['cursor']} ({seconds:.1f} s)")

    writer = BackgroundWriter(cluster, DATABASE)
    writer.start()
    print(f"Writer started: a batch of 1 to {WRITER_MAX_BATCH_ROWS} rows every {WRITER_INTERVAL_SECONDS} s")
    try:
        for number in range(2, runs + 1):
            hold = number % 2 == 0
            if hold:
                writer.open_held()
            last_run, seconds = demo.run_dag(str(number))
            note = f", a transaction with {HELD_TRANSACTION_ROWS} rows was open during the run" if hold else ""
            print(f"Run {number}/{runs}: exported {last_run['rows']} rows, cursor {last_run['cursor']}{note} ({seconds:.1f} s)")
            if hold:
                writer.commit_held()
        writer.wait_for_batches(MIN_WRITER_BATCHES)
    finally:
        writer.stop()
    print(
        f"Writer stopped: {writer.committed_rows} rows committed in {writer.batches} batches "
        f"and {writer.held_transactions} held transactions"
    )

    last_run, seconds = demo.run_dag("final")
    print(f"Final run: exported {last_run['rows']} rows, cursor {last_run['cursor']} ({seconds:.1f} s)")
    if not verify(demo, last_history_id):
        return False
    return backfill_history(demo, last_history_id)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_audit_export.testing.demo",
        description="Run the audit_export DAG against a throwaway PostgreSQL with live writes, then verify the export.",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=4,
        help="number of DAG runs while the writer is active, the first of which anchors (default: 4); "
        "one more run follows after the writer stops",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the PostgreSQL cluster running on exit and print its connection URI",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs is {args.runs}, but it must be at least 1.")
    return args


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `kill` and process supervisors send SIGTERM, which would otherwise end Python without running the cleanup.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    began = time.monotonic()

    cluster = PostgresCluster()
    try:
        cluster.start()
        print(f"PostgreSQL started on {cluster.host}:{cluster.port}")
        passed = run_demo(cluster, args.runs, Path.cwd())
    except DemoError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        passed = False
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        passed = False
    finally:
        if args.keep and cluster.data_dir.exists():
            # start() registered stop() to run at exit; --keep means the server outlives this process.
            atexit.unregister(cluster.stop)
            run_as = "runuser -u postgres -- " if os.geteuid() == 0 else ""
            print(f"PostgreSQL kept running: {cluster.uri(DATABASE)}")
            print(f"Stop it with: {run_as}{cluster.bin_dir / 'pg_ctl'} -D {cluster.data_dir} stop")
        else:
            cluster.cleanup()

    print(f"Demo {'passed' if passed else 'FAILED'} in {time.monotonic() - began:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
