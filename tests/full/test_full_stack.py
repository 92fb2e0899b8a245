"""End-to-end tests with Airflow's real scheduler, API server, DAG processor and triggerer (no Docker).

Every interaction with Airflow goes through its REST API: unpausing and pausing
``audit_export``, triggering ``audit_backfill``, and reading runs, mapped task
instances, XComs and Asset events. The source rows and the state table are read
from PostgreSQL as the superuser, and the destination is a local folder.

Both tests wait for minute-based cron runs, so each takes several minutes.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from airflow_audit_export.testing.schema import insert_rows

if TYPE_CHECKING:
    # Only for annotations: tests/conftest.py is imported under the same module name, so the
    # helpers reach the tests through the fixtures start_stack and start_row_writer.
    from conftest import AirflowStack, InsertedBatch

HISTORY_ROWS = 3_000
HISTORY_PAGE_ROWS = 250
RANGE_LABEL = re.compile(r"^\d{4}-\d{2}-\d{2}( \S+)? to \d{4}-\d{2}-\d{2}( \S+)? \(~\d+ rows\)$")

# Seconds that each wait allows for cron runs and task start-up. A run starts every minute.
FIRST_RUN_TIMEOUT = 150
NEXT_RUN_TIMEOUT = 150
BACKFILL_TIMEOUT = 240

# The writer opens its first held transaction 5 s after it starts, before the DAG is unpaused, so the
# transaction is open during the first run. It commits 45 s later, before the second run after the first
# can start, and the next held transaction stays open until the writer stops.
HOLD_SECONDS = 45

# The backlog age that makes the anchor re-anchor in the pause test. Steady-state runs start every
# minute, so the usual backlog at an anchor is about 60 s. The pause lasts until the backlog exceeds
# this plus PAUSE_MARGIN_SECONDS.
PAUSE_MAX_BACKLOG_SECONDS = 75
PAUSE_MARGIN_SECONDS = 10


class PhaseClock:
    """Measure and print the duration of each named phase of a test."""

    def __init__(self, test_name: str) -> None:
        self.test_name = test_name
        self.began = time.monotonic()

    @contextmanager
    def phase(self, name: str):
        began = time.monotonic()
        try:
            yield
        finally:
            print(f"[{self.test_name}] {name}: {time.monotonic() - began:.1f} s")

    def total(self) -> None:
        print(f"[{self.test_name}] total: {time.monotonic() - self.began:.1f} s")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def successful_runs(stack: AirflowStack, dag_id: str, **params) -> list[dict]:
    return [run for run in stack.dag_runs(dag_id, **params) if run["state"] == "success"]


def fail_on_failed_runs(stack: AirflowStack, dag_id: str) -> None:
    """Raise with the task states and logs as soon as a run of ``dag_id`` has failed."""
    for run in stack.dag_runs(dag_id, state="failed"):
        stack.fail(f"Run {run['dag_run_id']} of {dag_id} failed.\n{stack.describe_run(dag_id, run['dag_run_id'])}")


def wait_for_scheduled_success(stack: AirflowStack, *, started_after: datetime, what: str, timeout: float) -> dict:
    """Wait for a successful scheduled run of ``audit_export`` that started after ``started_after``."""

    def found() -> dict | None:
        fail_on_failed_runs(stack, "audit_export")
        for run in successful_runs(stack, "audit_export", run_type="scheduled"):
            if parse_time(run["start_date"]) > started_after:
                return run
        return None

    return stack.wait_for(what, found, timeout=timeout)


def wait_for_cursor_past(stack: AirflowStack, batches: list[InsertedBatch], *, timeout: float) -> int:
    """Wait for a successful scheduled run that started after the last insert and for the cursor to pass every row.

    Returns the number of successful scheduled runs that started after the last
    insert. A run moves the cursor to its snapshot's ``xmin``. A transaction
    that was in progress at that instant, even one of Airflow's own in
    ``airflow_meta`` (xids are shared by the whole cluster), keeps the cursor
    below it, so the last rows can take one more run.
    """
    target = stack.max_xmin([row_id for batch in batches for row_id in batch.ids])
    stopped_at = datetime.now(timezone.utc)

    def runs_after_stop() -> list[dict]:
        fail_on_failed_runs(stack, "audit_export")
        runs = successful_runs(stack, "audit_export", run_type="scheduled")
        return [run for run in runs if parse_time(run["start_date"]) > stopped_at]

    def passed() -> bool:
        if not runs_after_stop():
            return False
        state = stack.read_state()
        return state["cursor_xid"] > target

    stack.wait_for(f"a new run and the export cursor past xid {target}", passed, timeout=timeout)
    return len(runs_after_stop())


def split_objects(objects: dict[str, list[int]]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Split destination objects into steady-state (xmin) and backfill objects by their key."""
    steady = {key: ids for key, ids in objects.items() if "_xmin_" in key}
    backfill = {key: ids for key, ids in objects.items() if "_backfill_" in key}
    unknown = sorted(set(objects) - set(steady) - set(backfill))
    assert not unknown, f"Objects with unexpected keys in the destination: {unknown}"
    return steady, backfill


def trigger_backfill(stack: AirflowStack, conf: dict) -> str:
    body = stack.api(
        "POST",
        "/dags/audit_backfill/dagRuns",
        json={"logical_date": None, "conf": conf},
        expected=(200,),
    )
    return body["dag_run_id"]


def insert_history(stack: AirflowStack, start: datetime, end: datetime) -> list[int]:
    """Insert the history rows with timestamps in ``[start, end)`` and analyze the table for the planner."""
    with stack.cluster.connect("audit") as conn:
        ids = insert_rows(conn, HISTORY_ROWS, start=start, end=end, seed=11, workspace="full-stack-history")
        conn.execute("ANALYZE public.audit_partitioned")
    return ids


@pytest.mark.timeout(600)
def test_scheduled_export_and_backfill(start_stack, start_row_writer):
    clock = PhaseClock("scheduled export and backfill")
    with clock.phase("stack start"):
        stack = start_stack()
        stack.wait_for_dag("audit_export")
        stack.wait_for_dag("audit_backfill")
        # DAGs are paused at creation, and the scheduler does not start runs of a paused DAG, triggered or not.
        stack.set_paused("audit_backfill", False)

    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    window_from, window_to = today - timedelta(days=9), today - timedelta(days=2)
    with clock.phase("history insert"):
        history_ids = insert_history(stack, window_from, window_to)

    writer = start_row_writer(stack, hold_seconds=HOLD_SECONDS)
    try:
        unpaused_at = datetime.now(timezone.utc)
        stack.set_paused("audit_export", False)

        with clock.phase("first scheduled run"):
            first_run = wait_for_scheduled_success(
                stack, started_after=unpaused_at, what="the first scheduled run", timeout=FIRST_RUN_TIMEOUT
            )
        state = stack.read_state()
        assert state is not None, "The first successful run left no state row"
        anchored_at = state["anchored_at"]

        # The history window is settled and is no gap, so the backfill runs while the scheduler keeps exporting.
        backfill_conf = {
            "from": window_from.isoformat(),
            "to": window_to.isoformat(),
            "page_rows": HISTORY_PAGE_ROWS,
        }
        backfill_run_id = trigger_backfill(stack, backfill_conf)

        # Unpausing starts a run for the last cron tick at once, and the next tick can follow within
        # seconds. Two runs that start after the anchoring run give at least one full minute of
        # steady-state export, with a held transaction committing in between.
        with clock.phase("two more scheduled runs"):
            first_run_ended = parse_time(first_run["end_date"])

            def two_more_successes() -> bool:
                fail_on_failed_runs(stack, "audit_export")
                runs = successful_runs(stack, "audit_export", run_type="scheduled")
                return sum(parse_time(run["start_date"]) > first_run_ended for run in runs) >= 2

            stack.wait_for("two more successful scheduled runs", two_more_successes, timeout=2 * NEXT_RUN_TIMEOUT)
    finally:
        batches = writer.stop()

    with clock.phase("runs after the last insert"):
        extra_runs = wait_for_cursor_past(stack, batches, timeout=2 * NEXT_RUN_TIMEOUT)
    print(f"[scheduled export and backfill] scheduled runs after the last insert: {extra_runs}")

    with clock.phase("backfill"):
        stack.wait_for_run("audit_backfill", backfill_run_id, timeout=BACKFILL_TIMEOUT)

    # Steady-state export: exactly once for every row whose commit was sent after the anchor's snapshot.
    objects = stack.read_objects()
    steady, backfill = split_objects(objects)
    counts = Counter(row_id for ids in objects.values() for row_id in ids)
    after_anchor = [row_id for batch in batches if batch.commit_sent_at > anchored_at for row_id in batch.ids]
    before_anchor = [row_id for batch in batches if batch.commit_sent_at <= anchored_at for row_id in batch.ids]
    held = [row_id for batch in batches if batch.held and batch.commit_sent_at > anchored_at for row_id in batch.ids]
    print(
        f"[scheduled export and backfill] rows after the anchor: {len(after_anchor)} "
        f"({len(held)} in held transactions), before: {len(before_anchor)}, objects: {len(steady)} steady-state, "
        f"{len(backfill)} backfill"
    )
    assert held, "No held transaction committed after the anchor, so none spanned a run"
    held_during_runs = [batch for batch in batches if batch.held and not batch.committed_by_stop]
    assert held_during_runs, "No held transaction committed while the scheduler was running exports"
    missing = [row_id for row_id in after_anchor if counts[row_id] == 0]
    repeated = [row_id for row_id in after_anchor if counts[row_id] > 1]
    assert not missing, f"{len(missing)} rows committed after the anchor are missing, for example {missing[:10]}"
    assert not repeated, f"{len(repeated)} rows were exported more than once, for example {repeated[:10]}"
    repeated_before = [row_id for row_id in before_anchor if counts[row_id] > 1]
    assert not repeated_before, f"Rows committed before the anchor were exported twice: {repeated_before[:10]}"

    # Backfill through the REST API: mapped ranges with their labels and XComs, then the summary.
    mapped = stack.api("GET", f"/dags/audit_backfill/dagRuns/{backfill_run_id}/taskInstances/export_range/listMapped")
    ranges = mapped["task_instances"]
    assert ranges, "audit_backfill ran no export_range task"
    range_rows = 0
    for ti in ranges:
        assert ti["state"] == "success", f"export_range[{ti['map_index']}] ended {ti['state']}"
        label = ti["rendered_map_index"]
        assert label and RANGE_LABEL.match(label), f"Unexpected range label {label!r}"
        result = stack.xcom("audit_backfill", backfill_run_id, "export_range", map_index=ti["map_index"])
        assert result["label"] == label, f"XCom label {result['label']!r} differs from the map index {label!r}"
        assert result["rows"] == sum(item["rows"] for item in result["objects"]), f"Range {label}: rows {result}"
        range_rows += result["rows"]
        print(f"[scheduled export and backfill] range {label}: {result['rows']} rows, {len(result['objects'])} objects")
    assert range_rows == HISTORY_ROWS, f"The ranges exported {range_rows} rows, expected {HISTORY_ROWS}"

    summary = stack.xcom("audit_backfill", backfill_run_id, "summary")
    assert summary["rows"] == HISTORY_ROWS, f"Summary rows {summary['rows']}, expected {HISTORY_ROWS}"
    assert summary["objects"] == len(backfill), f"Summary objects {summary['objects']}, files {len(backfill)}"
    assert summary["ranges"] == len(ranges), f"Summary ranges {summary['ranges']}, mapped tasks {len(ranges)}"
    backfilled = Counter(row_id for ids in backfill.values() for row_id in ids)
    assert sorted(backfilled) == sorted(history_ids), "The backfill objects do not hold exactly the history rows"
    assert max(backfilled.values()) == 1, "A history row is in two backfill objects"

    # Asset events of the export task: one per successful export, with the run's figures.
    destination = stack.destination.rstrip("/")
    assets = stack.api("GET", "/assets", params={"uri_pattern": str(stack.bucket)})["assets"]
    matching = [asset for asset in assets if asset["uri"] == destination]
    assert len(matching) == 1, f"Expected one asset with URI {destination}, found {[a['uri'] for a in assets]}"
    events = stack.api("GET", "/assets/events", params={"asset_id": matching[0]["id"], "limit": 100})["asset_events"]
    export_successes = 0
    for run in stack.dag_runs("audit_export"):
        task = stack.task_instances("audit_export", run["dag_run_id"]).get(("export", -1))
        export_successes += task is not None and task["state"] == "success"
    assert len(events) == export_successes, f"{len(events)} Asset events for {export_successes} successful exports"
    for event in events:
        assert event["source_dag_id"] == "audit_export", f"Asset event from {event['source_dag_id']}"
        for key in ("rows", "objects", "bytes"):
            assert isinstance(event["extra"].get(key), int), f"Asset event extra lacks {key}: {event['extra']}"
    exporting_runs = [event for event in events if event["extra"]["rows"] > 0]
    assert len(exporting_runs) >= 2, f"Only {len(exporting_runs)} scheduled runs exported rows: {events}"
    steady_rows = sum(len(ids) for ids in steady.values())
    steady_bytes = sum((stack.bucket / key).stat().st_size for key in steady)
    assert sum(e["extra"]["rows"] for e in events) == steady_rows, "Asset event rows differ from the exported rows"
    assert sum(e["extra"]["objects"] for e in events) == len(steady), "Asset event objects differ from the files"
    assert sum(e["extra"]["bytes"] for e in events) == steady_bytes, "Asset event bytes differ from the file sizes"
    clock.total()


@pytest.mark.timeout(600)
def pause_between_runs(stack: AirflowStack, dag_id: str, *, timeout: float) -> datetime:
    """Pause ``dag_id`` while none of its runs is running, and return when it was paused.

    The scheduler starts no further task of a paused DAG, so a run caught between its anchor and
    export tasks would wait for the unpause and then export the backlog without re-anchoring.
    Such a run is let finish unpaused, and the pause is tried again.
    """
    deadline = time.monotonic() + timeout
    while True:
        stack.set_paused(dag_id, True)
        paused_at = datetime.now(timezone.utc)
        # A run that the scheduler moved to running in the same moment shows up on the second read.
        time.sleep(3)
        if not stack.dag_runs(dag_id, state=["running"]):
            return paused_at
        assert time.monotonic() < deadline, f"{dag_id} always had a running run when paused"
        stack.set_paused(dag_id, False)
        stack.wait_for(
            "the run running at the pause to finish",
            lambda: not stack.dag_runs(dag_id, state=["running"]),
            timeout=NEXT_RUN_TIMEOUT,
        )


def test_pause_reanchors_and_backfills_gap(start_stack, start_row_writer):
    clock = PhaseClock("pause and unpause")
    with clock.phase("stack start"):
        stack = start_stack({"AUDIT_EXPORT_MAX_BACKLOG_SECONDS": str(PAUSE_MAX_BACKLOG_SECONDS)})
        stack.wait_for_dag("audit_export")
        stack.wait_for_dag("audit_backfill")
        # The backfill_gap task only triggers audit_backfill, and runs of a paused DAG stay queued.
        stack.set_paused("audit_backfill", False)

    writer = start_row_writer(stack)
    # A transaction opened while paused and committed after the re-anchor: the new cursor must stay below it.
    held_conn = stack.cluster.connect("audit", autocommit=False)
    try:
        unpaused_at = datetime.now(timezone.utc)
        stack.set_paused("audit_export", False)
        with clock.phase("first scheduled run"):
            wait_for_scheduled_success(
                stack, started_after=unpaused_at, what="the first scheduled run", timeout=FIRST_RUN_TIMEOUT
            )
        paused_at = pause_between_runs(stack, "audit_export", timeout=3 * NEXT_RUN_TIMEOUT)
        first_anchor = stack.read_state()
        assert first_anchor is not None, "The first successful run left no state row"

        with clock.phase("paused"):
            # A run still queued at the pause only starts after the unpause, so it counts as a run after it.
            fail_on_failed_runs(stack, "audit_export")
            runs_before_unpause = {
                run["dag_run_id"] for run in stack.dag_runs("audit_export") if run["state"] != "queued"
            }
            exported_through = stack.read_state()["exported_through"]
            unpause_at = exported_through + timedelta(seconds=PAUSE_MAX_BACKLOG_SECONDS + PAUSE_MARGIN_SECONDS)
            stack.wait_for(
                f"the backlog to pass {PAUSE_MAX_BACKLOG_SECONDS + PAUSE_MARGIN_SECONDS} s",
                lambda: datetime.now(timezone.utc) >= unpause_at,
                timeout=3 * PAUSE_MAX_BACKLOG_SECONDS,
            )
            held_ids = insert_rows(held_conn, 25, seed=99, workspace="full-stack-held")
            held_xid = held_conn.execute("SELECT txid_current()").fetchone()[0]
            rows_while_paused = [
                row_id for batch in writer.committed() if batch.commit_sent_at > paused_at for row_id in batch.ids
            ]
            assert rows_while_paused, "No rows were inserted while the export was paused"

        stack.set_paused("audit_export", False)
        unpaused_at = datetime.now(timezone.utc)
        with clock.phase("re-anchoring run"):

            def reanchor_run() -> dict | None:
                fail_on_failed_runs(stack, "audit_export")
                for run in successful_runs(stack, "audit_export", run_type="scheduled"):
                    if run["dag_run_id"] not in runs_before_unpause:
                        return run
                return None

            run = stack.wait_for("the first run after the unpause", reanchor_run, timeout=NEXT_RUN_TIMEOUT)
        held_commit_sent_at = datetime.now(timezone.utc)
        held_conn.commit()
        writer.add_committed(held_ids, held_commit_sent_at, held=True)

        reanchor_run_id = run["dag_run_id"]
        anchor = stack.xcom("audit_export", reanchor_run_id, "anchor")
        assert anchor["action"] == "reanchored", f"The run after the pause did not re-anchor: {anchor}"
        assert anchor["cursor"] <= held_xid, f"The new cursor {anchor['cursor']} skips the open xid {held_xid}"
        gap = anchor["gap"]
        assert gap is not None, f"The re-anchor recorded no gap: {anchor}"
        assert "max_backlog" in gap["reason"], f"Unexpected re-anchor reason: {gap['reason']}"
        assert parse_time(gap["from"]) <= first_anchor["anchored_at"], f"Gap starts after the first anchor: {gap}"
        assert parse_time(gap["to"]) > unpaused_at, f"Gap ends before the unpause: {gap}"
        tasks = stack.task_instances("audit_export", reanchor_run_id)
        assert tasks[("backfill_gap", -1)]["state"] == "success", f"backfill_gap: {tasks[('backfill_gap', -1)]}"

        with clock.phase("gap backfill"):

            def gap_backfill_run() -> dict | None:
                for backfill_run in stack.dag_runs("audit_backfill"):
                    conf = backfill_run["conf"] or {}
                    if conf.get("from") == gap["from"] and conf.get("to") == gap["to"]:
                        return backfill_run
                return None

            backfill_run = stack.wait_for("the audit_backfill run of the gap", gap_backfill_run, timeout=60)
            assert backfill_run["triggered_by"] == "operator", f"Gap backfill run: {backfill_run}"
            stack.wait_for_run("audit_backfill", backfill_run["dag_run_id"], timeout=BACKFILL_TIMEOUT)
    finally:
        held_conn.close()
        batches = writer.stop()

    with clock.phase("runs after the last insert"):
        extra_runs = wait_for_cursor_past(stack, batches, timeout=2 * NEXT_RUN_TIMEOUT)
    print(f"[pause and unpause] scheduled runs after the last insert: {extra_runs}")

    # A later steady-state run may re-anchor again when its backlog crosses the small maximum, and
    # each such gap triggers its own backfill. Pause the export so that no new gap appears, then let
    # every backfill finish before the destination is checked.
    stack.set_paused("audit_export", True)
    with clock.phase("remaining backfills"):
        stack.wait_for(
            "the audit_export runs in flight to finish",
            lambda: not stack.dag_runs("audit_export", state=["queued", "running"]),
            timeout=NEXT_RUN_TIMEOUT,
        )
        fail_on_failed_runs(stack, "audit_export")

        def backfills_finished() -> bool:
            fail_on_failed_runs(stack, "audit_backfill")
            runs = stack.dag_runs("audit_backfill")
            return all(backfill_run["state"] == "success" for backfill_run in runs)

        stack.wait_for("every audit_backfill run to succeed", backfills_finished, timeout=BACKFILL_TIMEOUT)

    state = stack.read_state()
    recorded = [g for g in state["gaps"] if g["from"] == gap["from"] and g["to"] == gap["to"]]
    assert len(recorded) == 1, f"The state table does not hold the gap once: {state['gaps']}"
    assert recorded[0]["backfill"] == "done", f"The gap is not marked as backfilled: {recorded[0]}"
    assert recorded[0]["backfill_result"]["rows"] >= len(rows_while_paused), f"Gap backfill: {recorded[0]}"
    for other in state["gaps"]:
        assert other["backfill"] == "done", f"A gap is not backfilled: {other}"
    actions = [
        stack.xcom("audit_export", run["dag_run_id"], "anchor")["action"]
        for run in stack.dag_runs("audit_export", state="success")
    ]
    print(f"[pause and unpause] anchor actions: {', '.join(actions)}; gaps recorded: {len(state['gaps'])}")

    objects = stack.read_objects()
    steady, backfill = split_objects(objects)
    exported = Counter(row_id for ids in objects.values() for row_id in ids)
    in_steady = Counter(row_id for ids in steady.values() for row_id in ids)
    in_backfill = Counter(row_id for ids in backfill.values() for row_id in ids)
    first_anchored_at = first_anchor["anchored_at"]
    after_anchor = [row_id for batch in batches if batch.commit_sent_at > first_anchored_at for row_id in batch.ids]
    print(
        f"[pause and unpause] rows after the first anchor: {len(after_anchor)}, while paused: "
        f"{len(rows_while_paused)}, objects: {len(steady)} steady-state, {len(backfill)} backfill"
    )
    missing = [row_id for row_id in after_anchor if exported[row_id] == 0]
    assert not missing, f"{len(missing)} rows are missing from the destination, for example {missing[:10]}"
    not_backfilled = [row_id for row_id in rows_while_paused if in_backfill[row_id] == 0]
    assert not not_backfilled, f"Rows inserted while paused are not in backfill objects: {not_backfilled[:10]}"
    held_missing = [row_id for row_id in held_ids if in_steady[row_id] == 0]
    assert not held_missing, f"Rows of the transaction held across the re-anchor are not in steady-state objects"
    clock.total()
