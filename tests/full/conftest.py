"""Fixtures of the full-stack tests: Airflow's own processes against a throwaway PostgreSQL, on 127.0.0.1.

Each stack gets its own PostgreSQL cluster with two databases, ``airflow_meta``
(Airflow's metadata) and ``audit`` (the source table, exported as the
least-privilege role), its own ``AIRFLOW_HOME`` and a local destination folder.
The scheduler, API server, DAG processor and triggerer run as subprocesses that
log to files. A failed test prints the tails of those logs and of the failed
task logs.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

# One INFO line per REST request would bury the failure output.
logging.getLogger("httpx").setLevel(logging.WARNING)

# The test process never imports Airflow, but point AIRFLOW_HOME at a temporary folder anyway,
# so an import by a helper cannot read or create the developer's own Airflow home.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="audit-export-full-client-home-")

from airflow_audit_export.testing.pgcluster import PostgresCluster, find_free_port  # noqa: E402
from airflow_audit_export.testing.schema import (  # noqa: E402
    EXPORT_ROLE,
    apply_export_role,
    create_reference_schema,
    insert_rows,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO_ROOT / "dags"
AIRFLOW_BIN = Path(sys.executable).with_name("airflow")

META_DATABASE = "airflow_meta"
SOURCE_DATABASE = "audit"
SOURCE_TABLE = "public.audit_partitioned"
STATE_TABLE = "public.audit_export_state"
EXPORT_NAME = "audit"

PROCESSES = {
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}
# Environment variables of the test process that would change the stack's configuration.
DROPPED_ENV_PREFIXES = ("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "AUDIT_EXPORT_", "AUDIT_BACKFILL_")

MIGRATE_TIMEOUT_SECONDS = 240
READY_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 20
LOG_TAIL_LINES = 40
TASK_LOG_TAIL_LINES = 60
TASK_LOGS_SHOWN = 3


class StackError(AssertionError):
    """A stack step that failed or timed out. The message contains the process log tails."""


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a text file, or a note when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} not found)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


class AirflowStack:
    """Airflow 3 scheduler, API server, DAG processor and triggerer with LocalExecutor, on one PostgreSQL cluster."""

    def __init__(self, base_dir: Path, extra_env: dict[str, str]) -> None:
        self.base_dir = base_dir
        self.home = base_dir / "airflow-home"
        self.logs = base_dir / "process-logs"
        self.bucket = base_dir / "bucket"
        for folder in (self.home, self.logs, self.bucket):
            folder.mkdir(parents=True, exist_ok=True)
        self.destination = f"file://{self.bucket}"
        self.extra_env = dict(extra_env)
        self.cluster: PostgresCluster | None = None
        self.api_port = find_free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_handles: list = []
        self._client: httpx.Client | None = None
        self.env: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> dict[str, float]:
        """Start PostgreSQL, migrate the metadata database and start the four processes.

        Returns the seconds that each step took.
        """
        timings = {}
        began = time.monotonic()
        # The cluster lives outside the Airflow home, because as root its base folder is chowned to postgres.
        self.cluster = PostgresCluster(self.base_dir / "pg").start()
        self.cluster.create_database(META_DATABASE)
        self.cluster.create_database(SOURCE_DATABASE)
        today = datetime.now(timezone.utc).date()
        with self.cluster.connect(SOURCE_DATABASE) as conn:
            create_reference_schema(conn, first_day=today - timedelta(days=40), last_day=today + timedelta(days=3))
            apply_export_role(conn)
        timings["postgres"] = time.monotonic() - began

        self.env = self._build_env()
        began = time.monotonic()
        self._migrate()
        timings["db migrate"] = time.monotonic() - began

        began = time.monotonic()
        api_command = ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        for name, command in {"api-server": api_command, **PROCESSES}.items():
            self._spawn(name, command)
        self._wait_ready()
        timings["processes ready"] = time.monotonic() - began
        return timings

    def stop(self) -> None:
        """Stop the processes (SIGTERM to each process group, SIGKILL after a timeout), then PostgreSQL."""
        if self._client is not None:
            self._client.close()
            self._client = None
        for name, process in self.processes.items():
            if process.poll() is None:
                self._signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for name, process in self.processes.items():
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {process.pid}) did not stop within {STOP_TIMEOUT_SECONDS} s; killing it")
                self._signal_group(process, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            # Task supervisors that LocalExecutor forked stay in the group after the parent exits.
            self._signal_group(process, signal.SIGKILL)
        for handle in self._log_handles:
            handle.close()
        self._log_handles.clear()
        if self.cluster is not None:
            self.cluster.stop()

    def _build_env(self) -> dict[str, str]:
        assert self.cluster is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM="8",
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__UNIT_TEST_MODE="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=(
                f"postgresql+psycopg://{self.cluster.superuser}@127.0.0.1:{self.cluster.port}/{META_DATABASE}"
            ),
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
            AIRFLOW__API__BASE_URL=self.api_url,
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(self.api_port),
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.api_url}/execution/",
            AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="10",
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
            AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
            AIRFLOW_CONN_AUDIT_DB=self.cluster.uri(SOURCE_DATABASE, user=EXPORT_ROLE),
            AUDIT_EXPORT_SCHEDULE="* * * * *",
            AUDIT_EXPORT_DESTINATION=self.destination,
        )
        env.update(self.extra_env)
        return env

    def _migrate(self) -> None:
        log_file = self.logs / "db-migrate.log"
        with open(log_file, "w", encoding="utf-8") as output:
            try:
                result = subprocess.run(
                    [str(AIRFLOW_BIN), "db", "migrate"],
                    env=self.env,
                    cwd=self.home,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    timeout=MIGRATE_TIMEOUT_SECONDS,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise StackError(
                    f"airflow db migrate timed out after {MIGRATE_TIMEOUT_SECONDS} s. "
                    f"Last lines of {log_file}:\n{tail(log_file)}"
                ) from None
        if result.returncode != 0:
            raise StackError(
                f"airflow db migrate failed with exit code {result.returncode}. "
                f"Last lines of {log_file}:\n{tail(log_file)}"
            )

    def _spawn(self, name: str, command: list[str]) -> None:
        handle = open(self.logs / f"{name}.log", "w", encoding="utf-8")
        self._log_handles.append(handle)
        # A new session per process gives it its own process group, so stop() reaches its children too.
        self.processes[name] = subprocess.Popen(
            [str(AIRFLOW_BIN), *command],
            env=self.env,
            cwd=self.home,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_ready(self) -> None:
        """Wait until the API server responds and reports a healthy scheduler, DAG processor and triggerer."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        last = "no answer yet"
        while time.monotonic() < deadline:
            self.check_processes()
            try:
                response = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5)
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    health = response.json()
                    statuses = {
                        part: (health.get(part) or {}).get("status")
                        for part in ("metadatabase", "scheduler", "dag_processor", "triggerer")
                    }
                    if all(status == "healthy" for status in statuses.values()):
                        return
                    last = f"health {statuses}"
                else:
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
            time.sleep(1)
        raise StackError(
            f"The stack was not healthy within {READY_TIMEOUT_SECONDS} s (last check: {last}).\n{self.describe()}"
        )

    def fail(self, message: str) -> NoReturn:
        """Raise :class:`StackError` with ``message`` followed by the process and task log tails."""
        raise StackError(f"{message}\n{self.describe()}")

    def check_processes(self) -> None:
        """Raise :class:`StackError` with the log tail when a process has exited."""
        for name, process in self.processes.items():
            code = process.poll()
            if code is not None:
                raise StackError(
                    f"airflow {name} (pid {process.pid}) exited with code {code}. "
                    f"Last lines of {self.logs / (name + '.log')}:\n{tail(self.logs / (name + '.log'))}"
                )

    # -- diagnostics ---------------------------------------------------------

    def describe(self) -> str:
        """Return the tails of every process log and of the newest failed task logs."""
        parts = []
        for log_file in sorted(self.logs.glob("*.log")):
            parts.append(f"===== last {LOG_TAIL_LINES} lines of {log_file} =====\n{tail(log_file)}")
        task_logs = sorted(
            (self.home / "logs").glob("dag_id=*/run_id=*/task_id=*/**/attempt=*.log"),
            key=lambda path: path.stat().st_mtime,
        )
        failed = [path for path in task_logs if _looks_failed(path)]
        for log_file in failed[-TASK_LOGS_SHOWN:]:
            parts.append(
                f"===== last {TASK_LOG_TAIL_LINES} lines of task log {log_file} =====\n"
                f"{tail(log_file, TASK_LOG_TAIL_LINES)}"
            )
        if not failed:
            parts.append(f"(no failed task logs among {len(task_logs)} under {self.home / 'logs'})")
        return "\n".join(parts)

    # -- REST API ------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        """REST client with a token from the simple auth manager (``GET /auth/token`` in all-admins mode)."""
        if self._client is None:
            response = httpx.get(f"{self.api_url}/auth/token", timeout=30)
            if response.status_code not in (200, 201):
                raise StackError(f"GET /auth/token returned HTTP {response.status_code}: {response.text[:500]}")
            token = response.json()["access_token"]
            self._client = httpx.Client(
                base_url=f"{self.api_url}/api/v2",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
        return self._client

    def api(self, method: str, path: str, *, expected: tuple[int, ...] = (200,), **kwargs) -> dict:
        """Send one REST request under ``/api/v2`` and return its JSON body, or raise on an unexpected status."""
        response = self.client.request(method, path, **kwargs)
        if response.status_code not in expected:
            raise StackError(
                f"{method} /api/v2{path} returned HTTP {response.status_code}, expected {expected}: "
                f"{response.text[:1000]}"
            )
        return response.json()

    def wait_for_dag(self, dag_id: str, timeout: float = 90) -> dict:
        """Wait until the DAG processor has parsed ``dag_id`` without import errors, and return the DAG."""

        def parsed() -> dict | None:
            response = self.client.get(f"/dags/{dag_id}")
            if response.status_code == 200:
                return response.json()
            errors = self.api("GET", "/importErrors")["import_errors"]
            if errors:
                raise StackError(f"The DAG processor reports import errors: {json.dumps(errors, indent=2)[:3000]}")
            return None

        return self.wait_for(f"DAG {dag_id} parsed", parsed, timeout=timeout)

    def set_paused(self, dag_id: str, paused: bool) -> None:
        body = self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})
        assert body["is_paused"] is paused, f"PATCH /dags/{dag_id} returned is_paused={body['is_paused']}"

    def dag_runs(self, dag_id: str, **params) -> list[dict]:
        """Return the runs of ``dag_id`` in creation order, filtered by REST ``params`` such as ``run_type``."""
        body = self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "id", **params})
        return body["dag_runs"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        """Return a task instance's ``return_value`` XCom."""
        body = self.api(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
            params={"map_index": map_index},
        )
        return body["value"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        body = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {(ti["task_id"], ti["map_index"]): ti for ti in body["task_instances"]}

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        """Wait until a run finishes, and raise with its task states and the logs unless it succeeded."""

        def finished() -> dict | None:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            return None

        run = self.wait_for(f"run {run_id} of {dag_id} finished", finished, timeout=timeout)
        if run["state"] != "success":
            raise StackError(f"Run {run_id} of {dag_id} ended {run['state']}.\n{self.describe_run(dag_id, run_id)}")
        return run

    def describe_run(self, dag_id: str, run_id: str) -> str:
        states = [
            f"{task_id}[{map_index}]: {ti['state']} (try {ti['try_number']})"
            for (task_id, map_index), ti in sorted(self.task_instances(dag_id, run_id).items())
        ]
        return "Task instances: " + ", ".join(states)

    def wait_for(self, what: str, check: Callable[[], object], *, timeout: float, interval: float = 2) -> object:
        """Call ``check`` until it returns a truthy value, and raise :class:`StackError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_processes()
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise StackError(f"Timed out after {timeout:.0f} s waiting for {what}.\n{self.describe()}")
            time.sleep(interval)

    # -- source database and destination --------------------------------------

    def read_state(self) -> dict | None:
        """Return the export's state row, read as the superuser, or None before the first anchor."""
        assert self.cluster is not None
        with self.cluster.connect(SOURCE_DATABASE) as conn:
            if conn.execute("SELECT to_regclass(%s)", (STATE_TABLE,)).fetchone()[0] is None:
                return None
            cursor = conn.execute(f"SELECT * FROM {STATE_TABLE} WHERE export_name = %s", (EXPORT_NAME,))
            row = cursor.fetchone()
            if row is None:
                return None
            return dict(zip([column.name for column in cursor.description], row))

    def max_xmin(self, ids: list[int]) -> int:
        """Return the largest xid that wrote one of ``ids``.

        The cluster is new, so its xid epoch is 0 and a row's 32-bit ``xmin``
        equals the 64-bit xid that the export's cursor counts.
        """
        assert self.cluster is not None
        with self.cluster.connect(SOURCE_DATABASE) as conn:
            row = conn.execute(
                f"SELECT max(xmin::text::bigint) FROM {SOURCE_TABLE} WHERE id = ANY(%s)", (ids,)
            ).fetchone()
            return row[0]

    def read_objects(self) -> dict[str, list[int]]:
        """Return the ids in every published object of the destination, keyed by relative key."""
        objects = {}
        for path in sorted(self.bucket.rglob("*.ndjson*")):
            relative = path.relative_to(self.bucket)
            if relative.parts[0].startswith("."):
                continue
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                data = gzip.decompress(data)
            objects[str(relative)] = [json.loads(line)["id"] for line in data.decode("utf-8").splitlines() if line]
        return objects


def _looks_failed(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "Traceback" in text or '"level":"error"' in text or "Task failed" in text


@dataclass
class InsertedBatch:
    """Rows committed by one transaction, with the client time just before the commit was sent."""

    ids: list[int]
    commit_sent_at: datetime
    held: bool = False
    committed_by_stop: bool = False


@dataclass
class RowWriter:
    """Background thread that keeps inserting rows with ``DEFAULT now()`` timestamps into the source table.

    Small batches commit at once (autocommit). With ``hold_seconds`` set, a
    second connection keeps one transaction open for that long, so it spans a
    scheduled run, then commits it and opens the next after ``hold_pause``.
    """

    cluster: PostgresCluster
    interval: float = 0.5
    hold_seconds: float | None = None
    hold_pause: float = 15.0
    batches: list[InsertedBatch] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="row-writer", daemon=True)

    def start(self) -> RowWriter:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> list[InsertedBatch]:
        """Stop inserting, commit an open held transaction, and return every committed batch."""
        self._stop.set()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            raise StackError("The row writer thread did not stop within 60 s.")
        if self.error is not None:
            raise StackError(f"The row writer failed: {self.error!r}") from self.error
        return self.committed()

    def committed(self) -> list[InsertedBatch]:
        with self._lock:
            return list(self.batches)

    def add_committed(self, ids: list[int], commit_sent_at: datetime, *, held: bool = False) -> None:
        """Record rows that the test committed on its own connection, so the checks include them."""
        self._record(InsertedBatch(ids, commit_sent_at, held=held))

    def _record(self, batch: InsertedBatch) -> None:
        with self._lock:
            self.batches.append(batch)

    def _run(self) -> None:
        rng = random.Random(7)
        number = 0
        held_ids: list[int] = []
        held_since = 0.0
        next_hold = time.monotonic() + 5
        try:
            with (
                self.cluster.connect(SOURCE_DATABASE) as conn,
                self.cluster.connect(SOURCE_DATABASE, autocommit=False) as held_conn,
            ):
                while not self._stop.is_set():
                    number += 1
                    sent_at = datetime.now(timezone.utc)
                    ids = insert_rows(conn, rng.randint(1, 20), seed=number, workspace="full-stack")
                    self._record(InsertedBatch(ids, sent_at))

                    now = time.monotonic()
                    if self.hold_seconds is not None:
                        if not held_ids and now >= next_hold:
                            # The transaction gets its xid here, so from now on it keeps the export's cursor back.
                            held_ids = insert_rows(held_conn, 25, seed=-number, workspace="full-stack-held")
                            held_since = now
                        elif held_ids and now - held_since >= self.hold_seconds:
                            self._commit_held(held_conn, held_ids)
                            held_ids = []
                            next_hold = now + self.hold_pause
                    self._stop.wait(self.interval)
                if held_ids:
                    self._commit_held(held_conn, held_ids, committed_by_stop=True)
        except BaseException as err:  # noqa: BLE001 - stop() re-raises it in the test thread
            self.error = err

    def _commit_held(self, held_conn, held_ids: list[int], *, committed_by_stop: bool = False) -> None:
        sent_at = datetime.now(timezone.utc)
        held_conn.commit()
        self._record(InsertedBatch(held_ids, sent_at, held=True, committed_by_stop=committed_by_stop))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Store each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    if call.excinfo is not None and call.excinfo.errisinstance(StackError):
        # The message already contains the log tails, so the fixture does not print them again.
        item.logs_in_failure_message = True
    return report


@pytest.fixture
def start_stack(request, tmp_path_factory) -> Iterator[Callable[..., AirflowStack]]:
    """Start an Airflow stack with extra environment variables, and stop it at teardown.

    When the test failed, the log tails are printed and the stack folder is kept.
    """
    stacks: list[AirflowStack] = []

    def _start(extra_env: dict[str, str] | None = None) -> AirflowStack:
        # A short base path keeps the PostgreSQL socket path under the Unix limit.
        base = Path(tempfile.mkdtemp(prefix="afstack-"))
        # As root, the PostgreSQL programs run as the postgres user, which must enter this folder.
        base.chmod(0o755)
        stack = AirflowStack(base, extra_env or {})
        stacks.append(stack)
        timings = stack.start()
        print("\nStack started: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items()))
        print(f"Stack folder: {base}, API server {stack.api_url}")
        return stack

    yield _start

    failed = any(
        getattr(request.node, f"report_{when}", None) is not None
        and getattr(request.node, f"report_{when}").failed
        for when in ("setup", "call")
    )
    logs_shown = getattr(request.node, "logs_in_failure_message", False)
    for stack in stacks:
        if failed and not logs_shown:
            print(f"\n----- Logs of the stack in {stack.base_dir} -----\n{stack.describe()}")
        stack.stop()
        if failed:
            print(f"Kept the stack folder {stack.base_dir} for inspection")
        else:
            shutil.rmtree(stack.base_dir, ignore_errors=True)


@pytest.fixture
def start_row_writer() -> Iterator[Callable[..., RowWriter]]:
    """Start a :class:`RowWriter` on a stack's cluster. Teardown stops a writer that is still running."""
    writers: list[RowWriter] = []

    def _start(stack: AirflowStack, *, hold_seconds: float | None = None) -> RowWriter:
        assert stack.cluster is not None
        writer = RowWriter(stack.cluster, hold_seconds=hold_seconds).start()
        writers.append(writer)
        return writer

    yield _start

    for writer in writers:
        if writer.running:
            try:
                writer.stop()
            except StackError as err:
                print(f"Row writer stopped at teardown: {err}")
