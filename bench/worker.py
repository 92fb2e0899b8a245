"""Measured exports, each run in a fresh worker process so that its peak RSS is its own.

Usage: ``python -m bench.worker TASK CONFIG_JSON``. The worker prints one line
``RESULT {json}`` on stdout with the task's figures and its own peak RSS, and
logs to stderr.

Tasks:

- ``limit``: PostgreSQL streams the window's rows as NDJSON with one
  ``COPY (SELECT row_to_json(...) ...) TO STDOUT`` per table, and the worker
  writes them to a local file.
- ``backfill``: the product's backfill path: ``plan_ranges``, then
  ``export_range`` for each range in ``range_workers`` range processes,
  then ``write_manifest``.
- ``peer``: the amazon provider's ``SqlToS3Operator`` on the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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

    This is what the backfill DAG's three tasks run. The ranges are exported
    by ``range_workers`` range processes at a time, each with its own
    connection, as Airflow runs each mapped range task in a process of its
    own (``AUDIT_BACKFILL_MAX_ACTIVE_RANGES`` of them side by side). This
    process plans the ranges and writes the manifest, as the DAG's ``plan``
    and ``summary`` tasks do. The Airflow task around each range (its
    process start, connection and table checks) is left out: every range
    process is set up before the clock starts, so the figures are the
    export's own. Peak RSS is the largest of all the processes.
    """
    import multiprocessing

    from airflow_audit_export.backfilling import write_manifest
    from airflow_audit_export.operators.backfill import DEFAULT_MAX_RANGES
    from airflow_audit_export.ranges import MIN_PAGES_PER_RANGE, plan_ranges
    from airflow_audit_export.source import describe_backfill_sources, open_connection
    from airflow_audit_export.window import parse_window
    from airflow_audit_export.writing import parse_destination

    settings = _settings(config)
    window = parse_window(config["window_from"], config["window_to"])
    destination = parse_destination(config["destination"], aws_conn_id=S3_CONN_ID)
    range_workers = config["range_workers"]

    # Spawned processes import everything afresh, as an Airflow task process does, so their RSS is their own.
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(range_workers + 1)
    with open_connection(SOURCE_CONN_ID) as conn, ProcessPoolExecutor(
        max_workers=range_workers, mp_context=context, initializer=_start_range_process, initargs=(config, ready)
    ) as pool:
        tables = [table for _, table in describe_backfill_sources(conn, settings)]
        destination.check_writable()
        # Every range process must be set up before the clock starts: one waiting call per process holds each
        # of them at the barrier, so no process can take two of these calls.
        setups = [pool.submit(_range_process_ready) for _ in range(range_workers)]
        ready.wait(timeout=RANGE_PROCESS_SETUP_SECONDS)
        setup_rss = max([own_rss_bytes("VmRSS")] + [setup.result() for setup in setups])

        started, started_cpu = time.monotonic(), time.process_time()
        started_server = backend_cpu_seconds(conn)
        min_range_rows = MIN_PAGES_PER_RANGE * settings.page_rows
        ranges = plan_ranges(conn, tables, window, DEFAULT_MAX_RANGES, min_range_rows=min_range_rows)
        planned = time.monotonic()
        exported_ranges = list(pool.map(_export_one_range, [(r.start.isoformat(), r.end.isoformat()) for r in ranges]))
        exported = time.monotonic()
        summary = write_manifest(destination, settings.name, window, [e["result"] for e in exported_ranges])
        finished = time.monotonic()
        own_cpu = time.process_time() - started_cpu
        own_server_cpu = backend_cpu_seconds(conn) - started_server
    return {
        "rows": summary["rows"],
        "objects": summary["objects"],
        "bytes": summary["bytes"],
        "ranges": summary["ranges"],
        "range_workers": range_workers,
        "setup_rss_bytes": setup_rss,
        "range_peak_rss_bytes": max(e["peak_rss_bytes"] for e in exported_ranges),
        "coordinator_peak_rss_bytes": own_rss_bytes(),
        "manifest": summary["manifest"],
        "seconds": finished - started,
        "plan_seconds": planned - started,
        "export_seconds": exported - planned,
        "manifest_seconds": finished - exported,
        "worker_cpu_seconds": own_cpu + sum(e["cpu_seconds"] for e in exported_ranges),
        "server_cpu_seconds": own_server_cpu + sum(e["server_cpu_seconds"] for e in exported_ranges),
    }


#: How long the range processes and the backfill process wait for each other to be set up.
RANGE_PROCESS_SETUP_SECONDS = 300

#: State of one range process, kept between the ranges it exports: its connection, tables, destination and settings.
_range_process: dict = {}


def _start_range_process(config: dict, ready) -> None:
    """Set up a range process as a range task sets itself up: connection, table checks and destination.

    ``ready`` is a barrier, which a spawned process can only receive here, at its start.
    """
    from airflow_audit_export.source import describe_backfill_sources, open_connection
    from airflow_audit_export.window import parse_window
    from airflow_audit_export.writing import parse_destination

    settings = _settings(config)
    conn = open_connection(SOURCE_CONN_ID)
    destination = parse_destination(config["destination"], aws_conn_id=S3_CONN_ID)
    destination.check_writable()
    _range_process.update(
        ready=ready,
        conn=conn,
        tables=describe_backfill_sources(conn, settings),
        destination=destination,
        settings=settings,
        window=parse_window(config["window_from"], config["window_to"]),
    )


def _range_process_ready() -> int:
    _range_process["ready"].wait(timeout=RANGE_PROCESS_SETUP_SECONDS)
    return own_rss_bytes("VmRSS")


def _export_one_range(bounds: tuple[str, str]) -> dict:
    """Export one range in this range process and return its result, CPU times and this process's peak RSS."""
    from datetime import datetime

    from airflow_audit_export.backfilling import export_range

    conn, settings = _range_process["conn"], _range_process["settings"]
    started_cpu, started_server = time.process_time(), backend_cpu_seconds(conn)
    result = export_range(
        conn,
        _range_process["tables"],
        _range_process["destination"],
        name=settings.name,
        window=_range_process["window"],
        start=datetime.fromisoformat(bounds[0]),
        end=datetime.fromisoformat(bounds[1]),
        page_rows=settings.page_rows,
        rows_per_object=settings.rows_per_object,
        compression=settings.compression,
    )
    return {
        "result": result,
        "cpu_seconds": time.process_time() - started_cpu,
        "server_cpu_seconds": backend_cpu_seconds(conn) - started_server,
        # VmHWM only grows, so the last range of each process reports that process's peak.
        "peak_rss_bytes": own_rss_bytes(),
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
    # The backfill's range processes have peaks of their own, so the figure is the largest of all processes.
    result["peak_rss_bytes"] = max(own_rss_bytes(), result.get("range_peak_rss_bytes", 0))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
