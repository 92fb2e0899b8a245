"""Run every benchmark on one throwaway PostgreSQL cluster and one loopback S3 API, and print the report.

Usage: ``python -m bench.run [--sizes 200000,2000000] [--steady-sizes 2000000,20000000] [--report FILE]``.
``make bench`` runs it with ``BENCH_ARGS``. For each size in ``--sizes`` it
generates a database, then measures, on the same rows: the limit, the backfill
to the S3 API and to a local folder, and the peer. Each of those runs in a
fresh worker process (see :mod:`bench.worker`). The steady-state run is
measured on each size in ``--steady-sizes``, and the drain on ``--drain-size``
rows. The cluster, the S3 server and every file are removed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from psycopg import sql

from airflow_audit_export.testing.pgcluster import PostgresCluster
from airflow_audit_export.testing.s3server import S3Server
from airflow_audit_export.testing.schema import EXPORT_ROLE

from bench.generate import BenchDatabase, create_bench_database
from bench.report import describe_machine, evaluate_targets, render_markdown
from bench.steady import measure_drain, measure_steady_state
from bench.worker import S3_CONN_ID, SOURCE_CONN_ID, run_worker

log = logging.getLogger("bench.run")

BUCKET = "bench"
#: Server settings added to the throwaway cluster's defaults: statement statistics for the steady-state figures.
CLUSTER_SETTINGS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "top"}
#: Defaults of ExportSettings, so the backfill runs as the shipped DAG runs it.
DEFAULT_PAGE_ROWS = 10_000
DEFAULT_ROWS_PER_OBJECT = 100_000


def parse_count(text: str) -> int:
    """Parse a row count such as ``20000``, ``200k`` or ``2M``."""
    value = text.strip().lower().replace("_", "")
    multiplier = 1
    if value.endswith("k"):
        value, multiplier = value[:-1], 1_000
    elif value.endswith("m"):
        value, multiplier = value[:-1], 1_000_000
    try:
        count = int(float(value) * multiplier)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid row count {text!r}: expected a number such as 20000, 200k or 2M")
    if count < 1:
        raise argparse.ArgumentTypeError(f"invalid row count {text!r}: expected a positive number")
    return count


def parse_counts(text: str) -> list[int]:
    """Parse a comma-separated list of row counts, sorted ascending."""
    return sorted({parse_count(part) for part in text.split(",") if part.strip()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_counts, default=[200_000, 2_000_000],
                        help="rows of the partitioned table for the backfill, limit and peer runs (default: 200k,2M)")
    parser.add_argument("--steady-sizes", type=parse_counts, default=[2_000_000, 20_000_000],
                        help="rows of the partitioned table for the steady-state runs (default: 2M,20M)")
    parser.add_argument("--drain-size", type=parse_count, default=None,
                        help="rows of the backlog drained under the timeout (default: the largest of --sizes)")
    parser.add_argument("--steady-rows", type=parse_count, default=10_000,
                        help="new rows exported by each steady-state run (default: 10k)")
    parser.add_argument("--legacy-share", type=float, default=0.1,
                        help="rows of the legacy table, as a share of --sizes (default: 0.1)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the limit and of each backfill per size; the report shows medians (default: 3)")
    parser.add_argument("--range-workers", type=int, default=2,
                        help="backfill ranges exported at the same time, each on its own connection, as the DAG's "
                             "mapped range tasks run (default: 2)")
    parser.add_argument("--page-rows", type=int, default=DEFAULT_PAGE_ROWS, help="rows per backfill page (default: 10000)")
    parser.add_argument("--rows-per-object", type=int, default=DEFAULT_ROWS_PER_OBJECT,
                        help="rows per backfill object (default: 100000)")
    parser.add_argument("--skip-peer", action="store_true",
                        help="leave out the SqlToS3Operator runs, which need pandas (the bench extra)")
    parser.add_argument("--report", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for the cluster, the exported files and the logs (default: a new temporary folder)")
    return parser  # fmt: skip


class Bench:
    """The shared cluster, S3 server, Airflow environment and files of one benchmark run."""

    def __init__(self, args: argparse.Namespace, cluster: PostgresCluster, s3: S3Server, work_dir: Path) -> None:
        self.args = args
        self.cluster = cluster
        self.s3 = s3
        self.work_dir = work_dir
        self.log_path = work_dir / "workers.log"
        airflow_home = work_dir / "airflow-home"
        airflow_home.mkdir(exist_ok=True)
        self.base_env = {
            **os.environ,
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            f"AIRFLOW_CONN_{S3_CONN_ID.upper()}": s3.airflow_connection_uri(),
        }

    def worker_config(self, database: BenchDatabase) -> dict:
        return {
            "dsn": self.cluster.conninfo(database.name, user=EXPORT_ROLE),
            "export_name": "bench",
            "table": "public.audit_partitioned",
            "legacy_table": "public.audit" if database.legacy_rows else None,
            "timestamp_column": "timestamp",
            "window_from": database.window.start.isoformat(),
            "window_to": database.window.end.isoformat(),
            "page_rows": self.args.page_rows,
            "rows_per_object": self.args.rows_per_object,
            "range_workers": self.args.range_workers,
        }

    def run(self, task: str, database: BenchDatabase, **config) -> dict:
        env = {**self.base_env, f"AIRFLOW_CONN_{SOURCE_CONN_ID.upper()}": self.cluster.uri(database.name, user=EXPORT_ROLE)}
        # The S3 server runs in this process, so this process's CPU time during a run is mostly the server's.
        started_cpu = time.process_time()
        result = run_worker(task, {**self.worker_config(database), **config}, env=env, log_path=self.log_path)
        result["s3_server_cpu_seconds"] = time.process_time() - started_cpu
        log.info("%s on %s rows: %.1f s, peak RSS %.0f MiB", task, database.total_rows, result["seconds"],
                 result["peak_rss_bytes"] / 2**20)  # fmt: skip
        return result

    def delete_prefix(self, prefix: str) -> int:
        client = self.s3.client()
        keys = self.s3.list_keys(BUCKET, prefix)
        for start in range(0, len(keys), 1000):
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": key} for key in keys[start : start + 1000]]})
        return len(keys)

    # -- one size: the limit, both backfills and the peer on the same rows ---------------------

    def measure_size(self, database: BenchDatabase) -> dict:
        expected = database.total_rows
        limit_file = self.work_dir / f"limit-{database.name}.ndjson"
        # A first, unreported run of the limit reads the tables into the caches, so every measured run finds them warm.
        self.run("limit", database, output=str(limit_file), ordered=True)
        runs: dict[str, list[dict]] = {"limit": [], "backfill_s3": [], "backfill_local": []}
        for repeat in range(self.args.repeat):
            runs["limit"].append(self.run("limit", database, output=str(limit_file), ordered=True))
            limit_file.unlink()

            prefix = f"backfill/{database.name}/{repeat}"
            result = self.run("backfill", database, destination=f"s3://{BUCKET}/{prefix}")
            stored = self.delete_prefix(prefix + "/")
            _check_rows("backfill to S3", result["rows"], expected)
            if stored != result["objects"] + 1:
                raise RuntimeError(f"The S3 backfill stored {stored} keys, expected {result['objects']} objects and a manifest.")
            runs["backfill_s3"].append(result)

            folder = Path(tempfile.mkdtemp(prefix="backfill-", dir=self.work_dir))
            result = self.run("backfill", database, destination=f"file://{folder}")
            _check_rows("backfill to a local folder", result["rows"], expected)
            shutil.rmtree(folder)
            runs["backfill_local"].append(result)

        # One run with one range at a time shows what the overlap of ranges adds.
        if self.args.range_workers > 1:
            folder = Path(tempfile.mkdtemp(prefix="backfill-", dir=self.work_dir))
            result = self.run("backfill", database, destination=f"file://{folder}", range_workers=1)
            _check_rows("backfill to a local folder", result["rows"], expected)
            shutil.rmtree(folder)
            runs["backfill_local_one_range"] = [result]
        # One run without ORDER BY shows what streaming costs when the order is free. The targets use the ordered runs.
        runs["limit_unordered"] = [self.run("limit", database, output=str(limit_file), ordered=False)]
        limit_file.unlink()
        for result in runs["limit"] + runs["limit_unordered"]:
            _check_rows("limit", result["rows"], expected)

        figures = {name: _summarize(results) for name, results in runs.items()}
        if not self.args.skip_peer:
            figures["peer"] = self.measure_peer(database)
        for name in ("backfill_s3", "backfill_local", "backfill_local_one_range", "peer"):
            if name not in figures:
                continue
            figures[name]["ratio_to_limit"] = figures[name]["rows_per_second"] / figures["limit"]["rows_per_second"]
        return {
            "database": database.name,
            "rows": database.rows,
            "legacy_rows": database.legacy_rows,
            "total_rows": expected,
            "generate_seconds": database.generate_seconds,
            "database_bytes": database.size_bytes,
            **figures,
        }

    def measure_peer(self, database: BenchDatabase) -> dict:
        key = f"peer/{database.name}/audit.json"
        result = self.run("peer", database, bucket=BUCKET, key=key)
        stored = self.s3.client().get_object(Bucket=BUCKET, Key=result["key"])["Body"]
        with gzip.open(stored) as lines:
            rows = sum(1 for _ in lines)
        self.delete_prefix(f"peer/{database.name}/")
        _check_rows("peer", rows, database.total_rows)
        result.update(rows=rows, rows_per_second=rows / result["seconds"])
        return result


def _check_rows(export: str, rows: int, expected: int) -> None:
    if rows != expected:
        raise RuntimeError(f"The {export} exported {rows} rows, expected {expected}.")


def _summarize(results: list[dict]) -> dict:
    """Median seconds, rows/s and CPU over repeated runs, and the largest peak RSS."""
    summary = {
        "runs": len(results),
        "rows": results[0]["rows"],
        "seconds": statistics.median(r["seconds"] for r in results),
        "rows_per_second": statistics.median(r["rows"] / r["seconds"] for r in results),
        "rows_per_second_all": [round(r["rows"] / r["seconds"]) for r in results],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        "worker_cpu_seconds": statistics.median(r["worker_cpu_seconds"] for r in results),
        "server_cpu_seconds": statistics.median(r["server_cpu_seconds"] for r in results),
        "s3_server_cpu_seconds": statistics.median(r["s3_server_cpu_seconds"] for r in results),
    }
    for name in ("objects", "bytes", "ranges"):
        if name in results[0]:
            summary[name] = results[0][name]
    if "setup_rss_bytes" in results[0]:
        summary["setup_rss_bytes"] = max(r["setup_rss_bytes"] for r in results)
    return summary


def _drop_database(cluster: PostgresCluster, name: str) -> None:
    with cluster.connect() as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def run_benchmarks(args: argparse.Namespace, work_dir: Path) -> dict:
    """Run every measurement and return the report as a dictionary."""
    drain_size = args.drain_size or max(args.sizes)
    started = time.monotonic()
    with PostgresCluster(work_dir / "pg", settings=CLUSTER_SETTINGS) as cluster, S3Server() as s3:
        s3.create_bucket(BUCKET)
        bench = Bench(args, cluster, s3, work_dir)
        with cluster.connect() as admin:
            server_version = admin.execute("SHOW server_version").fetchone()[0]
        report: dict = {
            "machine": describe_machine(work_dir, server_version),
            "settings": {
                "sizes": args.sizes,
                "steady_sizes": args.steady_sizes,
                "drain_size": drain_size,
                "steady_rows": args.steady_rows,
                "legacy_share": args.legacy_share,
                "repeat": args.repeat,
                "page_rows": args.page_rows,
                "range_workers": args.range_workers,
                "rows_per_object": args.rows_per_object,
                "peer": not args.skip_peer,
                "cluster_settings": cluster.settings,
            },
            "sizes": [],
            "steady_state": [],
        }
        steady_done = set()
        for size in args.sizes:
            database = create_bench_database(cluster, f"bench_{size}", size, legacy_rows=round(size * args.legacy_share))
            report["sizes"].append(bench.measure_size(database))
            if size in args.steady_sizes:
                report["steady_state"].append(_steady(bench, database.name, size))
                steady_done.add(size)
            _drop_database(cluster, database.name)
        for size in args.steady_sizes:
            if size in steady_done:
                continue
            # Steady-state runs read the partitioned table only, so these databases get no legacy rows.
            database = create_bench_database(cluster, f"bench_steady_{size}", size, legacy_rows=0)
            report["steady_state"].append(_steady(bench, database.name, size))
            _drop_database(cluster, database.name)
        report["steady_state"].sort(key=lambda run: run["table_rows"])

        folder = Path(tempfile.mkdtemp(prefix="drain-", dir=work_dir))
        report["drain"] = measure_drain(cluster, "bench_drain", rows=drain_size, destination_dir=folder)
        log.info("drain of %s rows: %s", drain_size, report["drain"])
        shutil.rmtree(folder)
        _drop_database(cluster, "bench_drain")

    report["load_average_end"] = os.getloadavg()
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["targets"] = evaluate_targets(report)
    return report


def _steady(bench: Bench, database: str, size: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="steady-", dir=bench.work_dir))
    result = measure_steady_state(
        bench.cluster, database, table_rows=size, new_rows=bench.args.steady_rows, destination_dir=folder
    )
    shutil.rmtree(folder)
    log.info("steady state on %s rows: %s", size, result)
    return result


def _exit_on_sigterm(signum, frame) -> None:
    log.warning("Stopping on SIGTERM: removing the cluster, the S3 server and the files")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # moto's HTTP server logs every request at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for option in ("repeat", "range_workers", "page_rows", "rows_per_object"):
        if getattr(args, option) < 1:
            raise SystemExit(f"Invalid --{option.replace('_', '-')} {getattr(args, option)}: expected at least 1.")
    # The report is written at the end, so a folder that cannot take it must fail now, not after the whole run.
    if args.report and not os.access(args.report.resolve().parent, os.W_OK):
        raise SystemExit(
            f"Invalid --report {str(args.report)!r}: folder {str(args.report.resolve().parent)!r} does not exist or "
            "is not writable. Create it or choose another path."
        )
    # SIGTERM (from timeout or a CI runner) must unwind like Ctrl-C, so the cluster is stopped and its files removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    with tempfile.TemporaryDirectory(prefix="audit-export-bench-", dir=args.work_dir) as work:
        work_dir = Path(work)
        # The cluster's server runs as the postgres OS user when this runs as root, and must enter the folder.
        work_dir.chmod(0o755)
        report = run_benchmarks(args, work_dir)

    markdown = render_markdown(report)
    print(markdown)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1, default=str) + "\n")
        log.info("Wrote the report to %s", args.report)
    missed = [target["target"] for target in report["targets"] if not target["met"]]
    log.info("Benchmarks finished in %.0f s; %s of %s targets met", report["total_seconds"],
             len(report["targets"]) - len(missed), len(report["targets"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
