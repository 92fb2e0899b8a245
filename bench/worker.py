"""Measured exports, each run in a fresh worker process so that its peak RSS is its own.

Usage: ``python -m bench.worker TASK CONFIG_JSON``. The worker prints one line
``RESULT {json}`` on stdout with the task's figures and its own peak RSS, and
logs to stderr.

Tasks:

- ``limit``: PostgreSQL streams the window's rows as NDJSON with one
  ``COPY (SELECT row_to_json(...) ...) TO STDOUT`` per table, and the worker
  writes them to a local file.
- ``backfill``: the product's backfill path: ``plan_ranges``, then
  ``export_range`` for each range (``range_workers`` at a time), then
  ``write_manifest``.
- ``peer``: the amazon provider's ``SqlToS3Operator`` on the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULT_PREFIX = "RESULT "

#: Airflow connection ids that the parent defines for workers through ``AIRFLOW_CONN_*`` variables.
SOURCE_CONN_ID = "bench_source"
S3_CONN_ID = "bench_s3"

log = logging.getLogger("bench.worker")


def own_rss_bytes(field: str = "VmHWM") -> int:
    """Return this process's peak resident set size (``VmHWM`` in ``/proc/self/status``), or ``VmRSS`` for the current one.

    ``ru_maxrss`` is no substitute: when a child execs, Linux folds the RSS
    high-water mark of the memory it forked from into the child's
    ``ru_maxrss``, so a worker would report at least the parent's peak.
    """
    status = Path("/proc/self/status").read_text()
    kib = re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)
    return int(kib) * 1024


def backend_cpu_seconds(conn) -> float:
    """Return the CPU time (user and system) that the connection's PostgreSQL backend has used so far.

    Read from ``/proc/<pid>/stat``, which works because the benchmark's server
    runs on the same machine and the worker may read other users' processes.
    """
    fields = Path(f"/proc/{conn.info.backend_pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name, utime and stime are the 12th and 13th fields, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the limit -----------------------------------------------------------------------------

_COPY_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v", b"\\": b"\\"}
_COPY_ESCAPE = re.compile(rb"\\(.)")


def unescape_copy_text(data: bytes) -> bytes:
    """Undo the escaping of COPY's text format, which PostgreSQL applies to backslashes and control characters."""
    if b"\\" not in data:
        return data
    return _COPY_ESCAPE.sub(lambda match: _COPY_ESCAPES.get(match.group(1), match.group(1)), data)


def measure_limit(config: dict) -> dict:
    """Stream every row of the window as NDJSON into ``config['output']``, one COPY per table."""
    import psycopg
    from psycopg import sql

    from airflow_audit_export.source import configure_connection, describe_backfill_sources

    rows = 0
    with psycopg.connect(config["dsn"]) as conn, open(config["output"], "wb") as out:
        configure_connection(conn)
        tables = describe_backfill_sources(conn, _settings(config))
        started, started_cpu, started_server = time.monotonic(), time.process_time(), backend_cpu_seconds(conn)
        for _, table in tables:
            ts = sql.SQL("t.{}").format(sql.Identifier(table.timestamp_column))
            order = (
                sql.SQL("ORDER BY {ts}, t.{id}").format(ts=ts, id=sql.Identifier(table.id_column))
                if config["ordered"]
                else sql.SQL("")
            )
            # COPY takes no bind parameters, so the bounds are inlined as literals.
            query = sql.SQL(
                "COPY (SELECT row_to_json(doc)::text FROM {table} AS t "
                "CROSS JOIN LATERAL (SELECT {columns}) AS doc "
                "WHERE {ts} >= {start}::timestamptz AND {ts} < {end}::timestamptz {order}) TO STDOUT"
            ).format(
                table=table.identifier,
                columns=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in table.columns),
                ts=ts,
                start=sql.Literal(config["window_from"]),
                end=sql.Literal(config["window_to"]),
                order=order,
            )
            with conn.cursor().copy(query) as copy:
                # libpq hands over one row per read in COPY TO.
                for row in copy:
                    out.write(unescape_copy_text(bytes(row)))
                    rows += 1
        out.flush()
        figures = {
            "seconds": time.monotonic() - started,
            "worker_cpu_seconds": time.process_time() - started_cpu,
            "server_cpu_seconds": backend_cpu_seconds(conn) - started_server,
        }
    return {"rows": rows, "bytes": os.path.getsize(config["output"]), **figures}


# -- the product's backfill path ------------------------------------------------------------


def _settings(config: dict):
    from airflow_audit_export.settings import ExportSettings

    return ExportSettings.create(
        name=config["export_name"],
        table=config["table"],
        legacy_table=config.get("legacy_table"),
        page_rows=config["page_rows"],
        rows_per_object=config["rows_per_object"],
    )


def measure_backfill(config: dict) -> dict:
    """Backfill the window with ``plan_ranges``, ``export_range`` per range and ``write_manifest``.

    This is what the backfill DAG's three tasks run. ``range_workers`` ranges
    are exported at the same time, each by a thread with its own connection,
    as the DAG's mapped range tasks run side by side
    (``AUDIT_BACKFILL_MAX_ACTIVE_RANGES``). The Airflow task around each range
    (its process, connection and table checks) is left out, so the figures
    are the export's own.
    """
    from airflow_audit_export.backfilling import export_range, write_manifest
    from airflow_audit_export.operators.backfill import DEFAULT_MAX_RANGES
    from airflow_audit_export.ranges import plan_ranges
    from airflow_audit_export.source import describe_backfill_sources, open_connection
    from airflow_audit_export.window import parse_window
    from airflow_audit_export.writing import parse_destination

    settings = _settings(config)
    window = parse_window(config["window_from"], config["window_to"])
    destination = parse_destination(config["destination"], aws_conn_id=S3_CONN_ID)
    range_workers = config["range_workers"]

    # The backfill operators open their connections the same way, through the Airflow postgres provider.
    connections = [open_connection(SOURCE_CONN_ID) for _ in range(range_workers)]
    try:
        # Connecting, checking the tables and creating the S3 client are setup, so the clock starts after them.
        tables = describe_backfill_sources(connections[0], settings)
        destination.check_writable()
        idle: queue.Queue = queue.Queue()
        for conn in connections:
            idle.put(conn)

        def export_one(page_range) -> dict:
            conn = idle.get()
            try:
                return export_range(
                    conn,
                    tables,
                    destination,
                    name=settings.name,
                    window=window,
                    start=page_range.start,
                    end=page_range.end,
                    page_rows=settings.page_rows,
                    rows_per_object=settings.rows_per_object,
                    compression=settings.compression,
                )
            finally:
                idle.put(conn)

        setup_rss = own_rss_bytes("VmRSS")
        started, started_cpu = time.monotonic(), time.process_time()
        started_server = sum(backend_cpu_seconds(conn) for conn in connections)
        ranges = plan_ranges(connections[0], [table for _, table in tables], window, DEFAULT_MAX_RANGES)
        planned = time.monotonic()
        with ThreadPoolExecutor(max_workers=range_workers, thread_name_prefix="range") as pool:
            results = list(pool.map(export_one, ranges))
        exported = time.monotonic()
        summary = write_manifest(destination, settings.name, window, results)
        finished = time.monotonic()
        server_cpu = sum(backend_cpu_seconds(conn) for conn in connections) - started_server
    finally:
        for conn in connections:
            conn.close()
    return {
        "rows": summary["rows"],
        "objects": summary["objects"],
        "bytes": summary["bytes"],
        "ranges": summary["ranges"],
        "range_workers": range_workers,
        "setup_rss_bytes": setup_rss,
        "manifest": summary["manifest"],
        "seconds": finished - started,
        "plan_seconds": planned - started,
        "export_seconds": exported - planned,
        "manifest_seconds": finished - exported,
        "worker_cpu_seconds": time.process_time() - started_cpu,
        "server_cpu_seconds": server_cpu,
    }


# -- the peer: the amazon provider's SqlToS3Operator ------------------------------------------


def measure_peer(config: dict) -> dict:
    """Export the same rows with ``SqlToS3Operator`` to one gzip NDJSON object."""
    from airflow.providers.amazon.aws.transfers.sql_to_s3 import SqlToS3Operator

    bounds = "\"{ts}\" >= '{start}'::timestamptz AND \"{ts}\" < '{end}'::timestamptz".format(
        ts=config["timestamp_column"], start=config["window_from"], end=config["window_to"]
    )
    selects = [f"SELECT * FROM {config['table']} WHERE {bounds}"]
    if config.get("legacy_table"):
        selects.append(f"SELECT * FROM {config['legacy_table']} WHERE {bounds}")
    operator = SqlToS3Operator(
        task_id="sql_to_s3",
        query=" UNION ALL ".join(selects),
        s3_bucket=config["bucket"],
        s3_key=config["key"],
        sql_conn_id=SOURCE_CONN_ID,
        aws_conn_id=S3_CONN_ID,
        file_format="json",
        df_kwargs={"orient": "records", "lines": True, "date_format": "iso", "compression": "gzip"},
        replace=True,
    )
    started, started_cpu = time.monotonic(), time.process_time()
    operator.execute({})
    return {
        "seconds": time.monotonic() - started,
        "worker_cpu_seconds": time.process_time() - started_cpu,
        # With compression="gzip", the operator appends .gz to the key.
        "key": config["key"] + ".gz",
    }


TASKS = {"limit": measure_limit, "backfill": measure_backfill, "peer": measure_peer}


def run_worker(task: str, config: dict, *, env: dict[str, str], log_path: Path) -> dict:
    """Run one task in a fresh Python process and return its figures, ``peak_rss_bytes`` included.

    The peak RSS is the worker's own, threads included (see
    :func:`own_rss_bytes`). ``os.wait4`` adds the CPU time of exactly
    that child, imports included.
    """
    command = [sys.executable, "-m", "bench.worker", task, json.dumps(config)]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=Path(__file__).resolve().parent.parent
        )
        output = process.stdout.read()
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"Benchmark worker {task!r} failed with exit code {process.returncode}. See its log {log_path}."
        )
    lines = [line for line in output.decode().splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"Benchmark worker {task!r} printed no result line. See its log {log_path}.")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    task, config = sys.argv[1], json.loads(sys.argv[2])
    if task not in TASKS:
        raise SystemExit(f"Unknown task {task!r}: expected one of {', '.join(TASKS)}.")
    result = TASKS[task](config)
    result["peak_rss_bytes"] = own_rss_bytes()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
