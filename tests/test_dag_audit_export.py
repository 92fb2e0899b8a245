"""The audit_export DAG run by Airflow's own runner, ``airflow dags test``, against a throwaway PostgreSQL.

Each ``airflow dags test`` is a subprocess that took 20 to 40 s on a 2-core
machine, most of it Airflow's start-up, so the tests run as few of them as they can.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from airflow_audit_export.anchoring import anchor_export
from airflow_audit_export.settings import ExportSettings
from airflow_audit_export.testing.schema import EXPORT_ROLE, insert_rows
from airflow_audit_export.writing import parse_destination
from airflow_audit_export.testing.objects import exported_ids

AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAG_ID = "audit_export"
COMMAND_TIMEOUT_SECONDS = 600
OUTPUT_TAIL_LINES = 40

# The DAG retries a failed task twice, 30 s apart, which would add a minute to
# every failing run. This cluster policy sets retries to 0, so a failed first
# attempt fails the run and the exit code reports every task failure.
NO_RETRIES_POLICY = '''\
"""Cluster policy for the DAG tests: no task retries."""


def task_policy(task):
    task.retries = 0
'''


def tail(result: subprocess.CompletedProcess) -> str:
    return "\n".join(result.stdout.splitlines()[-OUTPUT_TAIL_LINES:])


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """Environment for Airflow subprocesses: the session's migrated AIRFLOW_HOME and the no-retries policy."""
    policy_dir = tmp_path_factory.mktemp("airflow-policy")
    (policy_dir / "airflow_local_settings.py").write_text(NO_RETRIES_POLICY, encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIT_EXPORT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(policy_dir), os.environ.get("PYTHONPATH")]))

    result = subprocess.run(
        [AIRFLOW, "db", "migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, f"airflow db migrate failed:\n{tail(result)}"
    return env


@pytest.fixture
def destination_uri(tmp_path) -> str:
    return f"file://{tmp_path / 'bucket'}"


@pytest.fixture
def run_dag(airflow_env, pg_cluster, database, destination_uri):
    """Run ``airflow dags test audit_export`` on the test database and destination; extra arguments are passed to it."""

    def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [AIRFLOW, "dags", "test", DAG_ID, *args],
            env={
                **airflow_env,
                "AIRFLOW_CONN_AUDIT_DB": pg_cluster.uri(database, user=EXPORT_ROLE),
                "AUDIT_EXPORT_DESTINATION": destination_uri,
                **env,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )

    return _run


def read_state(conn) -> tuple[int, list[dict]]:
    """Return the cursor and the gaps of the DAG's export, named ``audit`` by default."""
    row = conn.execute(
        "SELECT cursor_xid, gaps FROM public.audit_export_state WHERE export_name = 'audit'"
    ).fetchone()
    assert row is not None, "the state table has no row for the export 'audit'"
    return row[0], row[1]


def asset_event_extras(airflow_env: dict[str, str], uri: str) -> list[dict]:
    """Return the extra of every asset event for ``uri`` in the Airflow metadata database, oldest first."""
    metadata_db = Path(airflow_env["AIRFLOW_HOME"]) / "airflow.db"
    with closing(sqlite3.connect(metadata_db)) as db:
        rows = db.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = ? ORDER BY e.id",
            (uri,),
        ).fetchall()
    return [json.loads(extra) for (extra,) in rows]


def test_dag_runs_export_each_row_once(run_dag, connect, airflow_env, destination_uri):
    destination = parse_destination(destination_uri)
    conn = connect()
    insert_rows(conn, 6, seed=1)  # history: committed before the anchor, so not exported

    first = run_dag()
    assert first.returncode == 0, f"first run failed:\n{tail(first)}"
    assert exported_ids(destination) == []

    committed_ids = insert_rows(conn, 12, seed=2)
    held_conn = connect(autocommit=False)
    held_ids = insert_rows(held_conn, 4, seed=3)

    second = run_dag()
    assert second.returncode == 0, f"second run failed:\n{tail(second)}"
    assert sorted(exported_ids(destination)) == sorted(committed_ids)

    held_conn.commit()
    later_ids = insert_rows(conn, 9, seed=4)

    third = run_dag()
    assert third.returncode == 0, f"third run failed:\n{tail(third)}"
    ids = exported_ids(destination)
    assert len(ids) == len(set(ids)), "some rows were exported more than once"
    assert sorted(ids) == sorted(committed_ids + held_ids + later_ids)

    extras = asset_event_extras(airflow_env, destination_uri)
    assert [extra["rows"] for extra in extras] == [0, len(committed_ids), len(held_ids) + len(later_ids)]
    assert sum(extra["rows"] for extra in extras) == len(ids)


def test_dag_reanchor_records_gap(run_dag, connect, exporter_conn, destination_uri):
    anchor_export(exporter_conn, ExportSettings.create(name="audit", table="public.audit_partitioned"))
    conn = connect()
    cursor_before, gaps_before = read_state(conn)
    skipped = insert_rows(conn, 8, seed=5)

    result = run_dag("-c", '{"reanchor": true}')
    assert result.returncode == 0, f"re-anchor run failed:\n{tail(result)}"

    cursor_after, gaps = read_state(conn)
    assert gaps_before == []
    assert len(gaps) == 1
    gap = gaps[0]
    assert gap["reason"] == "re-anchor requested"
    assert gap["old_cursor"] == cursor_before
    assert gap["new_cursor"] >= cursor_before
    assert cursor_after >= gap["new_cursor"]

    # The rows committed between the anchor and the re-anchor are left to a backfill of the gap window.
    assert exported_ids(parse_destination(destination_uri)) == []
    first_stamp, last_stamp, inside = conn.execute(
        'SELECT min("timestamp"), max("timestamp"), bool_and("timestamp" >= %s::timestamptz '
        'AND "timestamp" < %s::timestamptz) FROM audit_partitioned WHERE id = ANY(%s)',
        (gap["from"], gap["to"], skipped),
    ).fetchone()
    assert inside, f"skipped rows stamped {first_stamp} to {last_stamp} are outside the gap [{gap['from']}, {gap['to']})"


def test_dag_missing_table_fails(run_dag):
    result = run_dag(AUDIT_EXPORT_TABLE="public.nope")

    assert result.returncode == 1, tail(result)
    assert "Source table 'public.nope' was not found" in result.stdout, tail(result)


def test_dag_unsupported_destination_fails(run_dag):
    result = run_dag(AUDIT_EXPORT_DESTINATION="ftp://x")

    assert result.returncode == 1, tail(result)
    assert "scheme 'ftp' is not supported" in result.stdout, tail(result)


def test_providers_list_shows_package(airflow_env):
    result = subprocess.run(
        [AIRFLOW, "providers", "list"],
        env=airflow_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, tail(result)
    assert "airflow-audit-export" in result.stdout, tail(result)
