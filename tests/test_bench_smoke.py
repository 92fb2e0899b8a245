"""The benchmark of ``make bench`` at a tiny size: it runs end to end and its report has every figure.

The benchmark starts its own PostgreSQL cluster and S3 API server, so this
test uses none of the session fixtures. The figures themselves are not
checked against the targets, because a few thousand rows on a busy machine
show nothing about throughput. The peer needs pandas, which only the bench
extra installs, so it is left out when pandas is missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZE = 3_000
STEADY_SIZES = (3_000, 6_000)
STEADY_ROWS = 500
TIMEOUT_SECONDS = 400

# The peer's connection is opened inside SqlToS3Operator, so its server CPU time is not measured.
PEER_FIGURES = ("rows", "seconds", "rows_per_second", "peak_rss_bytes", "worker_cpu_seconds", "ratio_to_limit")
LIMIT_FIGURES = ("rows", "seconds", "rows_per_second", "peak_rss_bytes", "worker_cpu_seconds", "server_cpu_seconds")
BACKFILL_FIGURES = (*LIMIT_FIGURES, "objects", "bytes", "ranges", "ratio_to_limit", "s3_server_cpu_seconds")
STEADY_FIGURES = (
    "table_rows",
    "rows",
    "seconds",
    "statements",
    "shared_buffers",
    "reader_statements",
    "reader_shared_buffers",
    "slowest_statement_ms",
)
DRAIN_FIGURES = (
    "rows",
    "statement_timeout",
    "runs",
    "page_statements",
    "statements",
    "slowest_page_statement_seconds",
    "slowest_statement_ms",
    "reader_exec_seconds",
    "cancelled_pages",
    "seconds",
)
MACHINE_FIGURES = ("cores", "memory_gib", "python", "postgresql", "disk", "disk_size_gib", "load_average_start")


def test_bench_report_has_every_figure(tmp_path):
    with_peer = importlib.util.find_spec("pandas") is not None
    report_path = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "bench.run",
        "--sizes", str(SIZE),
        "--steady-sizes", ",".join(map(str, STEADY_SIZES)),
        "--steady-rows", str(STEADY_ROWS),
        "--drain-size", str(SIZE),
        "--repeat", "1",
        "--report", str(report_path),
    ]  # fmt: skip
    if not with_peer:
        command.append("--skip-peer")

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)

    assert result.returncode == 0, f"bench.run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    report = json.loads(report_path.read_text())
    for name in MACHINE_FIGURES:
        assert report["machine"].get(name), f"machine figure {name} is missing"

    [size] = report["sizes"]
    legacy_rows = round(SIZE * 0.1)
    assert size["total_rows"] == SIZE + legacy_rows
    expected_figures = {
        "limit": LIMIT_FIGURES,
        "limit_unordered": LIMIT_FIGURES,
        "backfill_s3": BACKFILL_FIGURES,
        "backfill_local": BACKFILL_FIGURES,
        "backfill_local_one_range": BACKFILL_FIGURES,
    }
    if with_peer:
        expected_figures["peer"] = PEER_FIGURES
    for export, names in expected_figures.items():
        figures = size[export]
        for name in names:
            assert figures.get(name) is not None, f"{export} figure {name} is missing"
        assert figures["rows"] == SIZE + legacy_rows, export
        assert figures["seconds"] > 0, export
        assert figures["peak_rss_bytes"] > 10 * 2**20, export
    assert size["backfill_s3"]["objects"] == size["backfill_local"]["objects"]
    assert size["backfill_s3"]["bytes"] == size["backfill_local"]["bytes"]

    steady = report["steady_state"]
    assert [run["table_rows"] for run in steady] == list(STEADY_SIZES)
    for run in steady:
        for name in STEADY_FIGURES:
            assert run.get(name) is not None, f"steady-state figure {name} is missing"
        assert run["rows"] == STEADY_ROWS
        assert run["shared_buffers"] > 0
        assert run["reader_statements"] >= 1

    drain = report["drain"]
    for name in DRAIN_FIGURES:
        assert drain.get(name) is not None, f"drain figure {name} is missing"
    assert drain["rows"] == SIZE
    assert drain["statement_timeout"] == "1s"
    assert drain["page_statements"] >= 1

    targets = [target["target"] for target in report["targets"]]
    # With one size: two throughput targets, two peak RSS targets, the buffers target and the drain target.
    assert len(targets) == 6, targets
    assert all(isinstance(target["met"], bool) for target in report["targets"])

    for heading in ("## Machine", "## Backfill", "## Steady state", "## Drain", "## Targets"):
        assert heading in result.stdout, f"the printed report has no {heading!r} section"
